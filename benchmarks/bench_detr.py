"""DETR-R50 on CPU: detr_lite vs Hugging Face ``DetrForObjectDetection`` (and optionally the official code).

Measures, at batch 2 x 3 x 512 x 512, fp32, ``torch.set_num_threads(2)``:

* train step = forward + backward of a surrogate loss (mean of logits + mean of boxes; the Hungarian loss
  is benchmarked elsewhere and would add the same cost to every model), train mode, dropout on;
* inference = forward under ``torch.inference_mode()`` in eval mode.

Every model has the official DETR-R50 configuration (91 classes + no-object, 100 queries, 6 + 6 layers,
d 256, FFN 2048, dropout 0.1 on residuals, FFN activations and attention weights, frozen BN) and the same
trainable parameters (ResNet stages 2-4 + everything after the backbone): HF freezes its whole ResNet in
this configuration, so its stages 2-4 are unfrozen here. The models run round-robin (one iteration of
each in turn) so that a change of machine load hits all of them alike; we report the median.

Run: ``python benchmarks/bench_detr.py [--iters 5] [--official /path/to/facebookresearch-detr] [--bf16]``
(HF: ``pip install -e .[bench]``; the official repo is only imported from the given path, never copied.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detr_lite.config import ModelConfig  # noqa: E402
from detr_lite.detr import DETR  # noqa: E402


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_ours() -> tuple[torch.nn.Module, Callable]:
    model = DETR(ModelConfig())

    def run(images):
        out = model(images)
        return out["pred_logits"], out["pred_boxes"]

    return model, run


def build_hf() -> tuple[torch.nn.Module, Callable]:
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    backbone = ResNetConfig(  # torchvision's ResNet-50 layout (stride on the 3x3 conv), C5 output
        embedding_size=64,
        hidden_sizes=[256, 512, 1024, 2048],
        depths=[3, 4, 6, 3],
        layer_type="bottleneck",
        hidden_act="relu",
        downsample_in_first_stage=False,
        out_features=["stage4"],
    )
    cfg = DetrConfig(
        backbone_config=backbone,
        num_queries=100,
        num_labels=91,
        d_model=256,
        encoder_layers=6,
        decoder_layers=6,
        encoder_ffn_dim=2048,
        decoder_ffn_dim=2048,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        dropout=0.1,
        attention_dropout=0.1,
        activation_dropout=0.1,
        auxiliary_loss=False,
    )
    model = DetrForObjectDetection(cfg)
    for name, p in model.model.backbone.named_parameters():  # official: ResNet stages 2-4 train
        if ".stages.1." in name or ".stages.2." in name or ".stages.3." in name:
            p.requires_grad_(True)

    def run(images):
        out = model(pixel_values=images)
        return out.logits, out.pred_boxes

    return model, run


def build_official(path: str) -> tuple[torch.nn.Module, Callable]:
    sys.path.insert(0, path)
    import models.backbone as official_backbone
    from models.detr import build
    from util.misc import NestedTensor

    official_backbone.is_main_process = lambda: False  # never try to download ImageNet weights
    args = argparse.Namespace(
        dataset_file="coco", device="cpu", lr_backbone=1e-5, masks=False, backbone="resnet50",
        dilation=False, position_embedding="sine", hidden_dim=256, dropout=0.1, nheads=8,
        dim_feedforward=2048, enc_layers=6, dec_layers=6, pre_norm=False, num_queries=100,
        aux_loss=True, set_cost_class=1, set_cost_bbox=5, set_cost_giou=2, bbox_loss_coef=5,
        giou_loss_coef=2, eos_coef=0.1, frozen_weights=None,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build(args)[0]

    def run(images):
        mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)
        out = model(NestedTensor(images, mask))
        return out["pred_logits"], out["pred_boxes"]

    return model, run


def time_round_robin(
    runners: dict[str, Callable[[], None]], iters: int, warmup: int
) -> dict[str, tuple[float, float]]:
    """Median (wall seconds, process CPU seconds) per runner. CPU time (all threads of this process) is
    the steadier number on a shared machine: it does not grow while other processes hold the cores."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for i in range(warmup + iters):
        for name, fn in runners.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            if i >= warmup:
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {
        name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
        for name, ts in times.items()
    }


def report(title: str, medians: dict[str, tuple[float, float]]) -> None:
    print(f"\n{title} (median of the timed iterations)")
    for name, (wall, cpu) in medians.items():
        print(f"  {name:12s} wall {wall:7.3f} s   cpu {cpu:7.3f} s")
    peers = {k: v for k, v in medians.items() if k != "detr_lite"}
    if peers:
        ours = medians["detr_lite"]
        for i, kind in enumerate(("wall", "cpu")):
            best = min(peers, key=lambda k: peers[k][i])
            print(
                f"  speed-up of detr_lite vs the faster peer ({best}), {kind} time: {peers[best][i] / ours[i]:.2f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument(
        "--official", default=None, help="path of a facebookresearch/detr checkout (optional)"
    )
    parser.add_argument("--bf16", action="store_true", help="also time CPU bf16 autocast")
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    builders = {"detr_lite": build_ours}
    if not args.skip_hf:
        try:
            import transformers  # noqa: F401

            builders["hf"] = build_hf
        except ImportError:
            print("transformers is not installed (pip install -e .[bench]): HF peer skipped")
    if args.official:
        builders["official"] = lambda: build_official(args.official)
    models = {name: build() for name, build in builders.items()}

    images = torch.randn(2, 3, args.size, args.size)
    print(
        f"DETR-R50, batch {tuple(images.shape)}, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    for name, (model, _) in models.items():
        total = sum(p.numel() for p in model.parameters())
        print(f"  {name:12s} parameters {total / 1e6:.2f} M, trainable {trainable(model) / 1e6:.2f} M")

    def train_step(model, run, dtype=None):
        def step():
            model.train()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                logits, boxes = run(images)
            (logits.float().mean() + boxes.float().mean()).backward()
            model.zero_grad(set_to_none=True)

        return step

    def infer(model, run, dtype=None):
        def step():
            model.eval()
            with (
                torch.inference_mode(),
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None),
            ):
                run(images)

        return step

    report(
        "train step: forward + backward",
        time_round_robin({n: train_step(m, r) for n, (m, r) in models.items()}, args.iters, args.warmup),
    )
    report(
        "inference",
        time_round_robin({n: infer(m, r) for n, (m, r) in models.items()}, args.iters, args.warmup),
    )
    if args.bf16:
        report(
            "train step, CPU bf16 autocast",
            time_round_robin(
                {n: train_step(m, r, torch.bfloat16) for n, (m, r) in models.items()}, args.iters, 1
            ),
        )
        report(
            "inference, CPU bf16 autocast",
            time_round_robin({n: infer(m, r, torch.bfloat16) for n, (m, r) in models.items()}, args.iters, 1),
        )


if __name__ == "__main__":
    main()
