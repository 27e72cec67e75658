"""A run's log and how to follow it: ``log.jsonl`` written by the trainer, read by anyone.

The trainer appends one JSON object per line (:class:`JsonlLog`): ``{"type": "iter", "epoch",
"iter", "loss", ...}`` per optimiser step, ``{"type": "epoch", "epoch", "train_loss", "AP", ...}``
per epoch and ``{"type": "error", ...}`` when it stops on a non-finite loss. Another process may
be writing the file while it is read, so :func:`read_jsonl` skips a half-written last line.
:func:`plot_progress` draws the curves (the trainer saves them as ``loss.png`` every epoch),
:func:`status_line` summarises a run in one line and :func:`follow` redraws both in a notebook.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np


class JsonlLog:
    """Append-only JSON-lines log; each ``write`` is flushed so a crash loses at most one line."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=_jsonable) + "\n")

    def truncate_from(self, epoch: int, iteration: int = 0) -> None:
        """Drop what a run resumed at iteration ``iteration`` of ``epoch`` logs again: the iterations
        from there on, the summaries of that epoch and later ones, and a line cut by a kill."""
        if not self.enabled or not self.path.exists():
            return
        # a summary (no "iter") comes after its epoch's iterations
        kept = [r for r in read_jsonl(self.path) if (r.get("epoch", -1), r.get("iter", math.inf)) < (epoch, iteration)]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "numel"):  # a torch tensor
        return x.item() if x.numel() == 1 else x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON through a temporary file, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a JSON-lines file that another process may still be writing ([] if absent).

    A half-written last line (the writer is mid-``write``, or was killed there) is skipped; a bad
    line anywhere else is a ``ValueError`` naming it.
    """
    try:
        lines = Path(path).read_text().split("\n")
    except OSError:
        return []
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:60]!r}") from None
    return [r for r in records if isinstance(r, dict)]


def read_log(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The trainer's ``log.jsonl`` split into (per-iteration records, per-epoch records)."""
    records = read_jsonl(path)
    return [r for r in records if r.get("type") == "iter"], [r for r in records if r.get("type") == "epoch"]


def plot_progress(log_path: str | os.PathLike, fig=None):
    """Four panels from ``log.jsonl``: train loss per iteration, val loss, val AP and images/s per epoch."""
    import matplotlib.pyplot as plt

    from detr_lite.viz import plot_loss_curves

    its, eps = read_log(log_path)
    if fig is None:
        fig = plt.figure(figsize=(12, 2.8), dpi=100)
    fig.clf()
    axes = fig.subplots(1, 4)
    # iterations on an epoch axis: iteration i of an epoch with n of them sits at epoch + i / n
    per_epoch: dict[int, int] = {}
    for r in its:
        per_epoch[r.get("epoch", 0)] = per_epoch.get(r.get("epoch", 0), 0) + 1
    x_iter = [r.get("epoch", 0) + r.get("iter", 0) / per_epoch[r.get("epoch", 0)] for r in its]
    panels = [
        (axes[0], {"train": [r["loss"] for r in its]}, x_iter, "loss", "train loss per iteration"),
        (axes[1], *_epoch_series(eps, "val_loss"), "loss", "val loss"),
        (axes[2], *_epoch_series(eps, "AP", "AP50"), "COCO AP", "val AP"),
        (axes[3], *_epoch_series(eps, "images_per_s"), "images / s", "training throughput"),
    ]
    for ax, curves, x, ylabel, title in panels:
        if x:
            plot_loss_curves(curves, x=x, ax=ax, xlabel="epoch", ylabel=ylabel, title=title)
            for line in ax.lines if len(x) < 50 else ():  # few points: mark them
                line.set(marker="o", markersize=3)
        else:
            ax.set(xlabel="epoch", ylabel=ylabel, title=title)
            ax.text(0.5, 0.5, "nothing logged yet", ha="center", va="center", transform=ax.transAxes, color="0.5")
    fig.tight_layout()
    return fig


def _epoch_series(eps: list[dict[str, Any]], *keys: str) -> tuple[dict[str, list[float]], list[int]]:
    """({key: values}, epochs) over the epoch records that hold ``keys[0]`` (epochs counted from 1)."""
    rows = [r for r in eps if isinstance(r.get(keys[0]), (int, float))]
    return {k: [r.get(k, float("nan")) for r in rows] for k in keys}, [r["epoch"] + 1 for r in rows]


def save_progress_plot(log_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """:func:`plot_progress` written to ``png_path`` through a temporary file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png_path = Path(png_path)
    fig = plot_progress(log_path)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)


def tail(path: str | os.PathLike, n: int = 20) -> str:
    """The last ``n`` lines of a text file ('' if it does not exist yet)."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def status_line(output_dir: str | os.PathLike, epochs: int | None = None, train_images: int | None = None) -> str:
    """One line: running or not, where the run is, its last loss/AP, throughput, memory and an ETA."""
    from detr_lite.jobs import running_pid

    out = Path(output_dir)
    its, eps = read_log(out / "log.jsonl")
    pid = running_pid(out)
    parts = [f"running (pid {pid})" if pid is not None else "not running"]
    if its:
        last = its[-1]
        parts.append(f"epoch {last['epoch']} iter {last['iter']} loss {last['loss']:.3f}")
    if eps:
        e = eps[-1]
        if "AP" in e:
            parts.append(f"AP {100 * e['AP']:.1f} after epoch {e['epoch'] + 1}")
        if "images_per_s" in e:
            parts.append(f"{e['images_per_s']:.1f} img/s")
        if "max_memory_mb" in e:
            parts.append(f"peak {e['max_memory_mb']:.0f} MB")
        if pid is not None and epochs and train_images and e.get("images_per_s"):
            left = (epochs - e["epoch"] - 1) * train_images / e["images_per_s"] / 3600
            parts.append(f"about {left:.1f} h to go")
    return " | ".join(parts)


def follow(output_dir: str | os.PathLike, every_s: float = 60.0, epochs: int | None = None,
           train_images: int | None = None) -> None:  # fmt: skip
    """Notebook polling loop: redraw :func:`status_line` and :func:`plot_progress` every ``every_s``
    seconds until the job ends. Interrupting the kernel stops the *following*, not the training."""
    import matplotlib.pyplot as plt
    from IPython.display import clear_output, display

    from detr_lite.jobs import STDOUT_FILE, running_pid

    out = Path(output_dir)
    try:
        while True:
            running = running_pid(out) is not None
            clear_output(wait=True)
            print(status_line(out, epochs, train_images))
            fig = plot_progress(out / "log.jsonl")
            display(fig)
            plt.close(fig)
            if not running:
                print(f"last lines of {out / STDOUT_FILE}:\n{tail(out / STDOUT_FILE, 8)}")
                return
            time.sleep(every_s)
    except KeyboardInterrupt:
        print(f"stopped following; the job keeps running (stop it with detr_lite.jobs.stop({str(out)!r}))")
