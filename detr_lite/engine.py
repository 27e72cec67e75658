"""The training loop and COCO evaluation: ``train_one_epoch`` and ``evaluate``.

One training iteration is the whole DETR recipe in five lines::

    outputs = model(images, mask)                       # pred_logits, pred_boxes, aux_outputs
    loss_dict = criterion(outputs, targets)             # unweighted terms (+ class_error, ...)
    loss = sum(loss_dict[k] * w for k, w in criterion.weight_dict.items() if k in loss_dict)
    loss.backward(); clip_grad_norm_(params, clip_max_norm); optimizer.step()

Everything else here is bookkeeping: mixed precision on CUDA, metrics averaged over processes,
a JSONL record per iteration, a stop with a clear message on a non-finite loss, and COCO AP via
pycocotools on the dataset's own ground truth.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torchvision.ops import box_convert
from tqdm.auto import tqdm

from detr_lite.config import TrainConfig
from detr_lite.distributed import all_gather_object, all_reduce_mean, get_world_size, unwrap_model
from detr_lite.utils import AP_KEYS

BACKBONE_KEYWORDS = ("backbone",)
# Deformable DETR trains the layers that predict sampling locations 10x slower (official recipe).
LINEAR_PROJ_KEYWORDS = ("sampling_offsets", "reference_points")


class NonFiniteLossError(RuntimeError):
    """The loss (or, from a finite loss, the gradients) became NaN/inf; the message names the epoch,
    iteration and every loss term (or the parameter nearest the output with a non-finite gradient)."""


# --------------------------------------------------------------------------------------------
# optimiser
# --------------------------------------------------------------------------------------------
def _matches(name: str, keywords: Iterable[str]) -> bool:
    return any(k in name for k in keywords)


def build_param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Three AdamW groups: transformer/heads at ``lr``, backbone at ``lr_backbone``, and
    deformable ``sampling_offsets`` / ``reference_points`` at ``lr * lr_linear_proj_mult``.

    Frozen parameters (``requires_grad=False``) are left out; empty groups are dropped.
    """
    groups: dict[str, list[nn.Parameter]] = {"backbone": [], "linear_proj": [], "main": []}
    for name, p in unwrap_model(model).named_parameters():
        if not p.requires_grad:
            continue
        if _matches(name, BACKBONE_KEYWORDS):
            groups["backbone"].append(p)
        elif _matches(name, LINEAR_PROJ_KEYWORDS):
            groups["linear_proj"].append(p)
        else:
            groups["main"].append(p)
    lrs = {"main": cfg.lr, "backbone": cfg.lr_backbone, "linear_proj": cfg.lr * cfg.lr_linear_proj_mult}
    return [{"params": ps, "lr": lrs[n], "name": n} for n, ps in groups.items() if ps]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # foreach=True: on CPU torch would pick the per-tensor Python loop; the multi-tensor path gives
    # the same weights bit for bit (tests/test_engine.py) with one call per op, not per parameter
    return torch.optim.AdamW(
        build_param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True
    )


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """Multiply every group's lr by 0.1 after ``lr_drop`` epochs (``scheduler.step()`` once per epoch)."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, cfg.lr_drop), gamma=0.1)


def amp_dtype_for(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bfloat16 on CUDA devices that support it, else float16 (needs a GradScaler); None on CPU."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class ModelEma:
    """An exponential moving average of a model's weights (``train.ema_decay``).

    ``module`` is a frozen copy of the bare model, in eval mode. After every optimiser step
    :meth:`update` moves each floating-point parameter towards the live one,
    ``ema = decay * ema + (1 - decay) * param`` (one fused ``_foreach_lerp_``), and copies the
    buffers (FrozenBatchNorm2d statistics, position tables) as they are. The average is what a run
    with EMA evaluates and ships; :meth:`state_dict` / :meth:`load_state_dict` carry it through
    checkpoints so a resumed run continues the same average.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1), got {decay!r}")
        import copy

        self.decay = float(decay)
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def _pairs(self, live: nn.Module) -> tuple[list, list, list, list]:
        """(averaged, live) tensors to lerp and (copy, live) tensors to copy, listed once per live
        model (walking the module tree every step cost ~1 % of a toy step); training never changes
        which parameters train, and loading a state dict copies into the same tensors."""
        key = id(live)
        if getattr(self, "_pairs_key", None) != key:
            ema, src, dst, cp = [], [], [], []
            for e, p in zip(self.module.parameters(), live.parameters()):
                if p.requires_grad and p.is_floating_point():
                    ema.append(e)
                    src.append(p.detach())
                else:  # frozen: nothing to average
                    dst.append(e)
                    cp.append(p.detach())
            for e, b in zip(self.module.buffers(), live.buffers()):
                dst.append(e)
                cp.append(b)
            self._pairs_key, self._pairs_cache = key, (ema, src, dst, cp)
        return self._pairs_cache

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema, src, dst, cp = self._pairs(unwrap_model(model))
        if ema:
            torch._foreach_lerp_(ema, src, 1.0 - self.decay)
        if dst:
            torch._foreach_copy_(dst, cp)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """How the model's tensors are computed: ``amp_dtype`` under autocast (None: float32), the
    ``scaler`` that float16 gradients need, and images in ``channels_last`` memory format."""

    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    channels_last: bool = False

    def autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.amp_dtype)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


def _targets_to(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]


def _to_float32(x: Any) -> Any:
    """Cast model outputs back to float32 so the loss / matching never runs in half precision."""
    if torch.is_tensor(x):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _to_float32(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_float32(v) for v in x)
    return x


def _non_finite_gradients(model: nn.Module, epoch: int, it: int, loss_value: float) -> str:
    """Name where non-finite gradients start: walking the parameters from the output back (registration
    order is roughly forward order), the first one whose gradient is not finite is nearest their origin."""
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    bad = [n for n, p in named if not torch.isfinite(p.grad).all()]
    nearest = bad[-1] if bad else "?"
    return (
        f"non-finite gradients at epoch {epoch} iteration {it} (loss {loss_value:.4g} was finite): "
        f"{len(bad)} of {len(named)} parameter tensors, nearest the output {nearest}; the step was not "
        "taken. With --amp (bf16) see docs/COCO_TRAINING.md; else lower the lr or check the data"
    )


def _as_float(v: Any) -> float:
    return float(v.detach().item()) if torch.is_tensor(v) else float(v)


def weighted_loss(loss_dict: dict[str, torch.Tensor], weight_dict: dict[str, float]) -> torch.Tensor:
    """The total loss: every term that has a weight, times its weight."""
    return sum(loss_dict[k] * w for k, w in weight_dict.items() if k in loss_dict)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    clip_max_norm: float = 0.0,
    *,
    precision: Precision = Precision(),
    ema: ModelEma | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    totals: dict[str, float] | None = None,
) -> dict[str, float]:
    """Train for one pass over ``loader``; returns the epoch's averaged metrics.

    Each iteration calls ``log`` (if given) with a record holding the total loss, every weighted
    term, ``class_error``, the learning rate, seconds per iteration and images per second, all
    averaged over DDP processes. ``ema``: a :class:`ModelEma` updated after every optimiser step.
    ``totals``: the epoch's running sums, updated in place before each ``log`` call; pass those of
    a checkpoint to continue an epoch (the loader then yields its remaining batches, iterations
    are numbered on from ``totals["iters"]``, and the averages cover the whole epoch). A non-finite
    total loss, or (without a GradScaler) non-finite gradients from a finite loss, raise
    :class:`NonFiniteLossError` *before* the optimiser step, so the weights (and the last
    checkpoint) stay good.
    """
    model.train()
    criterion.train()
    weight_dict = criterion.weight_dict
    scaler = precision.scaler
    world = get_world_size()
    sums = totals if totals is not None else {}
    first = int(sums.get("iters", 0))
    t_last = time.perf_counter()
    bar = tqdm(loader, total=len(loader) if hasattr(loader, "__len__") else None, desc=f"epoch {epoch}",
               disable=not progress, dynamic_ncols=True, leave=False)  # fmt: skip
    for it, (images, mask, targets) in enumerate(bar, start=first):
        images, mask = precision.images(images.to(device, non_blocking=True)), mask.to(device, non_blocking=True)
        targets = _targets_to(targets, device)

        with precision.autocast(device):
            outputs = model(images, mask)
        loss_dict = criterion(_to_float32(outputs), targets)
        loss = weighted_loss(loss_dict, weight_dict)

        # average over processes for logging and for the NaN check (identical on every rank)
        scalars = {k: _as_float(v) for k, v in loss_dict.items() if k in weight_dict or "error" in k}
        scalars = all_reduce_mean(scalars, device)
        weighted = {k: scalars[k] * w for k, w in weight_dict.items() if k in scalars}
        loss_value = sum(weighted.values())
        if not math.isfinite(loss_value):
            terms = ", ".join(f"{k}={v:.4g}" for k, v in sorted(weighted.items()))
            raise NonFiniteLossError(
                f"non-finite loss {loss_value} at epoch {epoch} iteration {it}; weighted terms: {terms}"
            )

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        # the gradients' norm (and clipping); without a GradScaler (which skips such steps itself), a
        # non-finite gradient with a finite loss stops the run here, before it poisons the weights
        try:
            torch.nn.utils.clip_grad_norm_(
                model.parameters(),
                clip_max_norm if clip_max_norm > 0 else math.inf,
                error_if_nonfinite=scaler is None,
            )
        except RuntimeError as err:
            if "non-finite" not in str(err):
                raise
            raise NonFiniteLossError(_non_finite_gradients(model, epoch, it, loss_value)) from None
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if ema is not None:
            ema.update(model)

        now = time.perf_counter()
        dt, t_last = now - t_last, now
        batch_images = images.shape[0] * world
        record = {"loss": loss_value, **weighted}
        for k in ("class_error", "cardinality_error"):
            if k in scalars:
                record[k] = scalars[k]
        for k, v in record.items():
            sums[k] = sums.get(k, 0.0) + v
        for k, v in (("iters", 1), ("images", batch_images), ("train_time_s", dt)):
            sums[k] = sums.get(k, 0) + v
        record.update(lr=optimizer.param_groups[0]["lr"], time_per_iter=dt, images_per_s=batch_images / max(dt, 1e-9))
        if log is not None:
            log({"type": "iter", "epoch": epoch, "iter": it, **record})
        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
    bar.close()
    n = max(sums.get("iters", 0), 1)
    stats = {k: v / n for k, v in sums.items() if k not in ("iters", "images", "train_time_s")}
    stats.update(lr=optimizer.param_groups[0]["lr"], iters=int(sums.get("iters", 0)), images=int(sums.get("images", 0)),
                 train_time_s=sums.get("train_time_s", 0.0))  # fmt: skip
    stats["images_per_s"] = stats["images"] / max(stats["train_time_s"], 1e-9)
    return stats


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
def coco_detections(results: list[dict[str, torch.Tensor]], targets: list[dict[str, Any]]) -> dict[int, list]:
    """Post-processed predictions -> ``{image_id: [COCO result dicts]}`` (boxes as xywh pixels)."""
    out: dict[int, list] = {}
    for res, tgt in zip(results, targets):
        image_id = int(tgt["image_id"])
        boxes = box_convert(res["boxes"].float().cpu(), "xyxy", "xywh").tolist()
        scores = res["scores"].float().cpu().tolist()
        labels = res["labels"].cpu().tolist()
        out[image_id] = [
            {"image_id": image_id, "category_id": int(c), "bbox": [round(v, 3) for v in b], "score": float(s)}
            for b, s, c in zip(boxes, scores, labels)
        ]
    return out


def coco_bbox_eval(coco_gt, detections: list[dict[str, Any]], image_ids: list[int]) -> dict[str, Any]:
    """COCOeval (bbox) restricted to ``image_ids``; returns AP..APl (= ``stats[0:6]``) and all 12 stats.

    With no detections at all pycocotools can't build a result set; every AP is then 0.
    """
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return {**{k: 0.0 for k in AP_KEYS}, "stats": [0.0] * 12}
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints progress; keep the console clean
        coco_dt = coco_gt.loadRes(detections)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(s) for s in ev.stats]
    return {**dict(zip(AP_KEYS, stats[:6])), "stats": stats}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    postprocessor: nn.Module,
    loader: Iterable,
    coco_gt,
    device: torch.device,
    criterion: nn.Module | None = None,
    precision: Precision = Precision(),
    progress: bool = False,
) -> dict[str, Any]:
    """COCO box AP of ``model`` on ``loader`` against ``coco_gt`` (the dataset's pycocotools COCO).

    Predictions are mapped back to each image's original size (``target['orig_size']``) by the
    postprocessor, so they are compared with the untouched ground-truth annotations. Returns
    ``AP, AP50, AP75, APs, APm, APl`` (COCOeval ``stats[0:6]``; -1 = no ground truth in that
    area range), ``stats`` (all 12), ``num_images``, ``num_detections`` and, if a criterion is
    given, the weighted validation ``loss``. Only the images ``loader`` yields are scored. Under DDP
    the detections of every process are gathered first, so every rank returns the same numbers.
    """
    model.eval()
    if criterion is not None:
        criterion.eval()
    detections: dict[int, list] = {}
    loss_sum, loss_n = 0.0, 0
    total = len(loader) if hasattr(loader, "__len__") else None
    bar = tqdm(loader, total=total, desc="eval", disable=not progress, dynamic_ncols=True, leave=False)
    for images, mask, targets in bar:
        images, mask = precision.images(images.to(device)), mask.to(device)
        targets = _targets_to(targets, device)
        with precision.autocast(device):
            outputs = model(images, mask)
        outputs = _to_float32(outputs)
        if criterion is not None:
            loss_dict = criterion(outputs, targets)
            loss_sum += _as_float(weighted_loss(loss_dict, criterion.weight_dict)) * images.shape[0]
            loss_n += images.shape[0]
        orig_sizes = torch.stack([torch.as_tensor(t["orig_size"]) for t in targets]).to(device)
        detections.update(coco_detections(postprocessor(outputs, orig_sizes), targets))
    bar.close()

    merged: dict[int, list] = {}
    for part in all_gather_object(detections):  # DDP: a padded sampler may repeat an image; dedupe by id
        merged.update(part)
    flat = [d for dets in merged.values() for d in dets]
    metrics = coco_bbox_eval(coco_gt, flat, list(merged))
    metrics["num_images"] = len(merged)
    metrics["num_detections"] = len(flat)
    if criterion is not None:
        sums = all_gather_object((loss_sum, loss_n))
        metrics["loss"] = sum(s for s, _ in sums) / max(1, sum(n for _, n in sums))
    return metrics
