"""Saving and loading checkpoints: atomic writes, ``weights_only`` loads, clear mismatch errors.

A checkpoint is a plain dict::

    {'model': state_dict, 'config': Config.to_dict(), 'meta': {...},
     # resumable training checkpoints add
     'optimizer': ..., 'lr_scheduler': ..., 'epoch': int, 'rng': {...}, 'metrics': [...],
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
    own = target.state_dict()
    cast = {k: (v.to(own[k].dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    target.load_state_dict(cast, strict=True)


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
    from detr_lite.models import build_model

    ckpt = read_checkpoint(path, map_location)
    if "config" not in ckpt:
        raise ValueError(
            f"checkpoint {path}: has no 'config' entry (an official model-zoo file? "
            "use detr_lite.load_official_checkpoint(path, arch=...) instead)"
        )
    cfg = Config.from_dict(ckpt["config"])
    if model is None:
        model = build_model(cfg.model).to(map_location)
    load_state_dict_checked(model, ckpt["model"], source=str(path))
    model.eval()
    return model, cfg, ckpt


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
