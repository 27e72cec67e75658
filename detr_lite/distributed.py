"""Multi-process (DDP) helpers for ``torchrun``.

``torchrun --nproc_per_node N -m detr_lite.train ...`` starts N copies of the training script and
passes each one ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in the
environment. :func:`init_distributed` reads them and joins the process group (``gloo`` on CPU,
``nccl`` on CUDA). Every helper here also works in a plain single process, where it degrades to
the obvious no-op, so the rest of the package never has to branch on "am I distributed?".
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    """Only rank 0 writes files and prints summaries."""
    return get_rank() == 0


def init_distributed(device: str) -> bool:
    """Join the process group described by torchrun's environment variables.

    Returns True when running distributed (``WORLD_SIZE`` > 1). On CUDA each process is pinned to
    ``cuda:LOCAL_RANK``. Safe to call when not launched by torchrun (returns False).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or "RANK" not in os.environ:
        return False
    if is_dist():
        return True
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0":
        dist.init_process_group(backend=backend)
    else:
        # a group that torchrun restarted (--max-restarts) meets in the store of the failed one;
        # its own key prefix keeps it from reading the dead processes' addresses
        store, rank, world_size = next(dist.rendezvous("env://"))
        dist.init_process_group(backend, store=dist.PrefixStore(f"attempt_{attempt}", store), rank=rank,
                                world_size=world_size)  # fmt: skip
    return True


def local_device(device: str) -> torch.device:
    """The device this process trains on (``cuda:LOCAL_RANK`` under torchrun with CUDA)."""
    if device.startswith("cuda") and is_dist():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Average a dict of Python floats over all processes (keys must match on every rank)."""
    if not is_dist() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= get_world_size()
    return {k: v for k, v in zip(keys, t.tolist())}


def all_reduce_sum(value: float, device: torch.device | str = "cpu") -> float:
    if not is_dist():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def all_gather_object(obj: Any) -> list[Any]:
    """Gather any picklable object from every rank (a one-element list outside DDP)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DistributedDataParallel and/or ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
