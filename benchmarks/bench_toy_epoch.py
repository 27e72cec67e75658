"""Toy Deformable DETR vs toy DETR: time per training step and epoch, and where the step goes.

Both presets (``deformable-shapes`` and ``detr-shapes``) train on the same bundled data, with the same
batch, backbone freezing rule (frozen BatchNorm, layer2-3 fine-tuned) and training image sizes. This
script runs ``--steps`` training steps of each on the *same* batches (alternating models so that a
busy machine slows both alike), after a warm-up, and prints

* ms per step and the per-epoch estimate (steps per epoch x ms per step) of each, and their ratio;
* where each step goes: data, backbone forward, encoder forward (MSDA forward inside it, for
  Deformable), decoder forward, heads, matcher, set loss, backward (MSDA backward inside it),
  gradient clipping, AdamW.

Stages inside the forward are timed with module hooks; the MSDA backward with a wrapper around the
fast path's ``backward``. The weights are random (the time of a step does not depend on them).
Run: ``python benchmarks/bench_toy_epoch.py [--steps 30] [--threads 2]``
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detr_lite.config import get_config  # noqa: E402
from detr_lite.data.loaders import build_loaders  # noqa: E402
from detr_lite.deformable import msda, msda_fast  # noqa: E402
from detr_lite.engine import build_optimizer, weighted_loss  # noqa: E402
from detr_lite.models import build_criterion, build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    """Seconds per named stage, summed; ``span(name)`` pairs of hooks time a module's forward."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self._open: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.sums[name] += now - self.t
        self.t = now

    def hook(self, module: torch.nn.Module, name: str) -> None:
        module.register_forward_pre_hook(lambda *_: self._open.__setitem__(name, time.perf_counter()))
        module.register_forward_hook(
            lambda *_: self.sums.__setitem__(name, self.sums[name] + time.perf_counter() - self._open[name])
        )


def _timed_msda(clock: Clock):
    """Wrap the MSDA fast path's forward and backward so their time is summed in ``clock``."""
    fn = msda_fast._MSDeformAttnFunction
    fwd, bwd = fn.forward, fn.backward

    def forward(ctx, *args):
        t = time.perf_counter()
        out = fwd(ctx, *args)
        clock.sums["  (MSDA core forward)"] += time.perf_counter() - t
        return out

    def backward(ctx, *args):
        t = time.perf_counter()
        out = bwd(ctx, *args)
        clock.sums["  (MSDA core backward)"] += time.perf_counter() - t
        return out

    fn.forward, fn.backward = staticmethod(forward), staticmethod(backward)


def setup(name: str, clock: Clock, implementation: str | None = None):
    cfg = get_config(name)
    cfg.data.root = str(ROOT / "data" / "shapes")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.train()
    if implementation is not None:  # the MSDA core of every deformable attention module
        for module in model.modules():
            if isinstance(module, msda.MSDeformAttn):
                module.implementation = implementation
    criterion = build_criterion(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    params = [p for p in model.parameters() if p.requires_grad]
    clock.hook(model.backbone, "backbone forward")
    clock.hook(model.transformer.encoder, "encoder forward")
    clock.hook(model.transformer.decoder, "decoder forward")
    clock.hook(criterion.matcher, "matcher")
    return cfg, model, criterion, optimizer, params


def step(cfg, model, criterion, optimizer, params, batch, clock: Clock) -> None:
    images, mask, targets = batch
    clock.t = time.perf_counter()
    outputs = model(images, mask)
    clock.lap("forward (all)")
    loss = weighted_loss(criterion(outputs, targets), criterion.weight_dict)
    clock.lap("matcher + set loss")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clock.lap("backward")
    torch.nn.utils.clip_grad_norm_(params, cfg.train.clip_max_norm)
    optimizer.step()
    clock.lap("grad clip + AdamW")


def report(name: str, clock: Clock, steps: int, steps_per_epoch: int) -> float:
    s = {k: v / steps for k, v in clock.sums.items()}
    total = s["data"] + s["forward (all)"] + s["matcher + set loss"] + s["backward"] + s["grad clip + AdamW"]
    rows = [
        ("data", s["data"]),
        ("backbone forward", s["backbone forward"]),
        ("encoder forward", s["encoder forward"]),
        ("decoder forward", s["decoder forward"]),
        ("rest of the forward (projections, PE, heads)",
         s["forward (all)"] - s["backbone forward"] - s["encoder forward"] - s["decoder forward"]),
        ("matcher", s["matcher"]),
        ("set loss (without the matcher)", s["matcher + set loss"] - s["matcher"]),
        ("backward", s["backward"]),
        ("grad clip + AdamW", s["grad clip + AdamW"]),
    ]  # fmt: skip
    print(f"{name}: {1000 * total:.1f} ms per step, {steps_per_epoch} steps per epoch "
          f"-> {total * steps_per_epoch:.0f} s per epoch (training only)")  # fmt: skip
    for label, sec in rows:
        print(f"  {label:46s} {1000 * sec:7.1f} ms {100 * sec / total:5.1f} %")
    for label in ("  (MSDA core forward)", "  (MSDA core backward)"):
        if label in s:
            print(f"  {label:46s} {1000 * s[label]:7.1f} ms {100 * s[label] / total:5.1f} %")
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per model (after 5 warm-up steps)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the recipes use 2)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    # (label, preset, MSDA core): the Deformable step with each core, the DETR step as the peer
    peers = (
        ("detr-shapes", "detr-shapes", None),
        ("deformable-shapes (MSDA fast path)", "deformable-shapes", "fast"),
        ("deformable-shapes (MSDA grid_sample reference)", "deformable-shapes", "reference"),
    )
    clocks = {label: Clock() for label, _, _ in peers}
    runs = {label: setup(name, clocks[label], impl) for label, name, impl in peers}
    _timed_msda(clocks[peers[1][0]])
    cfg = runs[peers[0][0]][0]
    loader = build_loaders(cfg).train
    steps_per_epoch = len(loader)
    batches = iter(loader)
    warmup = 5
    for i in range(warmup + a.steps):
        t = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        data_time = time.perf_counter() - t
        for label in clocks:
            if i == warmup:
                clocks[label].sums.clear()
            clocks[label].sums["data"] += data_time
            step(*runs[label], batch, clocks[label])
    print(f"{a.steps} training steps per model on the same batches of data/shapes train2017, batch "
          f"{cfg.train.batch_size}, {a.threads} threads, random weights\n")  # fmt: skip
    totals = {label: report(label, clocks[label], a.steps, steps_per_epoch) for label in clocks}
    print()
    detr = totals[peers[0][0]]
    for label, _, _ in peers[1:]:
        ratio = totals[label] / detr
        assert math.isfinite(ratio)
        print(f"per-epoch time ratio {label} / detr-shapes: {ratio:.2f}x")


if __name__ == "__main__":
    main()
