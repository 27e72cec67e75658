"""Export a detector to ONNX: ``python -m detr_lite.export --checkpoint FILE --format onnx [--dynamic]``.

Examples::

    python -m detr_lite.export --checkpoint data/checkpoints/detr_shapes.pt --format onnx --dynamic
    python -m detr_lite.export --checkpoint deformable_shapes --format onnx --dynamic --output m.onnx

The graph maps a normalised image batch ``images [B, 3, H, W]`` (float32, ImageNet mean/std, resized
like the val split, no padding) to ``pred_logits [B, Q, K]`` and ``pred_boxes [B, Q, 4]`` (normalised
cxcywh), the model's final-layer outputs; post-processing (``Detector.postprocess``) stays outside.
It is traced with ``torch.export`` (``torch.onnx.export(dynamo=True)``): pure tensor ops, no Python
value read back from a tensor. Deformable DETR's level sizes are kept symbolic (its transformer passes
them as a list of sizes; its attention samples with a tensor-only gather while exporting,
``detr_lite/deformable/msda_export.py``), so ``--dynamic`` (any B, H, W in [32, 2048]) works for both.
Without ``--dynamic`` the graph has the example image's size (the first bundled val image at the
checkpoint's val size, or ``--size H W``).

After writing, ONNX Runtime is checked against PyTorch on ``--check N`` bundled val images (each at
its own val size; with ``--dynamic`` also at a second, larger size) and the max abs differences are
printed; the exit status is 1 if one exceeds ``--tolerance`` (1e-4). A ``.json`` beside the file
records the arch, input normalisation, val sizes and class names. Needs ``pip install -e ".[onnx]"``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VAL_IMAGES = Path(__file__).resolve().parent.parent / "data" / "shapes" / "val2017"
DYNAMIC_RANGE = (32, 2048)
TRACE_MIN_SIDE = 160


class ExportWrapper(nn.Module):
    """``images [B, 3, H, W]`` -> ``(pred_logits, pred_boxes)``: the model without dicts or aux outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(images)
        return out["pred_logits"], out["pred_boxes"]


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ValueError(
            f"ONNX export needs onnx, onnxscript and onnxruntime ({e.name} is missing): pip install -e \".[onnx]\""
        ) from None


def export_onnx(detector, path: str | Path, example: Tensor, dynamic: bool = False, opset: int = 18) -> Path:
    """Write ``detector``'s model as ONNX to ``path`` (see module docstring); returns the path.

    ``example`` ``[1, 3, H, W]`` is the traced input (its size is the graph's size unless ``dynamic``).
    The model is exported on CPU in float32 (``MSDeformAttn`` then takes its export path).
    """
    _require_onnx()
    from torch.export import Dim

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportWrapper(detector.model).to("cpu").float().eval()
    dynamic_shapes = None
    if dynamic:
        # torch.export fixes any dimension whose example size is 1: trace a batch of two, and an image
        # big enough for every pyramid level to have >= 2 cells per side (stride 64: > 128 pixels)
        h, w = example.shape[-2:]
        if min(h, w) < TRACE_MIN_SIDE:
            scale = TRACE_MIN_SIDE / min(h, w)
            example = F.interpolate(example, size=(round(h * scale), round(w * scale)), mode="bilinear")
        example = example.expand(max(2, example.shape[0]), -1, -1, -1).contiguous()
        lo, hi = DYNAMIC_RANGE
        dynamic_shapes = {"images": {0: Dim("batch", min=1, max=64), 2: Dim("height", min=lo, max=hi),
                                     3: Dim("width", min=lo, max=hi)}}  # fmt: skip
    # the exporter prints its progress on stdout and warns about every fx pass: keep the console clean
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            (example.to("cpu").float(),),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=["images"],
            output_names=["pred_logits", "pred_boxes"],
            opset_version=opset,
            verbose=False,
        )
        program.save(str(path))
    detector.model.to(detector.device)
    return path


def onnx_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session for an exported file (``threads``: intra-op threads, default ORT's)."""
    _require_onnx()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx(session, images: Tensor) -> dict[str, Tensor]:
    """Run an exported detector on ``images [B, 3, H, W]`` -> ``{'pred_logits', 'pred_boxes'}`` tensors."""
    logits, boxes = session.run(None, {"images": images.detach().cpu().float().numpy()})
    return {"pred_logits": torch.from_numpy(logits), "pred_boxes": torch.from_numpy(boxes)}


def parity(detector, session, images: list[Tensor]) -> list[dict]:
    """Max abs difference of ONNX Runtime vs PyTorch outputs, one dict per input ``[1, 3, H, W]``."""
    rows = []
    for x in images:
        ref = detector.forward(x)
        got = run_onnx(session, x)
        rows.append(
            {
                "size": tuple(x.shape[-2:]),
                "logits": float((got["pred_logits"] - ref["pred_logits"].cpu()).abs().max()),
                "boxes": float((got["pred_boxes"] - ref["pred_boxes"].cpu()).abs().max()),
            }
        )
    return rows


def check_inputs(detector, n: int, dynamic: bool, size: tuple[int, int] | None) -> list[Tensor]:
    """``n`` bundled val images at the val size (resized to ``size`` for a static graph); with
    ``dynamic`` each also at 1.25x (a second size the graph was not traced at)."""
    files = sorted(VAL_IMAGES.glob("*.png"))[:n]
    out = []
    for f in files:
        x = detector.preprocess(f)[0][None]
        if size is not None:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        out.append(x)
        if dynamic:
            h, w = x.shape[-2:]
            out.append(F.interpolate(x, size=(round(h * 1.25), round(w * 1.25)), mode="bilinear", align_corners=False))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m detr_lite.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="detr_lite checkpoint, shipped name (detr_shapes, deformable_shapes) or official file")  # fmt: skip
    p.add_argument("--arch", help="official files only (default: read from the weights)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format (onnx)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width")
    p.add_argument("--output", help="output file (default: runs/exports/<checkpoint name>[_dynamic].onnx)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="traced input size (default: the first bundled val image at the val size)")  # fmt: skip
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--check", type=int, default=4, metavar="N", help="val images for the parity check (0: skip)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference allowed (default 1e-4)")
    p.add_argument("--threads", type=int, help="torch intra-op CPU threads")
    return p


def run(args: argparse.Namespace) -> int:
    from detr_lite.api import Detector

    _require_onnx()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    det = Detector.from_checkpoint(args.checkpoint, arch=args.arch, device="cpu")
    size = tuple(args.size) if args.size else None
    if size is not None and min(size) < DYNAMIC_RANGE[0]:
        raise ValueError(f"--size: expected H, W >= {DYNAMIC_RANGE[0]}, got {size}")
    example = check_inputs(det, 1, False, size)[0]
    stem = Path(det.source).stem
    out = Path(args.output or f"runs/exports/{stem}{'_dynamic' if args.dynamic else ''}.onnx")
    t0 = time.perf_counter()
    export_onnx(det, out, example, dynamic=args.dynamic, opset=args.opset)
    meta = {
        "arch": det.arch,
        "source": det.source,
        "input": "images [B, 3, H, W] float32, RGB / 255 normalised with mean/std, no padding",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "val_size": det.cfg.data.val_size,
        "val_max_size": det.cfg.data.val_max_size,
        "dynamic": bool(args.dynamic),
        "traced_size": list(example.shape[-2:]),
        "outputs": {"pred_logits": "[B, Q, K] (DETR: softmax, last = no object; Deformable: sigmoid)",
                    "pred_boxes": "[B, Q, 4] normalised (cx, cy, w, h)"},
        "class_names": {str(k): v for k, v in sorted(det.class_names.items())},
    }  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {det.arch}, "
          f"{'dynamic B, H, W' if args.dynamic else 'static ' + 'x'.join(map(str, example.shape))}) "
          f"in {time.perf_counter() - t0:.1f} s; metadata in {out.with_suffix('.json')}")  # fmt: skip
    if args.check <= 0:
        return 0
    session = onnx_session(out)
    rows = parity(det, session, check_inputs(det, args.check, args.dynamic, None if args.dynamic else tuple(example.shape[-2:])))
    worst = max(max(r["logits"], r["boxes"]) for r in rows)
    sizes = sorted({r["size"] for r in rows})
    print(f"ONNX Runtime vs PyTorch on {len(rows)} inputs from {VAL_IMAGES.parent.name}/{VAL_IMAGES.name} "
          f"(sizes {', '.join(f'{h}x{w}' for h, w in sizes)}): max |diff| logits "
          f"{max(r['logits'] for r in rows):.2e}, boxes {max(r['boxes'] for r in rows):.2e}")  # fmt: skip
    if worst > args.tolerance:
        print(f"detr_lite.export: parity check failed: {worst:.2e} > tolerance {args.tolerance:g}", file=sys.stderr)
        return 1
    print(f"parity OK (<= {args.tolerance:g})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from detr_lite.utils import cli_main

    return cli_main("detr_lite.export", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
