"""Where one training step of the toy DETR (``detr-shapes``) spends its time, and its levers.

The shipped recipe trains DETR on a pretrained backbone whose layer2-3 it fine-tunes; its run is
~25k of these steps (90 epochs), so a faster step means more epochs in the same time. The step is split into its
stages (data loading + augmentation in the main process, forward, matcher + set loss, backward,
gradient clipping, AdamW), each timed with a wall clock over ``--steps`` steps after a warm-up; the
backbone's share of the forward is timed (without gradients) on the same batches. Peers in the same
run:

* the recipe's step (layer2-3 fine-tuned, as official DETR fine-tunes its ImageNet ResNet) vs the
  same step with the whole backbone frozen (the previous recipe: 1.3-1.75x faster per step depending
  on the host, but it learned far more slowly per epoch: data/checkpoints/detr_shapes.md);
* backbone forward in float32 vs under CPU bfloat16 autocast (not used by the recipe: bf16 results
  differ between CPUs and CI replays notebook outputs; the speed-up needs native bf16 units);
* images/s of the whole step at batch 4 (the recipe) vs batch 16.

The backbone weights are the shipped checkpoint's (``data/checkpoints/detr_shapes.pt``); no training
result depends on this script. Run: ``python benchmarks/bench_train_step.py [--steps 60] [--threads 2]``
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detr_lite.config import get_config  # noqa: E402
from detr_lite.engine import build_optimizer, weighted_loss  # noqa: E402
from detr_lite.models import build_criterion, build_model  # noqa: E402
from detr_lite.pretrain import load_backbone_weights  # noqa: E402
from detr_lite.train import build_loaders  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "data" / "checkpoints" / "detr_shapes.pt"


def _setup(batch_size: int, train_backbone: bool | None = None):
    """The detr-shapes model on the shipped backbone weights (``train_backbone``: override the preset's
    choice; with FrozenBatchNorm2d, True trains layer2-3), its criterion, optimiser and trainable params."""
    cfg = get_config("detr-shapes")
    cfg.data.root = str(ROOT / "data" / "shapes")
    cfg.train.batch_size = batch_size
    if train_backbone is not None:
        cfg.model.train_backbone = train_backbone
        if train_backbone and cfg.train.lr_backbone <= 0:
            cfg.train.lr_backbone = cfg.train.lr / 10  # the official ratio
    torch.manual_seed(0)
    model = build_model(cfg.model)
    load_backbone_weights(model, CKPT)
    model.train()
    criterion = build_criterion(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    params = [p for p in model.parameters() if p.requires_grad]
    return cfg, model, criterion, optimizer, params


class _Laps:
    """Wall-clock seconds per named stage, summed over steps."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.t = time.perf_counter()

    def start(self) -> None:
        self.t = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.sums[name] += now - self.t
        self.t = now


def _optimise(lap: _Laps, cfg, model, criterion, optimizer, params, outputs, targets) -> None:
    """The rest of a training step after the forward: set loss, backward, clip, AdamW (each lapped)."""
    loss = weighted_loss(criterion(outputs, targets), criterion.weight_dict)
    lap("matcher + set loss")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    lap("backward")
    torch.nn.utils.clip_grad_norm_(params, cfg.train.clip_max_norm)
    lap("grad clip")
    optimizer.step()
    lap("AdamW step")


def run_steps(batch_size: int, steps: int, warmup: int = 10, train_backbone: bool | None = None) -> tuple[dict[str, float], int]:
    """Mean seconds per stage over ``steps`` training steps (after ``warmup``), and images seen."""
    cfg, model, criterion, optimizer, params = _setup(batch_size, train_backbone)
    loader = build_loaders(cfg)[2]

    def forever():
        while True:  # a new pass (new augmentation) whenever the loader is exhausted
            yield from loader

    batches = forever()
    lap = _Laps()
    n_images = 0
    for i in range(warmup + steps):
        if i == warmup:
            lap.sums.clear()
            n_images = 0
        lap.start()
        images, mask, targets = next(batches)
        lap("data + augmentation")
        outputs = model(images, mask)
        lap("forward (backbone + transformer + heads)")
        _optimise(lap, cfg, model, criterion, optimizer, params, outputs, targets)
        n_images += images.shape[0]
        with torch.no_grad():  # not part of the step: the backbone's share of the forward
            model.backbone(images, mask)
        lap("(backbone forward alone, no grad)")
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model.backbone(images, mask)
        lap("(same, bf16 autocast)")
    return {k: v / steps for k, v in lap.sums.items()}, n_images


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="timed steps per batch size (after 10 warm-up steps)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the recipe uses 2)")
    a = p.parse_args()
    if not CKPT.is_file():
        raise SystemExit(f"{CKPT}: shipped checkpoint not found (it provides the backbone weights)")
    torch.set_num_threads(a.threads)
    stages, n4 = run_steps(4, a.steps)
    step = sum(v for k, v in stages.items() if not k.startswith("("))
    print(f"detr-shapes training step, batch 4, {a.threads} threads, mean of {a.steps} steps:")
    for name, sec in stages.items():
        share = "" if name.startswith("(") else f"{100 * sec / step:5.1f} % of the step"
        print(f"  {name:42s} {1000 * sec:7.1f} ms  {share}")
    print(f"  {'step total':42s} {1000 * step:7.1f} ms  -> {4 / step:.1f} images/s")
    fp32, bf16 = stages["(backbone forward alone, no grad)"], stages["(same, bf16 autocast)"]
    print(f"backbone forward (no grad): fp32 {1000 * fp32:.1f} ms vs bf16 autocast {1000 * bf16:.1f} ms "
          f"({fp32 / bf16:.2f}x)")  # fmt: skip
    recipe_trains = get_config("detr-shapes").model.train_backbone
    names = {False: "backbone frozen", True: "layer2-3 fine-tuned"}
    stages_o, _ = run_steps(4, a.steps, train_backbone=not recipe_trains)
    step_o = sum(v for k, v in stages_o.items() if not k.startswith("("))
    print(f"whole step, batch 4: {names[recipe_trains]} (the recipe) {1000 * step:.1f} ms vs "
          f"{names[not recipe_trains]} {1000 * step_o:.1f} ms ({step_o / step:.2f}x the recipe's time)")  # fmt: skip
    stages16, n16 = run_steps(16, max(10, a.steps // 4))
    step16 = sum(v for k, v in stages16.items() if not k.startswith("("))
    print(f"whole step: batch 4 {4 / step:.1f} images/s vs batch 16 {16 / step16:.1f} images/s "
          f"({(16 / step16) / (4 / step):.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
