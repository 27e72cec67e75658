"""Hungarian matching between DETR's N predictions and each image's ground-truth objects.

DETR predicts a fixed-size *set* of boxes, so before any loss can be computed every target must
be paired with exactly one prediction (the rest are trained towards "no object"). The pairing
minimises a total cost that mixes three terms, for prediction i and target j:

    C[i, j] = w_class * cost_class + w_bbox * ||b_i - b_j||_1 + w_giou * (-GIoU(b_i, b_j))

* ``cost_class``, softmax models (DETR): ``-p_i[c_j]``, the negative probability of the target's
  class (the constant 1 of the log-likelihood is dropped; it does not change the argmin).
* ``cost_class``, focal models (Deformable DETR), with sigmoid probabilities and α=0.25, γ=2:
  ``pos - neg`` at the target class, where ``pos = α(1-p)^γ·(-log(p+1e-8))`` is the focal loss
  of calling the class present and ``neg = (1-α)p^γ·(-log(1-p+1e-8))`` that of calling it absent.
* L1 on normalised (cx, cy, w, h) and GIoU on (x0, y0, x1, y1).

The costs of the whole batch are computed in a few big tensor ops (no Python loop over images),
either as the official code does — one ``[B·Q, ΣT]`` matrix, every prediction against every
target of the batch, later cut into per-image blocks — or, by default, with targets padded to a
``[B, Q, T_max]`` tensor so no cross-image costs are computed (identical result, less work).
Each image's block ``[Q, T_b]`` is then solved exactly by SciPy's ``linear_sum_assignment``.
Images with no targets get empty index tensors.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import box_convert, generalized_box_iou

from detr_lite.config import ModelConfig


def focal_class_cost(prob: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Per-class focal matching cost ``pos - neg`` for sigmoid probabilities ``prob`` [..., K]."""
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
    return pos - neg


def _check_inputs(outputs: dict, targets: list[dict]) -> None:
    for key in ("pred_logits", "pred_boxes"):
        if key not in outputs:
            raise ValueError(f"matcher: outputs is missing '{key}' (received keys {sorted(outputs)})")
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    if logits.ndim != 3 or boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[:2] != logits.shape[:2]:
        raise ValueError(
            f"matcher: expected pred_logits [B,Q,C] and pred_boxes [B,Q,4], "
            f"received {tuple(logits.shape)} and {tuple(boxes.shape)}"
        )
    if len(targets) != logits.shape[0]:
        raise ValueError(f"matcher: expected {logits.shape[0]} targets (batch size), received {len(targets)}")
    for b, t in enumerate(targets):
        if t["boxes"].ndim != 2 or t["boxes"].shape[-1] != 4 or len(t["boxes"]) != len(t["labels"]):
            raise ValueError(
                f"matcher: targets[{b}] expected boxes [n,4] and labels [n], "
                f"received {tuple(t['boxes'].shape)} and {tuple(t['labels'].shape)}"
            )
        if len(t["labels"]) and (t["labels"].min() < 0 or t["labels"].max() >= logits.shape[-1]):
            raise ValueError(
                f"matcher: targets[{b}]['labels'] must lie in [0, {logits.shape[-1] - 1}] "
                f"(pred_logits has {logits.shape[-1]} classes), received max {int(t['labels'].max())}"
            )


def _pair_costs(matcher: HungarianMatcher, logits, boxes, tgt_ids, tgt_boxes) -> torch.Tensor:
    """Weighted cost between predictions [..., N, *] and targets [..., T, *] -> [..., N, T].

    Works unbatched (the flat layout: N = B*Q, T = sum of targets) and batched (the padded
    layout: leading dim B, T = max targets per image).
    """
    if matcher.focal:
        prob_cost = focal_class_cost(logits.float().sigmoid(), matcher.focal_alpha, matcher.focal_gamma)
    else:
        prob_cost = -logits.float().softmax(-1)
    # cost_class[..., i, j] = prob_cost[..., i, tgt_ids[..., j]]
    index = tgt_ids.unsqueeze(-2).expand(*prob_cost.shape[:-1], tgt_ids.shape[-1])
    cost_class = prob_cost.gather(-1, index)
    cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
    giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"))
    # GIoU is 0/0 only when both boxes have zero area; call that the worst overlap (-1)
    cost_giou = -torch.nan_to_num(giou, nan=-1.0)
    return matcher.cost_bbox * cost_bbox + matcher.cost_class * cost_class + matcher.cost_giou * cost_giou


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of predictions to targets (see module docstring).

    ``forward(outputs, targets)`` takes ``outputs['pred_logits'] [B,Q,C]``,
    ``outputs['pred_boxes'] [B,Q,4]`` (normalised cxcywh) and a list of B target dicts with
    ``'labels' [T_b]`` and ``'boxes' [T_b,4]``; it returns B pairs ``(pred_idx, tgt_idx)`` of
    int64 tensors of length ``min(Q, T_b)``: prediction ``pred_idx[k]`` is matched to target
    ``tgt_idx[k]``. ``pred_idx`` is sorted ascending.

    ``layout`` only changes how the costs are computed, never the result:

    * ``"flat"`` (the official code): one ``[B*Q, ΣT]`` matrix of every prediction against
      every target of the batch, then its diagonal blocks — B times more arithmetic than needed;
    * ``"padded"`` (default): targets padded to ``T_max`` per image and one batched
      ``[B, Q, T_max]`` computation — the same few tensor ops without the off-diagonal waste
      (``benchmarks/bench_matcher.py`` measures the three ways).
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal: bool = False,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        layout: str = "padded",
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_bbox and cost_giou cannot all be 0")
        if layout not in ("padded", "flat"):
            raise ValueError(f"HungarianMatcher: layout expected 'padded' or 'flat', received {layout!r}")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal, self.focal_alpha, self.focal_gamma = focal, focal_alpha, focal_gamma
        self.layout = layout

    @torch.no_grad()
    def cost_matrix(self, outputs: dict, targets: list[dict]) -> torch.Tensor:
        """The official batched cost ``[B, Q, ΣT_b]``: image b's targets are columns of its block.

        Row block b (predictions of image b) against column block b (its targets) is the cost
        that image's assignment uses; the other blocks are never looked at.
        """
        _check_inputs(outputs, targets)
        bs, nq = outputs["pred_logits"].shape[:2]
        boxes = outputs["pred_boxes"].flatten(0, 1).float()  # [B*Q, 4]
        tgt_ids = torch.cat([t["labels"] for t in targets]).long().to(boxes.device)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes)
        c = _pair_costs(self, outputs["pred_logits"].flatten(0, 1), boxes, tgt_ids, tgt_boxes)
        return c.view(bs, nq, -1)

    @torch.no_grad()
    def padded_cost(self, outputs: dict, targets: list[dict]) -> torch.Tensor:
        """Per-image costs ``[B, Q, T_max]``; columns ``>= T_b`` of image b are padding."""
        _check_inputs(outputs, targets)
        boxes = outputs["pred_boxes"].float()
        tgt_ids = pad_sequence([t["labels"].long() for t in targets], batch_first=True).to(boxes.device)
        # pad with a valid box so the padded columns stay finite
        pad_box = [t["boxes"].to(boxes) for t in targets]
        tgt_boxes = pad_sequence(pad_box, batch_first=True, padding_value=0.5)
        return _pair_costs(self, outputs["pred_logits"], boxes, tgt_ids, tgt_boxes)

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            _check_inputs(outputs, targets)
            return [(empty, empty.clone()) for _ in targets]
        if self.layout == "flat":
            blocks = [
                blk[b] for b, blk in enumerate(self.cost_matrix(outputs, targets).cpu().split(sizes, -1))
            ]
        else:
            c = self.padded_cost(outputs, targets).cpu()
            blocks = [c[b, :, :n] for b, n in enumerate(sizes)]
        indices = []
        for n, block in zip(sizes, blocks):
            if n == 0:
                indices.append((empty.clone(), empty.clone()))
                continue
            if not torch.isfinite(block).all():
                raise ValueError(
                    "matcher: the cost matrix has NaN/inf entries because pred_logits or pred_boxes contain "
                    "non-finite values (diverged training, or fp16 overflow?)"
                )
            rows, cols = linear_sum_assignment(block.numpy())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices


def build_matcher(cfg: ModelConfig) -> HungarianMatcher:
    """Matcher with the costs of ``cfg`` (``set_cost_*``) and focal class cost for focal models."""
    return HungarianMatcher(
        cost_class=cfg.set_cost_class,
        cost_bbox=cfg.set_cost_bbox,
        cost_giou=cfg.set_cost_giou,
        focal=cfg.uses_focal,
        focal_alpha=cfg.focal_alpha,
    )
