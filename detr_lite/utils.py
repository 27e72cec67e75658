"""Small helpers for the training loop: seeding, RNG snapshots, memory, AP tables, CLI errors.

RNG snapshots are stored as tensors and plain Python types (no numpy arrays, no tuples of
unknown classes) so that a checkpoint holding them still loads with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import resource
import sys
from typing import Any

import numpy as np
import torch

from detr_lite.monitor import JsonlLog, read_jsonl  # noqa: F401 (their home; names kept for notebook 06)

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Snapshot of every global RNG, as tensors/ints (``weights_only``-loadable)."""
    np_state = np.random.get_state()  # ('MT19937', uint32[624], pos, has_gauss, cached_gaussian)
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a snapshot made by :func:`get_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


def max_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA ``max_memory_allocated`` or the CPU peak RSS, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def format_ap_table(metrics: dict[str, float], title: str | None = None) -> str:
    """A Markdown table of the six COCO box metrics (COCOeval ``stats[0:6]``).

    COCOeval reports -1 when an area range has no ground truth; shown as ``n/a``.
    """
    cells = []
    for k in AP_KEYS:
        v = metrics.get(k)
        cells.append("n/a" if v is None or v < 0 else f"{v:.3f}")
    lines = [] if title is None else [title]
    lines.append("| " + " | ".join(f"{k:>5}" for k in AP_KEYS) + " |")
    lines.append("|" + "|".join("-------" for _ in AP_KEYS) + "|")
    lines.append("| " + " | ".join(f"{c:>5}" for c in cells) + " |")
    return "\n".join(lines)


def cli_main(prog: str, parser, run, argv: list[str] | None = None) -> int:
    """Parse ``argv`` with ``parser`` and call ``run(args)``; a ``ValueError`` / ``FileNotFoundError``
    becomes one line ``PROG: error: ...`` on stderr and exit code 2 (``DETR_LITE_DEBUG=1``: traceback)."""
    args = parser.parse_args(argv)
    try:
        rc = run(args)  # an exit code, or anything else (e.g. evaluate's metrics) for success
        return rc if isinstance(rc, int) else 0
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("DETR_LITE_DEBUG"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
