"""Saving and loading checkpoints: atomic writes, ``weights_only`` loads, clear mismatch errors.

A checkpoint is a plain dict::

    {'model': state_dict, 'config': Config.to_dict(), 'meta': {...},
     # a training run's checkpoints add what --resume needs (TrainState)
     'optimizer': ..., 'lr_scheduler': ..., 'scaler': ... (fp16 only), 'epoch': epochs done,
     'iteration': batches done in the next epoch (0 after an epoch; > 0 mid-epoch),
     'epoch_totals': that epoch's running sums, 'rng': {...}, 'rng_per_rank': [...] (DDP),
     'metrics': [one record per finished epoch],
     # and, with train.ema_decay, the live weights ('model' is then their moving average)
     'model_train': state_dict}

Everything in it is a tensor or a plain Python type, so it loads with
``torch.load(path, weights_only=True)``, which refuses to run arbitrary pickled code.

Writes are atomic: the bytes go to a temporary file in the same directory, are flushed and
fsync'ed, and only then ``os.replace``-d over the destination. A crash (or ``kill -9``) at any
moment leaves either the old checkpoint or the new one, never half a file.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detr_lite import __version__
from detr_lite.config import Config
from detr_lite.distributed import unwrap_model


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        # An exception (or Ctrl-C) before the rename: drop the partial temp file, keep the old one.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable (best effort; not supported everywhere)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    cfg: Config | dict,
    meta: dict[str, Any] | None = None,
    half: bool = False,
    **extra: Any,
) -> None:
    """Atomically write ``{'model', 'config', 'meta', **extra}`` to ``path``.

    ``model`` may be wrapped in DDP or ``torch.compile``; the bare model's state dict is stored
    (on CPU). ``half=True`` stores floating-point tensors as float16 (for small shipped files);
    :func:`load_checkpoint` casts them back to the model's dtype. ``extra`` holds the training
    state (optimizer, lr_scheduler, epoch, rng, metrics...).
    """
    state = unwrap_model(model).state_dict()
    sd = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if half and v.is_floating_point():
            v = v.half()
        sd[k] = v
    full_meta = {
        "detr_lite_version": __version__,
        "torch_version": str(torch.__version__),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dtype": "float16" if half else "float32",
    }
    full_meta.update(meta or {})
    ckpt = {
        "model": sd,
        "config": cfg.to_dict() if isinstance(cfg, Config) else dict(cfg),
        "meta": full_meta,
    }
    ckpt.update(extra)
    atomic_torch_save(ckpt, path)


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with one-line ValueErrors for the usual mistakes."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path}: file not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, pickle with code in it, not a torch file at all...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {path}: cannot be loaded with weights_only=True ({first})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        got = sorted(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"checkpoint {path}: expected a dict with a 'model' state dict, got {got}")
    return ckpt


def state_dict_mismatch(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[list, list, list]:
    """``(missing, unexpected, shape_mismatched)`` keys between ``model`` and ``state_dict``.

    ``shape_mismatched`` holds ``(key, checkpoint_shape, model_shape)`` tuples.
    """
    own = unwrap_model(model).state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        (k, tuple(state_dict[k].shape), tuple(own[k].shape))
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    return missing, unexpected, mismatched


def rename_prefixes(state_dict: dict[str, torch.Tensor], renames: dict[str, str]) -> dict[str, torch.Tensor]:
    """Replace the first matching prefix of every key (``renames`` maps old prefix -> new prefix)."""
    out = {}
    for key, value in state_dict.items():
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def describe_mismatch(missing: list, unexpected: list, mismatched: list, first: int = 3) -> str:
    """One line such as ``2 missing keys [a, b]; 1 unexpected key [c]; 1 shape mismatch [d: (4,) vs (5,)]``."""

    def part(items, what, fmt=str):
        if not items:
            return None
        shown = ", ".join(fmt(i) for i in items[:first])
        more = f", ... (+{len(items) - first} more)" if len(items) > first else ""
        return f"{len(items)} {what}{'s' if len(items) != 1 else ''} [{shown}{more}]"

    parts = [
        part(missing, "missing key"),
        part(unexpected, "unexpected key"),
        part(mismatched, "shape mismatch", lambda m: f"{m[0]}: checkpoint {m[1]} vs model {m[2]}"),
    ]
    return "; ".join(p for p in parts if p)


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "") -> None:
    """Strictly load ``state_dict`` into ``model``, casting float16 entries back to the model's dtype.

    Raises ValueError naming the first few missing / unexpected / mismatched-shape keys (with
    counts) instead of torch's multi-page RuntimeError.
    """
    missing, unexpected, mismatched = state_dict_mismatch(model, state_dict)
    if missing or unexpected or mismatched:
        where = f"checkpoint {source}" if source else "state dict"
        raise ValueError(
            f"{where} does not match the model: {describe_mismatch(missing, unexpected, mismatched)}"
        )
    target = unwrap_model(model)
    target.load_state_dict(cast_like(state_dict, target.state_dict()), strict=True)


def cast_like(state_dict: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating-point tensors cast to the dtype of the same key in ``own`` (float16 files -> float32 models)."""
    return {k: (v.to(own[k].dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    model: nn.Module | None = None,
) -> tuple[nn.Module, Config, dict[str, Any]]:
    """Load a detr_lite checkpoint -> ``(model in eval mode, Config, raw checkpoint dict)``.

    The model is rebuilt from the stored config (``detr_lite.models.build_model``) unless
    ``model`` is given, in which case the weights are loaded into it. Either way a state dict
    that doesn't fit raises ValueError naming the offending keys.
    """
    ckpt = read_checkpoint(path, map_location)
    model, cfg = model_from_checkpoint(ckpt, str(path), map_location, model)
    return model, cfg, ckpt


def model_from_checkpoint(
    ckpt: dict[str, Any], source: str, map_location: str | torch.device = "cpu", model: nn.Module | None = None
) -> tuple[nn.Module, Config]:
    """``(model in eval mode, Config)`` from a checkpoint dict already read by :func:`read_checkpoint`."""
    from detr_lite.models import build_model

    if "config" not in ckpt:
        raise ValueError(
            f"checkpoint {source}: has no 'config' entry (an official model-zoo file? "
            "use detr_lite.load_official_checkpoint(path, arch=...) instead)"
        )
    cfg = Config.from_dict(ckpt["config"])
    if model is None:
        model = build_model(cfg.model).to(map_location)
    load_state_dict_checked(model, ckpt["model"], source=source)
    return model.eval(), cfg


# --------------------------------------------------------------------------------------------
# starting weights: a model to fine-tune, a pretrained backbone
# --------------------------------------------------------------------------------------------
CLASS_HEAD_PREFIX = "class_embed"


def load_finetune_weights(model: nn.Module, path: str | os.PathLike) -> str:
    """Load weights for fine-tuning; a class head of another size is skipped (left freshly initialised).

    Any other mismatch (missing, unexpected or differently shaped keys) is an error naming the keys.
    """
    sd = dict(read_checkpoint(path)["model"])
    missing, unexpected, mismatched = state_dict_mismatch(model, sd)
    head = [m for m in mismatched if m[0].startswith(CLASS_HEAD_PREFIX)]
    other = [m for m in mismatched if not m[0].startswith(CLASS_HEAD_PREFIX)]
    if missing or unexpected or other:
        raise ValueError(
            f"--finetune {path}: weights do not fit the model: {describe_mismatch(missing, unexpected, other)}"
        )
    for key, _, _ in head:
        sd.pop(key)
    model.load_state_dict(cast_like(sd, model.state_dict()), strict=False)
    if head:
        return f"loaded {path}; class head re-initialised ({len(head)} tensors: num_classes differs)"
    return f"loaded {path} (all tensors)"


def load_backbone_weights(model: nn.Module, path: str | os.PathLike) -> str:
    """Load the ``backbone.*`` tensors of ``path`` (a ``python -m detr_lite.pretrain`` checkpoint, or
    any DETR checkpoint) into ``model.backbone``; any missing or differently shaped backbone tensor is
    a one-line error. Stages after this backbone's last one (a trunk pretrained deeper than the
    DETR's cut) are left out and counted in the returned message."""
    from detr_lite.backbone import _STAGES

    ckpt = read_checkpoint(path)
    sd = {k[len("backbone.") :]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    if not sd:
        raise ValueError(f"--backbone-weights {path}: no 'backbone.*' tensors in its 'model' state dict")
    own = model.backbone.state_dict()

    def stage(key: str) -> str:  # "body.layer2.0.conv1.weight" -> "layer2"
        parts = key.split(".")
        return parts[1] if len(parts) > 2 and parts[0] == "body" else ""

    # the stages after this backbone's last one are not part of it (IntermediateLayerGetter drops them)
    last = max((_STAGES.index(stage(k)) for k in own if stage(k) in _STAGES), default=len(_STAGES) - 1)
    unused = [k for k in sd if stage(k) in _STAGES[last + 1 :]]
    # trainable BatchNorm counts its batches; FrozenBatchNorm2d (same other buffers) has no counter
    sd = {k: v for k, v in sd.items() if k not in unused and (k in own or not k.endswith("num_batches_tracked"))}
    missing, unexpected, mismatched = state_dict_mismatch(model.backbone, sd)
    if missing or unexpected or mismatched:
        raise ValueError(
            f"--backbone-weights {path}: does not fit this backbone: {describe_mismatch(missing, unexpected, mismatched)}"
        )
    model.backbone.load_state_dict(cast_like(sd, own))
    msg = f"loaded backbone weights from {path} ({len(sd)} tensors)"
    if unused:
        stages = sorted({stage(k) for k in unused}, key=_STAGES.index)
        msg += f"; {len(unused)} tensors of {', '.join(stages)} not used (this backbone stops after {_STAGES[last]})"
    return msg


def backbone_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """Where a ``--backbone-weights`` file came from (its path and, for a pretrain checkpoint, the command,
    epochs, wall time and last epoch's pretext losses), kept in the trained checkpoint's meta."""
    meta = read_checkpoint(path).get("meta", {})
    out: dict[str, Any] = {"path": str(path)}
    for key in ("command", "epochs", "lr", "lr_drop", "pretrain_wall_time_s", "pretext"):
        if key in meta:
            out[key] = meta[key]
    if meta.get("history"):
        out["last_epoch"] = meta["history"][-1]
    return out


# --------------------------------------------------------------------------------------------
# a training run's state: saved every epoch (and every N iterations), restored by --resume
# --------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """What a run changes as it trains, so what its checkpoint holds for an exact resume."""

    model: nn.Module  # the live weights (possibly DDP / compile wrapped)
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler | None = None  # fp16 autocast only
    ema: Any = None  # engine.ModelEma: its average is the checkpoint's "model"
    epoch: int = 0  # epochs finished
    epoch_totals: dict[str, float] = field(default_factory=dict)  # running sums of the next epoch so far
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    wall_s: float = 0.0  # training wall time of the run before this process started

    @property
    def iteration(self) -> int:
        """Batches of epoch ``epoch`` already trained on (0 between epochs)."""
        return int(self.epoch_totals.get("iters", 0))


def save_training_checkpoint(path: str | os.PathLike, state: TrainState, cfg: Config, meta: dict[str, Any],
                             rngs: list[dict[str, Any]]) -> None:  # fmt: skip
    """Atomically write ``state`` (``rngs``: every process's RNG snapshot, rank order) to ``path``."""
    extra: dict[str, Any] = {
        "optimizer": state.optimizer.state_dict(), "lr_scheduler": state.lr_scheduler.state_dict(),
        "epoch": state.epoch, "iteration": state.iteration, "epoch_totals": dict(state.epoch_totals),
        "rng": rngs[0], "metrics": state.history,
    }  # fmt: skip
    if len(rngs) > 1:
        extra["rng_per_rank"] = rngs
    if state.scaler is not None:
        extra["scaler"] = state.scaler.state_dict()
    if state.ema is not None:  # the average is the model everything else loads; the live weights ride along
        extra["model_train"] = unwrap_model(state.model).state_dict()
    save_checkpoint(path, state.model if state.ema is None else state.ema.module, cfg, meta=meta, **extra)


def restore_training_state(state: TrainState, ckpt: dict[str, Any], source: str, rank: int = 0) -> dict[str, Any]:
    """Load a training checkpoint into ``state``; returns the RNG snapshot of process ``rank``
    (restored by the trainer where the run stopped: the start of epoch ``state.epoch`` + its
    ``state.iteration`` batches)."""
    if state.ema is not None and "model_train" not in ckpt:
        raise ValueError(f"--resume: {source} has train.ema_decay but no 'model_train' weights")
    load_state_dict_checked(state.model, ckpt.get("model_train", ckpt["model"]), source=source)
    if state.ema is not None:
        load_state_dict_checked(state.ema.module, ckpt["model"], source=source)
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    if state.scaler is not None and "scaler" in ckpt:
        state.scaler.load_state_dict(ckpt["scaler"])
    state.epoch = int(ckpt["epoch"])
    state.epoch_totals = dict(ckpt.get("epoch_totals", {}))
    state.history = list(ckpt.get("metrics", []))
    state.wall_s = float(ckpt["meta"].get("train_wall_time_s", 0.0))
    per_rank = ckpt.get("rng_per_rank", [])
    return per_rank[rank] if rank < len(per_rank) else ckpt["rng"]


def export_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, half: bool = True, meta: dict[str, Any] | None = None
) -> Path:
    """Turn a training checkpoint into a small shippable one.

    Keeps the weights (float16 when ``half``), the config, the meta data and the per-epoch
    ``metrics`` history; drops optimizer / scheduler / RNG state. The model is rebuilt and loaded
    first, so a file that would not load is never written.
    """
    model, cfg, ckpt = load_checkpoint(src)
    extra = {"metrics": ckpt["metrics"]} if "metrics" in ckpt else {}
    full_meta = dict(ckpt.get("meta", {}))
    full_meta.update(exported_from=str(src), epochs_trained=ckpt.get("epoch"))
    full_meta.update(meta or {})
    full_meta.pop("dtype", None)
    save_checkpoint(dst, model, cfg, meta=full_meta, half=half, **extra)
    return Path(dst)


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(
        prog="python -m detr_lite.checkpoint",
        description="Export a training checkpoint as a small shippable file (weights + config + metrics).",
    )
    p.add_argument("src", help="training checkpoint, e.g. runs/detr-shapes/checkpoint.pt")
    p.add_argument("dst", help="output file, e.g. data/checkpoints/detr_shapes.pt")
    p.add_argument("--fp32", action="store_true", help="keep float32 weights (default: float16)")
    args = p.parse_args(argv)
    try:
        out = export_checkpoint(args.src, args.dst, half=not args.fp32)
    except ValueError as e:
        print(f"detr_lite.checkpoint: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
