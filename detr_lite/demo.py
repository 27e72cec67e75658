"""The one-minute tour: ``make demo`` (= ``python -m detr_lite.demo``).

1. Evaluates both shipped models, ``data/checkpoints/detr_shapes.pt`` (DETR) and
   ``data/checkpoints/deformable_shapes.pt`` (Deformable DETR), on the bundled val split
   (``data/shapes/val2017``, COCOeval exactly as ``python -m detr_lite.evaluate`` does: each checkpoint's
   val size and batch) and prints their AP tables side by side.
2. Writes annotated predictions for a few val images: boxes with class names and scores, plus what
   each detection looked at, DETR's decoder cross-attention map and Deformable DETR's sampling points
   (``python -m detr_lite.predict --explain``'s pictures), and prints where they are.

The two models run in two processes, one CPU thread each (on a 2-core machine that is faster than
both threads on one model at a time). ``--images N`` (default 3), ``--output DIR`` (default
``runs/demo``), ``--threshold`` (default 0.5; an image with no detection that sure shows its 3 best).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

T_START = time.perf_counter()  # noqa: E402  (the imports below are part of the minute)

import torch  # noqa: E402

from detr_lite.api import SHIPPED  # noqa: E402

MODELS = {"DETR": "detr_shapes", "Deformable DETR": "deformable_shapes"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m detr_lite.demo", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=3, help="val images to draw per model (default 3)")
    p.add_argument("--output", default="runs/demo", help="folder for the pictures (default runs/demo)")
    p.add_argument("--threshold", type=float, default=0.5, help="score of the drawn detections (default 0.5)")
    p.add_argument("--sequential", action="store_true", help="one model after the other, all threads")
    return p


def _job(title: str, name: str, out_dir: str, n_images: int, threshold: float, threads: int | None) -> dict:
    """Evaluate one shipped model on the val split and draw its explanations; returns metrics + paths."""
    if threads:
        torch.set_num_threads(threads)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from torch.utils.data import DataLoader, SequentialSampler

    from detr_lite.api import Detector
    from detr_lite.data.coco import build_dataset, collate_fn
    from detr_lite.engine import evaluate
    from detr_lite.models import build_postprocessor
    from detr_lite.predict import render

    t0, c0 = time.perf_counter(), time.process_time()
    det = Detector.from_checkpoint(name, device="cpu")
    cfg = det.cfg
    root = cfg.data.root if Path(cfg.data.root).is_dir() else str(SHIPPED[name].parent.parent / "shapes")
    dataset = build_dataset(root, cfg.data.val_split, cfg.data, train=False)
    loader = DataLoader(dataset, batch_size=cfg.train.val_batch_size, sampler=SequentialSampler(dataset),
                        collate_fn=collate_fn)  # fmt: skip
    t_load = time.perf_counter()
    metrics = evaluate(det.model, build_postprocessor(cfg.model), loader, dataset.coco, det.device)
    t_eval = time.perf_counter()

    pictures = []
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    image_dir = Path(root) / cfg.data.val_split
    for info in dataset.coco.loadImgs(sorted(dataset.coco.getImgIds())[:n_images]):
        path = image_dir / info["file_name"]
        pil, _ = det.load_image(path)
        why = det.explain(pil, threshold=threshold)
        note = f">= {threshold:g}"
        if len(why.detections) == 0:  # nothing that sure (a weak model): show the 3 best instead
            why = det.explain(pil, threshold=0.0)
            keep = min(3, len(why.detections))
            why = _first(why, keep)
            note = f"the {keep} best; none >= {threshold:g}"
        fig = render(np.asarray(pil), why.detections, why, max_panels=3,
                     title=f"{title}, {path.name}:\n{len(why.detections)} detections ({note})")  # fmt: skip
        out = folder / f"{path.stem}.png"
        fig.savefig(out)
        plt.close(fig)
        pictures.append(str(out))
    t_draw = time.perf_counter()
    return {
        "title": title,
        "checkpoint": str(det.source),
        "val_size": cfg.data.val_size,
        "metrics": {k: metrics[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "num_images")},
        "pictures": pictures,
        "seconds": {"load": t_load - t0, "evaluate": t_eval - t_load, "draw": t_draw - t_eval,
                    "cpu": time.process_time() - c0},  # fmt: skip
    }


def _first(why, k: int):
    """An Explanation cut to its first ``k`` detections."""
    from dataclasses import replace

    d = why.detections
    dets = replace(d, boxes=d.boxes[:k], scores=d.scores[:k], labels=d.labels[:k], names=d.names[:k], queries=d.queries[:k])
    return replace(why, detections=dets, attention=why.attention[:k], locations=why.locations[:k],
                   weights=why.weights[:k], references=why.references[:k])  # fmt: skip


def side_by_side(results: list[dict]) -> str:
    """A Markdown table: one row per model, the six COCO metrics."""
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    lines = ["| model | checkpoint | " + " | ".join(keys) + " |", "|---|---|" + "---:|" * len(keys)]
    for r in results:
        m = r["metrics"]
        cells = ["n/a" if m[k] is None or m[k] < 0 else f"{m[k]:.3f}" for k in keys]
        lines.append(f"| {r['title']} | {Path(r['checkpoint']).name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    print(f"imports took {t0 - T_START:.1f} s", flush=True)
    missing = [str(p) for p in SHIPPED.values() if not p.is_file()]
    if missing:
        raise ValueError(f"shipped checkpoints missing: {', '.join(missing)}")
    jobs = [(title, name, args.output, args.images, args.threshold) for title, name in MODELS.items()]
    parallel = not args.sequential and (os.cpu_count() or 1) >= 2 and "fork" in multiprocessing.get_all_start_methods()
    print(f"evaluating {' and '.join(MODELS)} on data/shapes/val2017"
          f"{' in parallel (2 processes, 1 thread each)' if parallel else ''} ...", flush=True)  # fmt: skip
    if parallel:
        with multiprocessing.get_context("fork").Pool(2) as pool:
            results = pool.starmap(_job, [(*j, 1) for j in jobs])
    else:
        results = [_job(*j, None) for j in jobs]
    wall = time.perf_counter() - t0

    n = results[0]["metrics"]["num_images"]
    print(f"\nCOCO box AP on data/shapes/val2017 ({n} images; each model at its own val size, "
          + ", ".join(f"{r['title']} {r['val_size']}" for r in results) + "):\n")  # fmt: skip
    print(side_by_side(results))
    print("\nannotated predictions (boxes + class names + scores; beside each detection DETR's cross-attention")
    print("map / Deformable DETR's sampling points: colour = head, marker = level, size = weight):")
    for r in results:
        print(f"  {r['title']:16s} " + "  ".join(r["pictures"]))
    Path(args.output).mkdir(parents=True, exist_ok=True)
    summary = Path(args.output) / "demo.json"
    summary.write_text(json.dumps({"wall_s": wall, "parallel": parallel, "models": results}, indent=2) + "\n")
    parts = "; ".join(
        f"{r['title']}: load {r['seconds']['load']:.1f} s, evaluate {r['seconds']['evaluate']:.1f} s, "
        f"draw {r['seconds']['draw']:.1f} s, {r['seconds']['cpu']:.1f} CPU s" for r in results
    )
    print(f"\ndone in {wall:.1f} s after the imports ({parts}); metrics in {summary}")
    print("next: python -m detr_lite.predict YOUR_IMAGES --explain  |  make train (the full ~1 h reproduction)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from detr_lite.utils import cli_main

    return cli_main("detr_lite.demo", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
