"""Detect objects in your images: ``python -m detr_lite.predict IMAGE_OR_FOLDER... [options]``.

Examples::

    python -m detr_lite.predict data/shapes/val2017/000001.png
    python -m detr_lite.predict my_photos/ --checkpoint data/checkpoints/deformable_shapes.pt --explain
    python -m detr_lite.predict img.jpg --checkpoint detr-r50-e632da11.pth --threshold 0.7 --json

Writes one annotated PNG per image into ``--output`` (boxes with class names and scores; with
``--explain`` one more panel per detection: DETR's decoder cross-attention map, or Deformable DETR's
sampling points, colour = head, marker = level, size = weight) and ``detections.json`` there, every
detection in COCO results format (``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``, plus
``file_name``); ``image_id`` is the file name's number when it is one (``000001.png`` -> 1, as in COCO
folders), else the image's position in the list (1, 2, ...). ``--json`` also prints that JSON.

A file that cannot be read gets one error line and the others are still processed; the exit status
is then 1 and the count is reported. ``--checkpoint`` takes anything ``Detector.from_checkpoint`` does:
a detr_lite checkpoint, ``detr_shapes`` / ``deformable_shapes`` (the shipped ones), or an official DETR /
Deformable DETR file (``--arch`` if its arch cannot be read from it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

DEFAULT_CHECKPOINT = "detr_shapes"
MIN_SIDE_PX = 360  # small images are drawn enlarged, so captions stay readable


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m detr_lite.predict", description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders of images")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="detr_lite checkpoint, a shipped name (detr_shapes, deformable_shapes) or an "
                        "official DETR / Deformable DETR file (default: detr_shapes)")  # fmt: skip
    p.add_argument("--arch", help="official files only: e.g. detr_r50_dc5 (default: read from the weights)")
    p.add_argument("--threshold", type=float, default=0.5, help="minimum score of a detection (default 0.5)")
    p.add_argument("--output", default="runs/predictions", help="folder for the PNGs and detections.json (default runs/predictions)")
    p.add_argument("--explain", action="store_true",
                   help="draw each detection's attention map (DETR) / sampling points (Deformable DETR)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="also print the detections JSON on stdout")
    p.add_argument("--max-panels", type=int, default=6, help="--explain: detections drawn per image (default 6)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--threads", type=int, help="torch intra-op CPU threads")
    return p


# ------------------------------------------------------------------------------------------- drawing
def _figure(h: int, w: int, cols: int = 1, rows: int = 1):
    import matplotlib.pyplot as plt

    scale = max(1.0, MIN_SIDE_PX / max(h, w))
    panel_w, panel_h = w * scale / 100, h * scale / 100
    fig, axes = plt.subplots(rows, cols, figsize=(panel_w * cols, panel_h * rows + 0.3 * rows), dpi=100, squeeze=False)
    return fig, axes


def draw_detections(ax, rgb: np.ndarray, det, title: str | None = None) -> None:
    """The image with every detection's box, captioned "name score" (colour by class)."""
    from detr_lite import viz

    viz.show_image(rgb, ax=ax, title=title)
    viz.draw_boxes(ax, det.boxes, labels=det.labels, scores=det.scores,
                   class_names={int(c): n for c, n in zip(det.labels.tolist(), det.names)})  # fmt: skip


def render(rgb: np.ndarray, det, explanation=None, max_panels: int = 6, title: str | None = None):
    """A figure: the image with its detections; with an ``Explanation``, one more panel per detection
    (at most ``max_panels``; a query listed under several classes once) showing its attention map or
    sampling points."""
    from detr_lite import viz

    h, w = rgb.shape[:2]
    # one panel per query: Deformable DETR may list a query under several classes (same points)
    shown, seen = [], set()
    for i, q in enumerate(det.queries.tolist()):
        if q not in seen:
            seen.add(q)
            shown.append(i)
    n = 0 if explanation is None else min(len(shown), max_panels)
    cols = min(n + 1, 4)
    rows = -(-(n + 1) // cols)
    fig, axes = _figure(h, w, cols, rows)
    draw_detections(axes[0, 0], rgb, det, title=title or f"{len(det)} detections")
    for panel, i in enumerate(shown[:n]):
        ax = axes.flat[panel + 1]
        color = viz.COLORS[int(det.labels[i]) % len(viz.COLORS)]
        viz.show_image(rgb, ax=ax)
        if explanation.kind == "attention":
            ax.imshow(explanation.attention[i].numpy(), cmap=viz.ATTENTION_CMAP, alpha=0.6,
                      extent=explanation.extent, interpolation="bilinear")  # fmt: skip
            what = "cross-attention"
        else:
            viz.draw_sampling_points(ax, explanation.locations[i], explanation.weights[i],
                                     reference=explanation.references[i], max_marker=40.0)  # fmt: skip
            what = "sampling points"
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        viz.draw_boxes(ax, det.boxes[i : i + 1], colors=[color])
        ax.set_title(f"{det.names[i]} {float(det.scores[i]):.2f}: {what}", fontsize=7, color=color)
    for ax in list(axes.flat)[n + 1 :]:
        ax.axis("off")
    if explanation is not None and explanation.kind == "sampling" and n:
        fig.text(0.5, 0.005, "colour = head, marker = level (o s ^ D: fine -> coarse), size = weight, "
                 "star = reference point", ha="center", va="bottom", fontsize=6)  # fmt: skip
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------- run
def image_id_for(path: Path, position: int) -> int:
    """``000123.png`` -> 123 (COCO folders name files by id), anything else -> ``position``."""
    return int(path.stem) if path.stem.isdigit() else position


def run(args: argparse.Namespace) -> int:
    if "MPLBACKEND" not in os.environ:
        import matplotlib

        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from detr_lite.api import Detector, list_images

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold: expected a score in [0, 1], got {args.threshold}")
    missing = [p for p in args.inputs if not Path(p).exists()]
    paths = list_images([p for p in args.inputs if Path(p).exists()])
    if not paths and not missing:
        raise ValueError(f"no images found in {' '.join(args.inputs)}")
    det = Detector.from_checkpoint(args.checkpoint, arch=args.arch, device=args.device)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)

    failed = 0
    for p in missing:
        print(f"detr_lite.predict: error: {p}: no such file or folder", file=sys.stderr)
        failed += 1
    results, used_names = [], set()
    for position, path in enumerate(paths, start=1):
        try:
            pil, _ = det.load_image(path)
        except ValueError as e:
            print(f"detr_lite.predict: error: {e}", file=sys.stderr)
            failed += 1
            continue
        if args.explain:
            explanation = det.explain(pil, threshold=args.threshold)
            found = explanation.detections
        else:
            explanation, found = None, det.predict(pil, threshold=args.threshold)
        image_id = image_id_for(path, position)
        for record in found.to_coco(image_id):
            results.append({**record, "file_name": path.name})
        name = path.stem
        k = 2
        while name in used_names:  # same file name in two folders
            name = f"{path.stem}_{k}"
            k += 1
        used_names.add(name)
        fig = render(np.asarray(pil), found, explanation, max_panels=args.max_panels,
                     title=f"{path.name}: {len(found)} detections >= {args.threshold:g}")  # fmt: skip
        fig.savefig(out_dir / f"{name}.png")
        plt.close(fig)
        shown = ", ".join(f"{n} {float(s):.2f}" for n, s in zip(found.names[:6], found.scores[:6]))
        print(f"{path}: {len(found)} detections{': ' + shown if shown else ''}{' ...' if len(found) > 6 else ''}",
              file=sys.stderr if args.json else sys.stdout)  # fmt: skip

    json_path = out_dir / "detections.json"
    json_text = "[\n" + ",\n".join(json.dumps(r) for r in results) + "\n]" if results else "[]"
    json_path.write_text(json_text + "\n")
    n_ok = len(paths) + len(missing) - failed
    summary = (
        f"{n_ok} images, {len(results)} detections (score >= {args.threshold:g}, {det.arch} from "
        f"{det.source}): annotated PNGs in {out_dir}/, COCO results in {json_path}"
    )
    if args.json:
        print(json_text)
    print(summary, file=sys.stderr if args.json else sys.stdout)
    if failed:
        print(f"detr_lite.predict: {failed} of {len(paths) + len(missing)} inputs could not be read", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from detr_lite.utils import cli_main

    return cli_main("detr_lite.predict", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
