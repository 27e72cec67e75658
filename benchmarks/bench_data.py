"""Data loading throughput on the bundled shapes data (train transforms, detr-shapes sizes).

Measures images/s through ``DataLoader(build_dataset(...), batch_size=8, collate_fn=collate_fn)``
for ``num_workers`` 0 and 2, and for 0 workers with 1 vs N intra-op threads in the main
process. The per-image tensors are tiny (3 x ~128 x ~150): run through torch ops, torch's
thread pool costs far more than it saves on a busy 2-core machine (a first version, with
``ToDtype``/``Normalize``/torch padding, measured 12 images/s with 2 threads vs 193 with 1).
The pipeline therefore resizes with PIL and normalises/pads with NumPy, and the thread count
no longer matters.

Run: ``python benchmarks/bench_data.py [--images 400] [--threads 2]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detr_lite.config import get_config  # noqa: E402
from detr_lite.data.coco import build_dataset, collate_fn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1] / "data" / "shapes"


def throughput(ds, n_images: int, workers: int, batch: int = 8) -> float:
    sub = torch.utils.data.Subset(ds, range(n_images))
    loader = torch.utils.data.DataLoader(
        sub,
        batch_size=batch,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_fn,
        persistent_workers=False,
    )
    t0 = time.perf_counter()
    n = 0
    for images, _mask, _targets in loader:
        n += images.shape[0]
    return n / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of the main process")
    p.add_argument("--split", default="train2017")
    a = p.parse_args()
    cfg = get_config("detr-shapes").data
    ds = build_dataset(ROOT, a.split, cfg, train=True)
    throughput(ds, 16, 0)  # warm-up: file cache, lazy imports
    rows = []
    for threads, workers in ((a.threads, 0), (1, 0), (a.threads, 2)):
        torch.set_num_threads(threads)
        rows.append((workers, threads, throughput(ds, a.images, workers)))
    print(f"{a.split}: {a.images} images, train transforms of detr-shapes, batch 8")
    for workers, threads, ips in rows:
        label = f"num_workers={workers}" + (f", main-process threads={threads}" if workers == 0 else "")
        print(f"{label:42s} {ips:8.1f} images/s")


if __name__ == "__main__":
    main()
