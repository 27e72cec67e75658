"""Inference throughput on CPU: ``Detector.predict`` of both shipped toy models, and ONNX Runtime vs eager.

For each of ``data/checkpoints/detr_shapes.pt`` and ``deformable_shapes.pt``, on the first ``--images``
bundled val images (their own sizes, resized like the val split: short side 160 / 112):

* ``predict, batch 1`` / ``predict, batch 8``: ``Detector.predict(paths)`` end to end (read the PNG,
  convert, resize, normalise, model, post-process) with ``batch_size`` 1 and 8 (a batch holds
  consecutive images of the same resized size, so batches are often shorter);
* ``model, eager`` vs ``model, ONNX Runtime``: the network alone on the preprocessed tensors, one image
  at a time, PyTorch eager vs the ``--dynamic`` ONNX export (``python -m detr_lite.export``) run by ONNX
  Runtime's CPU provider, with the same number of threads; outputs are compared (max abs diff).

Times are the best of ``--repeats`` passes over all images after one warm-up pass (a shared machine
only ever slows a pass down). The exports are written to ``--export-dir`` once and reused (``--fresh``
exports again; exporting Deformable DETR takes one to a few minutes).

    python benchmarks/bench_predict.py                 # 2 threads, 32 images
    python benchmarks/bench_predict.py --threads 1 --images 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from detr_lite.api import Detector  # noqa: E402
from detr_lite.export import export_onnx, onnx_session, run_onnx  # noqa: E402

VAL = ROOT / "data" / "shapes" / "val2017"


def best_rate(fn, n_images: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n_images / best


def bench_model(name: str, files: list[Path], threads: int, repeats: int, export_dir: Path, fresh: bool) -> dict:
    det = Detector.from_checkpoint(name, device="cpu")
    tensors = [det.preprocess(f)[0][None] for f in files]
    out = {"model": name, "arch": det.arch}
    out["predict_b1"] = best_rate(lambda: det.predict(files, batch_size=1), len(files), repeats)
    out["predict_b8"] = best_rate(lambda: det.predict(files, batch_size=8), len(files), repeats)
    out["eager"] = best_rate(lambda: [det.forward(x) for x in tensors], len(files), repeats)

    path = export_dir / f"{name}_dynamic.onnx"
    if fresh or not path.is_file():
        t = time.perf_counter()
        export_onnx(det, path, tensors[0], dynamic=True)
        out["export_s"] = time.perf_counter() - t
    session = onnx_session(path, threads=threads)
    out["onnx"] = best_rate(lambda: [run_onnx(session, x) for x in tensors], len(files), repeats)
    diffs = []
    for x in tensors:
        ref, got = det.forward(x), run_onnx(session, x)
        diffs.append(max(float((ref[k] - got[k]).abs().max()) for k in ("pred_logits", "pred_boxes")))
    out["max_abs_diff"] = max(diffs)
    out["sizes"] = len({tuple(x.shape[-2:]) for x in tensors})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--export-dir", default=str(ROOT / "runs" / "bench_predict"))
    p.add_argument("--fresh", action="store_true", help="export again even if the files exist")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    files = sorted(VAL.glob("*.png"))[: args.images]
    export_dir = Path(args.export_dir)
    rows = [bench_model(n, files, args.threads, args.repeats, export_dir, args.fresh)
            for n in ("detr_shapes", "deformable_shapes")]  # fmt: skip

    print(f"\nimages/s on CPU, {args.threads} threads, {len(files)} val images of data/shapes "
          f"(best of {args.repeats}; torch {torch.__version__})\n")  # fmt: skip
    print("| model | predict, batch 1 | predict, batch 8 | model, eager | model, ONNX Runtime | ORT / eager | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} ({r['sizes']} input sizes) | {r['predict_b1']:.1f} | {r['predict_b8']:.1f} | "
              f"{r['eager']:.1f} | {r['onnx']:.1f} | {r['onnx'] / r['eager']:.2f}x | {r['max_abs_diff']:.1e} |")  # fmt: skip
    for r in rows:
        if "export_s" in r:
            print(f"(exported {r['model']} in {r['export_s']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
