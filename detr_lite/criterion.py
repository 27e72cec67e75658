"""DETR's set loss: match first, then supervise each matched pair (and "no object" for the rest).

For one decoder output the loss is computed in two steps:

1. ``HungarianMatcher`` pairs every target with one prediction (optimal total cost).
2. Losses on that pairing, all normalised by ``num_boxes`` = the number of targets in the batch
   (averaged over processes under ``torch.distributed``, at least 1):

   * ``loss_ce``: softmax models — cross-entropy over K+1 logits for *every* query; matched
     queries are trained towards their target's class, the others towards the no-object class
     (index K), whose weight is ``eos_coef`` (0.1) to balance the many empty queries.
     Focal models — sigmoid focal loss (α=0.25, γ=2) against one-hot targets (all-zero rows for
     unmatched queries), as the official Deformable DETR: ``focal.mean(1).sum() / num_boxes × Q``.
   * ``loss_bbox``: L1 between matched normalised cxcywh boxes, summed / num_boxes.
   * ``loss_giou``: 1 − GIoU of matched boxes, summed / num_boxes.
   * logged only (no gradient, not in ``weight_dict``): ``class_error`` (top-1 error of matched
     predictions, %) and ``cardinality_error`` (|#predicted objects − #targets|, mean over images).

With ``aux_outputs`` (one per earlier decoder layer) every layer is matched afresh and gets the
same losses with suffix ``_0 .. _{L-2}``; two-stage Deformable DETR's ``enc_outputs`` (proposals)
are matched class-agnostically (every label → 0) and get suffix ``_enc``.

``forward`` returns the unweighted terms; the total is ``sum(d[k] * weight_dict[k] for k in
weight_dict if k in d)``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from detr_lite.config import ModelConfig
from detr_lite.matcher import HungarianMatcher, build_matcher

_LOSSES = ("labels", "boxes", "cardinality")


def _src_permutation(indices: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index, query index) of every matched prediction, concatenated over the batch."""
    batch = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
    src = torch.cat([src for src, _ in indices])
    return batch, src


def num_boxes_for_normalisation(targets: list[dict], device: torch.device) -> float:
    """Total targets in the batch, averaged over processes when distributed, clamped to >= 1."""
    n = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        world = dist.get_world_size()
    return torch.clamp(n / world, min=1).item()


class SetCriterion(nn.Module):
    """The DETR / Deformable DETR set loss (see module docstring).

    Args:
        num_classes: K = max category id + 1 (softmax models have K+1 logits, the last one
            no-object; focal models have K logits).
        matcher: a ``HungarianMatcher``.
        weight_dict: loss name -> weight; used by the training loop, stored here for convenience.
        eos_coef: cross-entropy weight of the no-object class (softmax models).
        losses: which of "labels", "boxes", "cardinality" to compute.
        focal, focal_alpha, focal_gamma: sigmoid focal classification loss instead of softmax CE.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        eos_coef: float = 0.1,
        losses: tuple[str, ...] = _LOSSES,
        focal: bool = False,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        unknown = set(losses) - set(_LOSSES)
        if unknown:
            raise ValueError(
                f"SetCriterion: unknown losses {sorted(unknown)}; expected a subset of {_LOSSES}"
            )
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.losses = tuple(losses)
        self.focal, self.focal_alpha, self.focal_gamma = focal, focal_alpha, focal_gamma
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    # ---------------------------------------------------------------- individual losses
    def loss_labels(self, outputs, targets, indices, num_boxes, log=True) -> dict[str, torch.Tensor]:
        logits = outputs["pred_logits"]  # [B, Q, K+1] softmax, [B, Q, K] focal
        idx = _src_permutation(indices)
        tgt_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        # every query defaults to "no object" (index K), matched ones get their target class
        tgt_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        tgt_classes[idx] = tgt_classes_o
        if self.focal:
            onehot = F.one_hot(tgt_classes, self.num_classes + 1)[..., :-1].to(logits.dtype)  # drop no-object
            focal = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma)
            loss_ce = focal.mean(1).sum() / num_boxes * logits.shape[1]
        else:
            loss_ce = F.cross_entropy(logits.transpose(1, 2), tgt_classes, self.empty_weight.to(logits.dtype))
        losses = {"loss_ce": loss_ce}
        if log:
            with torch.no_grad():
                if len(tgt_classes_o):
                    correct = (logits[idx].argmax(-1) == tgt_classes_o).float().mean()
                    losses["class_error"] = 100.0 * (1.0 - correct)
                else:  # nothing matched: no classification error to report
                    losses["class_error"] = logits.new_zeros(())
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, num_boxes) -> dict[str, torch.Tensor]:
        """|number of queries predicting an object - number of targets|, averaged over images.

        Softmax: a query predicts an object when its argmax is not no-object. Focal models have
        no no-object logit, so there a query predicts an object when its best class has
        probability > 0.5 (the official code reuses the softmax rule, which there compares to
        the last real class).
        """
        logits = outputs["pred_logits"]
        tgt_lengths = torch.as_tensor(
            [len(t["labels"]) for t in targets], device=logits.device, dtype=torch.float
        )
        if self.focal:
            card_pred = (logits.max(-1).values > 0).sum(1)  # sigmoid(x) > 0.5  <=>  x > 0
        else:
            card_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(card_pred.float(), tgt_lengths)}

    def loss_boxes(self, outputs, targets, indices, num_boxes) -> dict[str, torch.Tensor]:
        idx = _src_permutation(indices)
        src = outputs["pred_boxes"][idx]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src)
        loss_bbox = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        # elementwise GIoU loss (eps-guarded: safe for zero-area predicted boxes)
        giou = generalized_box_iou_loss(
            box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"), reduction="sum"
        )
        return {"loss_bbox": loss_bbox, "loss_giou": giou / num_boxes}

    def get_loss(self, name, outputs, targets, indices, num_boxes, **kw) -> dict[str, torch.Tensor]:
        fn = {"labels": self.loss_labels, "boxes": self.loss_boxes, "cardinality": self.loss_cardinality}[
            name
        ]
        return fn(outputs, targets, indices, num_boxes, **kw)

    # ---------------------------------------------------------------- checks + forward
    def _check(self, outputs: dict, targets: list[dict]) -> None:
        for key in ("pred_logits", "pred_boxes"):
            if key not in outputs:
                raise ValueError(
                    f"SetCriterion: outputs is missing '{key}' (received keys {sorted(outputs)})"
                )
        expected = self.num_classes if self.focal else self.num_classes + 1
        got = outputs["pred_logits"].shape[-1]
        if got != expected:
            kind = "focal: num_classes" if self.focal else "softmax: num_classes + 1"
            raise ValueError(
                f"SetCriterion: pred_logits last dim expected {expected} ({kind}), received {got}; "
                f"does ModelConfig.num_classes match the dataset (max category id + 1)?"
            )
        for b, t in enumerate(targets):
            labels = t["labels"]
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"SetCriterion: targets[{b}]['labels'] expected ids in [0, {self.num_classes - 1}], "
                    f"received max {int(labels.max())}; set ModelConfig.num_classes to max category id + 1"
                )

    def _losses_for(self, outputs, targets, num_boxes, suffix: str, log: bool) -> dict[str, torch.Tensor]:
        indices = self.matcher(outputs, targets)  # a fresh matching for every decoder layer
        losses = {}
        for name in self.losses:
            kw = {"log": log} if name == "labels" else {}
            losses.update(self.get_loss(name, outputs, targets, indices, num_boxes, **kw))
        return {k + suffix: v for k, v in losses.items()}

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        self._check(outputs, targets)
        main = {k: v for k, v in outputs.items() if k not in ("aux_outputs", "enc_outputs")}
        num_boxes = num_boxes_for_normalisation(targets, outputs["pred_logits"].device)
        losses = self._losses_for(main, targets, num_boxes, "", log=True)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._losses_for(aux, targets, num_boxes, f"_{i}", log=False))
        if "enc_outputs" in outputs:
            # two-stage proposals are class-agnostic: every target becomes class 0
            binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update(self._losses_for(outputs["enc_outputs"], binary, num_boxes, "_enc", log=False))
        return losses


def build_weight_dict(cfg: ModelConfig) -> dict[str, float]:
    """loss name -> weight, with ``_i`` copies for the aux layers and ``_enc`` for two-stage."""
    base = {"loss_ce": cfg.cls_loss_coef, "loss_bbox": cfg.bbox_loss_coef, "loss_giou": cfg.giou_loss_coef}
    weights = dict(base)
    if cfg.aux_loss:
        for i in range(cfg.dec_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in base.items()})
    if cfg.arch == "deformable_detr" and cfg.two_stage:
        weights.update({f"{k}_enc": v for k, v in base.items()})
    return weights


def build_criterion(cfg: ModelConfig) -> SetCriterion:
    """The set loss for ``cfg``: softmax CE for DETR, sigmoid focal loss for Deformable DETR."""
    return SetCriterion(
        cfg.num_classes,
        build_matcher(cfg),
        build_weight_dict(cfg),
        eos_coef=cfg.eos_coef,
        focal=cfg.uses_focal,
        focal_alpha=cfg.focal_alpha,
    )
