"""Training-step throughput of the full-size COCO models, and what it means for the recipes' hours.

For ``detr-r50-coco`` and ``deformable-detr-r50-coco`` (ResNet-50, random weights: speed does not
depend on them) one optimiser step is timed the way ``detr_lite.engine.train_one_epoch`` takes it:
forward, matcher + set loss (aux losses included), backward, gradient clipping at 0.1, AdamW. The
batches imitate the recipe's training images: per image a short side drawn from the recipe's scales
(480-800), a COCO-like aspect ratio, the long side capped at 1333, padded to the batch with a mask,
and 7 boxes (COCO averages 7.3 per image). The same seeded sequence of batches is used by every mode:

* ``fp32``: PyTorch's defaults (on NVIDIA GPUs convolutions may use TF32; matmuls do not);
* ``bf16``: ``--amp`` (bf16 autocast; the loss in float32);
* ``bf16 + channels_last``: ``--amp --channels-last``;
* (Deformable DETR on CUDA) ``... + msda fast``: the same with the CPU's deformable attention core
  instead of ``grid_sample`` (``MSDeformAttn(implementation="auto")`` picks ``grid_sample`` on CUDA).

A mode whose gradients turn non-finite is reported with the parameter nearest the output that has
them; one whose outputs do, with the first module that produced them.

Printed per architecture and mode: ms per step, images/s, peak memory, the ratio to the ``fp32``
peer of the same run, and the hours one such GPU would need for the recipe's epochs on the 118,287
train2017 images at that speed (model step only: data loading and the per-epoch evaluation come on
top, so it is a lower bound), next to the papers' V100-hours.

Run on a GPU (on a CPU it is a smoke run: short side 128, max 192, 2 timed steps, unless given)::

    python benchmarks/bench_coco_step.py [--device cuda] [--batch 4] [--steps 10] [--warmup 3] [--arch detr]

Measured on one H200 (torch 2.11, 6 timed steps): Deformable DETR 363 ms fp32, 273 ms with bf16 +
channels_last (1.33x; 14.7 images/s, ~112 h for 50 epochs), 486 ms with the CPU's attention core;
DETR 114 ms fp32 (35 images/s), bf16 non-finite gradients by step 3 (docs/COCO_TRAINING.md).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detr_lite.config import get_config  # noqa: E402
from detr_lite.engine import _to_float32, amp_dtype_for, build_optimizer, weighted_loss  # noqa: E402
from detr_lite.models import build_criterion, build_model  # noqa: E402
from detr_lite.official import RECIPES  # noqa: E402

TRAIN2017_IMAGES = 118_287
PRESETS = {"detr": "detr-r50-coco", "deformable_detr": "deformable-detr-r50-coco"}
ASPECTS = (4 / 3, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 1.0)  # long/short; 3/4 = a portrait image


def make_batches(n: int, batch: int, scales: tuple[int, ...], max_size: int, num_classes: int, seed: int = 0):
    """``n`` batches ``(images, mask, targets)`` shaped like the recipe's augmented training batches."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        sizes = []
        for _ in range(batch):
            short, aspect = rng.choice(scales), rng.choice(ASPECTS)
            long = min(max_size, round(short * max(aspect, 1 / aspect)))
            sizes.append((short, long) if aspect >= 1 else (long, short))
        hmax, wmax = max(h for h, _ in sizes), max(w for _, w in sizes)
        images = torch.zeros(batch, 3, hmax, wmax)
        mask = torch.ones(batch, hmax, wmax, dtype=torch.bool)
        targets = []
        for i, (h, w) in enumerate(sizes):
            images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
            mask[i, :h, :w] = False
            wh = torch.rand(7, 2, generator=g) * 0.5 + 0.05
            cxcy = wh / 2 + torch.rand(7, 2, generator=g) * (1 - wh)
            labels = torch.randint(1, num_classes, (7,), generator=g)
            targets.append({"labels": labels, "boxes": torch.cat([cxcy, wh], 1)})
        out.append((images, mask, targets))
    return out


def first_non_finite(model, images, mask, amp_dtype) -> str:
    """Re-run the forward with hooks: the first module (in execution order) whose output is not finite."""
    found: list[str] = []

    def hook(name):
        def check(module, inputs, output):
            outs = output if isinstance(output, (tuple, list)) else [output]
            if not found and any(
                torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all() for t in outs
            ):
                finite_in = all(
                    torch.isfinite(t).all() for t in inputs if torch.is_tensor(t) and t.is_floating_point()
                )
                found.append(f"{name or 'model'} ({type(module).__name__}, inputs finite: {finite_in})")

        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    try:
        with (
            torch.no_grad(),
            torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None),
        ):
            model(images, mask)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else "none on a re-run (non-deterministic)"


def time_mode(arch: str, mode: str, batches, device: torch.device, warmup: int) -> dict:
    cfg = get_config(PRESETS[arch])
    cfg.model.pretrained_backbone = False
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    criterion = build_criterion(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.train)
    channels_last = "channels_last" in mode
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if "msda fast" in mode:  # the deformable attention core the CPU uses, instead of grid_sample
        for m in model.modules():
            if hasattr(m, "implementation"):
                m.implementation = "fast"
    amp_dtype = amp_dtype_for(device, "bf16" in mode)
    if "bf16" in mode and amp_dtype is None and device.type == "cpu":
        amp_dtype = torch.bfloat16  # smoke runs on a CPU: exercise the same code path
    params = [p for p in model.parameters() if p.requires_grad]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, n_images = [], 0
    for i, (images, mask, targets) in enumerate(batches):
        images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(images, mask)
        if not all(torch.isfinite(outputs[k]).all() for k in ("pred_logits", "pred_boxes")):
            where = first_non_finite(model, images, mask, amp_dtype)
            return {"error": f"non-finite outputs at step {i}; first non-finite module output: {where}"}
        loss = weighted_loss(criterion(_to_float32(outputs), targets), criterion.weight_dict)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        bad = [
            n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()
        ]
        if bad:  # parameters in (roughly) forward order: the last bad one is nearest the origin
            return {
                "error": f"non-finite gradients at step {i} ({len(bad)} tensors), nearest the output: {bad[-1]}"
            }
        torch.nn.utils.clip_grad_norm_(params, cfg.train.clip_max_norm)
        optimizer.step()
        sync()
        if not math.isfinite(loss.item()):
            return {"error": f"non-finite loss at step {i}"}
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            n_images += images.shape[0]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    s = sum(times)
    return {"ms_per_step": 1000 * s / len(times), "images_per_s": n_images / s, "peak_gib": peak}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Training-step throughput of the COCO DETR / Deformable DETR R50")
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    p.add_argument("--batch", type=int, default=4, help="images per GPU (both recipes: 4)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--arch", action="append", choices=sorted(PRESETS), help="default: both")
    p.add_argument(
        "--scale", type=int, action="append", help="short sides to draw from (default: the recipe's)"
    )
    p.add_argument("--max-size", type=int, help="long-side cap (default: the recipe's 1333)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        print(f"device: {torch.cuda.get_device_name(device)} | torch {torch.__version__}")
    else:  # a smoke run (make bench runs every script): small images and few steps unless asked
        args.scale = args.scale or [128]
        args.max_size = args.max_size or 192
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        print(
            f"device: cpu ({args.threads} threads) | torch {torch.__version__} | smoke run: numbers mean little"
        )
    for arch in args.arch or sorted(PRESETS):
        modes = ["fp32", "bf16", "bf16 + channels_last"]
        if arch == "deformable_detr" and device.type == "cuda":
            modes.append("bf16 + channels_last + msda fast")
        cfg = get_config(PRESETS[arch])
        scales = tuple(args.scale or cfg.data.train_scales)
        max_size = args.max_size or cfg.data.train_max_size
        batches = make_batches(args.warmup + args.steps, args.batch, scales, max_size, cfg.model.num_classes)
        recipe = RECIPES[arch]
        print(f"\n{PRESETS[arch]}: batch {args.batch}, short side {min(scales)}-{max(scales)}, max {max_size}; "
              f"recipe {recipe.epochs} epochs x {TRAIN2017_IMAGES} images (paper: ~{recipe.v100_hours} V100-h)")  # fmt: skip
        print(
            f"{'mode':34s} {'ms/step':>8s} {'img/s':>7s} {'peak GiB':>8s} {'vs fp32':>7s} {'GPU-h, recipe':>13s}"
        )
        base = None
        for mode in modes:
            r = time_mode(arch, mode, batches, device, args.warmup)
            if "error" in r:
                print(f"{mode:34s} {r['error']}")
                continue
            base = base or r["images_per_s"]
            hours = recipe.epochs * TRAIN2017_IMAGES / r["images_per_s"] / 3600
            print(f"{mode:34s} {r['ms_per_step']:8.1f} {r['images_per_s']:7.1f} {r['peak_gib']:8.2f} "
                  f"{r['images_per_s'] / base:6.2f}x {hours:13.0f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
