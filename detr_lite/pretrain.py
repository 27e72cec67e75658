"""Stage 0 (toy models only): pretrain the backbone on the training split.

Official DETR never trains its ResNet from scratch: it starts from ImageNet weights. Those can't be
downloaded here, and a DETR whose backbone *and* transformer start from random weights sits on a
long plateau (the same boxes for every image; see ``data/checkpoints/detr_shapes_scratch.md``). This module
is the bundled data's stand-in for ImageNet pretraining: a short supervised pretext task that teaches
the ResNet what the shapes look like and where they are, before DETR is trained on top of it.

The pretext is dense, one prediction per backbone cell (stride 16 for the toy C4 backbone):

* ``heat`` ``[B, K, h, w]``: a Gaussian bump at every object centre in its class channel
  (CenterNet's target; sigma = box side / 6, at least 4 px), trained with CenterNet's
  penalty-reduced focal loss;
* ``ltrb`` ``[B, 4, h, w]``: inside each box, the distances from the cell centre to the box's left,
  top, right and bottom sides as fractions of the image width/height (FCOS's target; where boxes
  overlap the smaller box wins), trained with L1.

Padded cells (``mask`` True) are ignored. The head (3x3 conv, ReLU, 1x1 conv) is thrown away; only
the backbone is kept, saved as a checkpoint whose ``'model'`` holds ``backbone.*`` keys that
``python -m detr_lite.train --backbone-weights FILE`` loads into a DETR of the same config.

CLI::

    python -m detr_lite.pretrain --config detr-shapes --output runs/detr-shapes/backbone.pt --epochs 20

(AdamW, constant lr 1e-3. ``--lr-drop N`` divides it by 10 after N epochs: it lowers the pretext's
val loss, yet the DETR on top learns less, as it does after 10 or 30 epochs instead of 20; the
model card's table of recipe choices, ``data/checkpoints/detr_shapes.md``.)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from detr_lite.backbone import _STAGES, Backbone
from detr_lite.checkpoint import backbone_provenance, load_backbone_weights  # noqa: F401 (notebook 06's names)
from detr_lite.config import Config
from detr_lite.utils import seed_everything

HEAT_MIN_SIGMA_PX = 4.0
LTRB_WEIGHT = 5.0


class DenseHead(nn.Module):
    """3x3 conv -> ReLU -> 1x1 conv: ``K`` centre-heatmap logits + 4 ``ltrb`` logits per cell."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 128):
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.out = nn.Conv2d(width, num_classes + 4, 1)
        nn.init.constant_(self.out.bias[:num_classes], -math.log(99.0))  # start at p = 0.01 (CenterNet)

    def forward(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        y = self.out(F.relu(self.conv(feat)))
        return y[:, : self.num_classes], y[:, self.num_classes :].sigmoid()


def dense_targets(
    targets: list[dict[str, Any]], feat_hw: tuple[int, int], image_hw: tuple[int, int], num_classes: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Pretext targets on a ``feat_hw`` grid over a padded ``image_hw`` batch.

    Returns ``heat [B, K, h, w]`` (1 exactly at each object's centre cell), ``ltrb [B, 4, h, w]``
    and ``inside [B, h, w]`` (bool: the cell centre lies in some box, so ``ltrb`` is defined there).
    Boxes come as the data pipeline gives them: normalised cxcywh relative to ``target['size']``.
    """
    h, w = feat_hw
    img_h, img_w = image_hw
    b = len(targets)
    heat = torch.zeros(b, num_classes, h, w)
    ltrb = torch.zeros(b, 4, h, w)
    inside = torch.zeros(b, h, w, dtype=torch.bool)
    ys = ((torch.arange(h) + 0.5) * img_h / h)[:, None]  # cell centres in pixels, [h, 1]
    xs = ((torch.arange(w) + 0.5) * img_w / w)[None, :]  # [1, w]
    for i, t in enumerate(targets):
        boxes = t["boxes"].detach().cpu().float()
        if boxes.numel() == 0:
            continue
        size_h, size_w = (float(v) for v in t["size"])
        cx, cy = boxes[:, 0] * size_w, boxes[:, 1] * size_h
        bw, bh = boxes[:, 2] * size_w, boxes[:, 3] * size_h
        labels = t["labels"].detach().cpu().long()
        for j in torch.argsort(bw * bh, descending=True).tolist():  # small boxes last: they win overlaps
            sx = max(float(bw[j]) / 6, HEAT_MIN_SIGMA_PX)
            sy = max(float(bh[j]) / 6, HEAT_MIN_SIGMA_PX)
            bump = torch.exp(-((xs - cx[j]) ** 2) / (2 * sx * sx) - ((ys - cy[j]) ** 2) / (2 * sy * sy))
            c = int(labels[j])
            heat[i, c] = torch.maximum(heat[i, c], bump)
            ci = min(int(cy[j] / img_h * h), h - 1)
            cj = min(int(cx[j] / img_w * w), w - 1)
            heat[i, c, ci, cj] = 1.0
            left, right = xs - (cx[j] - bw[j] / 2), (cx[j] + bw[j] / 2) - xs
            top, bottom = ys - (cy[j] - bh[j] / 2), (cy[j] + bh[j] / 2) - ys
            box_in = (left >= 0) & (right >= 0) & (top >= 0) & (bottom >= 0)  # [h, w]
            dist = torch.stack(
                [(left / size_w).expand(h, w), (top / size_h).expand(h, w),
                 (right / size_w).expand(h, w), (bottom / size_h).expand(h, w)]
            )  # fmt: skip
            ltrb[i][:, box_in] = dist[:, box_in]
            inside[i] |= box_in
    return heat, ltrb, inside


def pretext_loss(
    heat_logits: Tensor, ltrb_pred: Tensor, heat: Tensor, ltrb: Tensor, inside: Tensor, valid: Tensor
) -> dict[str, Tensor]:
    """CenterNet focal loss on the heatmap (per centre) and L1 on ``ltrb`` (per inside cell)."""
    p = heat_logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    v = valid[:, None].to(p.dtype)
    pos = heat.eq(1).to(p.dtype) * v
    neg = (1 - heat.eq(1).to(p.dtype)) * v
    pos_loss = -(torch.log(p) * (1 - p) ** 2 * pos).sum()
    neg_loss = -(torch.log(1 - p) * p**2 * (1 - heat) ** 4 * neg).sum()
    loss_heat = (pos_loss + neg_loss) / pos.sum().clamp(min=1)
    m = (inside & valid).to(p.dtype)
    loss_ltrb = ((ltrb_pred - ltrb).abs().sum(1) * m).sum() / m.sum().clamp(min=1)
    return {"loss_heat": loss_heat, "loss_ltrb": loss_ltrb, "loss": loss_heat + LTRB_WEIGHT * loss_ltrb}


def _step_loss(backbone: Backbone, head: DenseHead, images, mask, targets) -> dict[str, Tensor]:
    feat, small = backbone(images, mask)[-1]
    heat_logits, ltrb_pred = head(feat)
    heat, ltrb, inside = dense_targets(targets, feat.shape[-2:], images.shape[-2:], head.num_classes)
    return pretext_loss(heat_logits, ltrb_pred, heat, ltrb, inside, ~small)


def pretrain_backbone(
    cfg: Config,
    epochs: int,
    lr: float = 1e-3,
    max_iters: int | None = None,
    log=None,
    lr_drop: int | None = None,
    progress: bool = True,
    layer: str | None = None,
    val_every: int = 1,
    datasets: tuple | None = None,
) -> tuple[Backbone, list[dict[str, float]]]:
    """Train ``cfg``'s backbone (from scratch, all stages) on the pretext for ``epochs`` passes over the
    training split, with the toy training augmentation; returns the backbone and per-epoch metrics
    (train and val pretext losses). ``lr_drop``: from that epoch (0-based) on, the lr is ``lr / 10``.
    ``layer``: the stage the dense head sits on (default: the last of ``cfg.model.backbone_layers``); a
    DETR cut earlier loads this trunk's stages up to its own last one (``load_backbone_weights``).
    ``val_every``: the val losses are computed every that many epochs and after the last (they
    never change the weights: every epoch reseeds the RNGs). ``datasets``: the (train, val) splits,
    if already built (default: read from ``cfg.data``)."""
    from detr_lite.data.loaders import build_loaders

    model_cfg = cfg.model
    layers = (layer,) if layer else (tuple(model_cfg.backbone_layers) or ("layer4",))[-1:]
    backbone = Backbone(
        model_cfg.backbone, return_layers=layers, train_backbone=True, frozen_bn=False,
        dilation=model_cfg.dilation, pretrained=False,
    )  # fmt: skip
    head = DenseHead(backbone.num_channels[-1], model_cfg.num_classes)
    params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4, foreach=True)  # = the CPU loop's weights, faster
    loaders = build_loaders(cfg, datasets, max_iters=max_iters)
    train_loader, val_loader, batches = loaders.train, loaders.val, loaders.batches
    history = []
    for epoch in range(epochs):
        # every RNG the augmentation draws from (RandomSizeCrop uses Python's random, as the official
        # code does): the same seed and data give the same backbone, run after run
        seed_everything(cfg.train.seed + epoch)
        batches.set_epoch(epoch)
        for group in opt.param_groups:
            group["lr"] = lr if lr_drop is None or epoch < lr_drop else lr * 0.1
        backbone.train()
        head.train()
        t0, sums, n = time.perf_counter(), {"loss_heat": 0.0, "loss_ltrb": 0.0}, 0
        bar = tqdm(train_loader, desc=f"pretrain {epoch}", disable=not progress, leave=False)
        for it, (images, mask, targets) in enumerate(bar):
            losses = _step_loss(backbone, head, images, mask, targets)
            if not math.isfinite(float(losses["loss"].detach())):
                raise RuntimeError(f"pretrain: non-finite loss at epoch {epoch} iteration {it}")
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            for k in sums:
                sums[k] += float(losses[k].detach())
            n += 1
        record = {"epoch": epoch, "lr": opt.param_groups[0]["lr"]}
        record.update({f"train_{k}": v / max(n, 1) for k, v in sums.items()})
        record["train_time_s"] = time.perf_counter() - t0
        if (epoch + 1) % val_every == 0 or epoch + 1 == epochs:
            backbone.eval()
            head.eval()
            vs, vn = {"loss_heat": 0.0, "loss_ltrb": 0.0}, 0
            with torch.no_grad():
                for images, mask, targets in val_loader:
                    losses = _step_loss(backbone, head, images, mask, targets)
                    for k in vs:
                        vs[k] += float(losses[k])
                    vn += 1
            record.update({f"val_{k}": v / max(vn, 1) for k, v in vs.items()})
        history.append(record)
        if log is not None:
            log(record)
    backbone.eval()
    return backbone, history


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m detr_lite.pretrain",
        description="Pretrain a toy backbone on a COCO-layout training split (dense centre-heatmap + box-side pretext).",
    )
    p.add_argument("--config", default="detr-shapes", help="preset or config .json (backbone, data settings)")
    p.add_argument("--data", help="COCO-layout root; default: the preset's")
    p.add_argument(
        "--output", required=True, help="backbone checkpoint to write (e.g. runs/detr-shapes/backbone.pt)"
    )
    p.add_argument("--epochs", type=int, default=20, help="passes over the training split (20: the DETR on top learns most)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument(
        "--lr-drop", type=int,
        help="epochs at --lr, then --lr / 10 for the rest (default: --epochs, i.e. no drop)",
    )  # fmt: skip
    p.add_argument(
        "--layer", choices=_STAGES,
        help="backbone stage the pretext head sits on (default: the config's last backbone layer); "
        "a deeper one than the DETR's cut is fine: DETR loads the stages up to its own last",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, help="images per step (default: the config's)")
    p.add_argument(
        "--val-every", type=int, default=5,
        help="val pretext losses every N epochs and after the last (5; 1 = every epoch; weight-neutral)",
    )  # fmt: skip
    p.add_argument("--max-iters-per-epoch", type=int, help="smoke mode: stop each pass after N batches")
    p.add_argument("--threads", type=int, help="torch intra-op CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    from detr_lite.checkpoint import save_checkpoint
    from detr_lite.config import load_config
    from detr_lite.data.coco import build_datasets, resolve_num_classes
    from detr_lite.monitor import write_json_atomic

    if args.epochs < 1:
        raise ValueError(f"--epochs: expected >= 1, got {args.epochs}")
    if args.lr_drop is None:
        args.lr_drop = args.epochs
    if args.val_every < 1:
        raise ValueError(f"--val-every: expected >= 1, got {args.val_every}")
    if not 0 < args.lr_drop <= args.epochs:
        raise ValueError(f"--lr-drop: expected 1..--epochs ({args.epochs}), got {args.lr_drop}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    if args.data is not None:
        cfg.data.root = args.data
    if args.batch_size is not None:
        cfg.train.batch_size = args.batch_size
    if cfg.model.arch != "detr":
        raise ValueError(f"--config {args.config}: pretraining supports arch 'detr', got {cfg.model.arch!r}")
    datasets = build_datasets(cfg.data)
    cut = (tuple(cfg.model.backbone_layers) or ("layer4",))[-1]
    if args.layer is not None and _STAGES.index(args.layer) < _STAGES.index(cut):
        raise ValueError(
            f"--layer {args.layer}: shallower than the config's backbone, which goes up to {cut}; "
            f"DETR would find its {cut} untrained"
        )
    cfg.model.num_classes = resolve_num_classes(datasets[0])
    out = Path(args.output)
    seed_everything(cfg.train.seed)
    t0 = time.perf_counter()

    def log(rec: dict[str, float]) -> None:
        def val(key: str, fmt: str) -> str:
            return f" (val {rec[key]:{fmt}})" if key in rec else ""

        print(
            f"pretrain epoch {rec['epoch'] + 1}/{args.epochs}: heat {rec['train_loss_heat']:.3f}"
            f"{val('val_loss_heat', '.3f')} | ltrb {rec['train_loss_ltrb']:.4f}"
            f"{val('val_loss_ltrb', '.4f')} | {rec['train_time_s']:.1f} s",
            flush=True,
        )

    backbone, history = pretrain_backbone(
        cfg,
        args.epochs,
        lr=args.lr,
        max_iters=args.max_iters_per_epoch,
        log=log,
        progress=not args.no_progress,
        lr_drop=args.lr_drop,
        layer=args.layer,
        val_every=args.val_every,
        datasets=datasets,
    )
    wall = time.perf_counter() - t0
    holder = nn.Module()
    holder.backbone = backbone
    save_checkpoint(
        out, holder, cfg,
        meta={"command": " ".join(["python -m detr_lite.pretrain", *sys.argv[1:]]), "pretrain_wall_time_s": wall,
              "pretext": "centre heatmap (focal) + ltrb (L1)", "epochs": args.epochs, "lr": args.lr,
              "lr_drop": args.lr_drop, "history": history},
    )  # fmt: skip
    write_json_atomic({"history": history, "pretrain_wall_time_s": wall}, out.with_suffix(".json"))
    print(f"backbone: {out} ({wall / 60:.1f} min)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from detr_lite.utils import cli_main

    return cli_main("detr_lite.pretrain", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
