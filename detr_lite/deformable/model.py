"""The Deformable DETR model: multi-scale backbone -> per-level projection -> deformable transformer
-> per-layer class/box heads (sigmoid / focal classification), and its post-processor.

``DeformableDETR(cfg)(images [B, 3, H, W], mask [B, H, W] or None)`` returns

* ``pred_logits`` ``[B, Q, K]`` (one sigmoid logit per class; no "no-object" column),
* ``pred_boxes`` ``[B, Q, 4]`` normalised (cx, cy, w, h),
* ``aux_outputs``: the same for decoder layers 1 .. L-1 (when ``cfg.aux_loss``),
* ``enc_outputs`` (two-stage only): the encoder's class-agnostic proposals, for the ``_enc`` losses.

The pyramid (official): C3, C4, C5 of the ResNet (strides 8, 16, 32), each through Conv1x1 +
GroupNorm(32, d); extra levels by Conv3x3 stride 2 (+ GroupNorm), the first on the raw C5 map, so
the default 4 levels have strides 8, 16, 32, 64. ``num_feature_levels=1`` is the single-scale model
(C5 only). Boxes are predicted relative to the reference points:
``box = sigmoid(bbox_embed(h) + inverse_sigmoid(reference))`` (a 2-d reference shifts only the centre).

Parameter names follow the official checkpoints: ``input_proj.{l}.{0,1}``, ``query_embed``,
``transformer.*`` (``level_embed``, ``encoder.layers.N.self_attn.sampling_offsets`` ...),
``class_embed.{i}``, ``bbox_embed.{i}.layers.{0,1,2}`` (without refinement every ``{i}`` is the same
shared head, as officially), backbone ``backbone.body.*`` (official: ``backbone.0.body.*``).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from detr_lite.backbone import build_backbone
from detr_lite.config import ModelConfig
from detr_lite.deformable.transformer import DeformableTransformer, inverse_sigmoid
from detr_lite.detr import MLP
from detr_lite.position_encoding import PositionEmbeddingSine


class DeformableDETR(nn.Module):
    """Deformable DETR (Zhu et al., 2021) with optional iterative box refinement and two-stage."""

    def __init__(self, cfg: ModelConfig, implementation: str = "auto"):
        super().__init__()
        if cfg.num_feature_levels < 1:
            raise ValueError(f"ModelConfig.num_feature_levels: expected >= 1, got {cfg.num_feature_levels}")
        if cfg.hidden_dim % 32:
            raise ValueError(
                f"ModelConfig.hidden_dim: GroupNorm(32, d) needs d % 32 == 0, got {cfg.hidden_dim}"
            )
        self.cfg = cfg
        d = cfg.hidden_dim
        self.num_queries = cfg.num_queries
        self.num_feature_levels = cfg.num_feature_levels
        self.aux_loss = cfg.aux_loss
        self.with_box_refine = cfg.with_box_refine
        self.two_stage = cfg.two_stage

        # backbone levels: the last num_feature_levels of cfg.backbone_layers (official C3-C5; C5 alone
        # for the single-scale model); any further levels come from stride-2 convolutions
        layers = tuple(cfg.backbone_layers)
        if not layers:
            raise ValueError("ModelConfig.backbone_layers: expected at least one ResNet stage, got ()")
        return_layers = layers[-min(len(layers), cfg.num_feature_levels) :]
        self.backbone = build_backbone(cfg, return_layers=return_layers)
        self.position_embedding = PositionEmbeddingSine(d // 2, normalize=True, offset=-0.5)

        projections = [
            nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(32, d))
            for c in self.backbone.num_channels
        ]
        in_ch = self.backbone.num_channels[-1]
        for _ in range(cfg.num_feature_levels - len(projections)):
            projections.append(
                nn.Sequential(nn.Conv2d(in_ch, d, 3, stride=2, padding=1), nn.GroupNorm(32, d))
            )
            in_ch = d
        self.input_proj = nn.ModuleList(projections)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

        self.transformer = DeformableTransformer(
            d_model=d,
            nhead=cfg.nheads,
            num_encoder_layers=cfg.enc_layers,
            num_decoder_layers=cfg.dec_layers,
            dim_feedforward=cfg.dim_feedforward,
            dropout=cfg.dropout,
            num_feature_levels=cfg.num_feature_levels,
            dec_n_points=cfg.dec_n_points,
            enc_n_points=cfg.enc_n_points,
            two_stage=cfg.two_stage,
            two_stage_num_proposals=cfg.num_queries,
            implementation=implementation,
        )
        if not cfg.two_stage:
            self.query_embed = nn.Embedding(cfg.num_queries, 2 * d)  # split into (query_pos, tgt)

        # heads: focal-loss prior (every class starts at p = 0.01), boxes start at the reference
        class_embed = nn.Linear(d, cfg.num_classes)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        bbox_embed = MLP(d, d, 4, 3)
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        # two-stage: one extra head pair, applied to the encoder output to score proposals
        num_pred = cfg.dec_layers + 1 if cfg.two_stage else cfg.dec_layers
        if cfg.with_box_refine:  # independent heads per decoder layer; only the first starts with w, h ~ 0.12
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        else:  # one head shared by every layer (listed once per layer, like the official state dict)
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList([class_embed] * num_pred)
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_pred)
        if cfg.two_stage:
            for head in self.bbox_embed:
                nn.init.zeros_(head.layers[-1].bias[2:])

        if self.backbone.channels_last:
            self.input_proj.to(memory_format=torch.channels_last)

    # ---------------------------------------------------------------------------------------- pyramid
    def build_pyramid(self, images: Tensor, mask: Tensor | None = None):
        """Backbone + projections: lists of ``srcs [B, d, H_l, W_l]``, ``masks [B, H_l, W_l]`` and
        ``pos [B, d, H_l, W_l]`` for every level (validates ``images``/``mask``)."""
        feats = self.backbone(images, mask)
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        elif bool(mask.flatten(1).all(1).any()):
            raise ValueError(
                "mask: every image needs at least one valid (False) pixel; got a fully padded image"
            )
        srcs, masks = [], []
        for lvl, (feat, m) in enumerate(feats):
            srcs.append(self.input_proj[lvl](feat))
            masks.append(m)
        for lvl in range(len(feats), self.num_feature_levels):
            # the first extra level convolves the raw C5 map, later ones the previous projected level
            src = self.input_proj[lvl](feats[-1][0] if lvl == len(feats) else srcs[-1])
            srcs.append(src)
            masks.append(F.interpolate(mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0])
        pos = [self.position_embedding(m).to(s.dtype) for s, m in zip(srcs, masks)]
        return srcs, masks, pos

    def forward(self, images: Tensor, mask: Tensor | None = None) -> dict:
        srcs, masks, pos = self.build_pyramid(images, mask)
        t = self.transformer(
            srcs,
            masks,
            pos,
            query_embed=None if self.two_stage else self.query_embed.weight,
            class_embed=self.class_embed,
            bbox_embed=self.bbox_embed,
            refine=self.with_box_refine,
        )
        hs = t["hs"]
        logits, boxes = [], []
        for lvl in range(hs.shape[0]):
            reference = inverse_sigmoid(t["init_reference"] if lvl == 0 else t["references"][lvl - 1])
            delta = self.bbox_embed[lvl](hs[lvl])
            if reference.shape[-1] == 4:
                coord = delta + reference
            else:  # a point reference only anchors the centre
                coord = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            logits.append(self.class_embed[lvl](hs[lvl]))
            boxes.append(coord.sigmoid())
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])
            ]
        if self.two_stage:
            out["enc_outputs"] = {
                "pred_logits": t["enc_outputs_class"],
                "pred_boxes": t["enc_outputs_coord_unact"].sigmoid(),
            }
        return out


class PostProcess(nn.Module):
    """Sigmoid scores -> the ``num_select`` best (query, class) pairs per image (official: 100).

    Returns per image ``{'scores', 'labels', 'boxes'}`` with xyxy boxes in absolute pixels of
    ``target_sizes`` ``[B, 2]`` (h, w). A query may appear with several classes.
    """

    def __init__(self, num_select: int = 100):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        b, q, k = logits.shape
        target_sizes = torch.as_tensor(target_sizes, device=logits.device)
        if target_sizes.dim() != 2 or tuple(target_sizes.shape) != (b, 2):
            raise ValueError(
                f"target_sizes: expected shape (B, 2) = {(b, 2)} as (h, w), got {tuple(target_sizes.shape)}"
            )
        prob = logits.sigmoid().view(b, q * k)
        scores, flat = torch.topk(prob, min(self.num_select, q * k), dim=1)
        query = torch.div(flat, k, rounding_mode="floor")
        labels = flat % k
        xyxy = box_convert(boxes, "cxcywh", "xyxy")
        xyxy = torch.gather(xyxy, 1, query[..., None].expand(-1, -1, 4))
        h, w = target_sizes.to(xyxy.dtype).unbind(1)
        xyxy = xyxy * torch.stack([w, h, w, h], dim=1)[:, None, :]
        return [{"scores": s, "labels": lab, "boxes": bx} for s, lab, bx in zip(scores, labels, xyxy)]
