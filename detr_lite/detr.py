"""The DETR model: backbone -> 1x1 projection -> flatten -> transformer -> class and box heads.

``DETR(cfg)(images [B, 3, H, W], mask [B, H, W] or None)`` returns

* ``pred_logits`` ``[B, Q, K+1]`` (last logit = "no object"),
* ``pred_boxes`` ``[B, Q, 4]`` normalised (cx, cy, w, h) in [0, 1] (sigmoid),
* ``aux_outputs``: the same two entries for decoder layers 1 .. L-1 (when ``cfg.aux_loss``).

Module names match the official checkpoints up to one rename (see ``detr_lite.official``):
official ``backbone.0.body.*`` <-> ours ``backbone.body.*`` (and ``backbone.1.*`` <-> ``position_embedding.*``
for the learned encoding); ``input_proj``, ``query_embed``, ``transformer.*``, ``class_embed``,
``bbox_embed.layers.{0,1,2}`` are identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from detr_lite.backbone import build_backbone
from detr_lite.config import ModelConfig
from detr_lite.position_encoding import build_position_encoding
from detr_lite.transformer import Transformer


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU in between (the box head: 256 -> 256 -> 256 -> 4)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class DETR(nn.Module):
    """DEtection TRansformer (Carion et al., 2020) with the official layer names and semantics."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.num_queries = cfg.num_queries
        self.aux_loss = cfg.aux_loss
        d = cfg.hidden_dim
        # official DETR: layer4 (C5); a toy config may stop earlier (the last of cfg.backbone_layers)
        self.backbone = build_backbone(cfg, return_layers=(getattr(cfg, "backbone_layers", ("layer4",))[-1],))
        self.position_embedding = build_position_encoding(cfg)
        self.input_proj = nn.Conv2d(self.backbone.num_channels[-1], d, kernel_size=1)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        self.transformer = Transformer(
            d_model=d,
            nhead=cfg.nheads,
            num_encoder_layers=cfg.enc_layers,
            num_decoder_layers=cfg.dec_layers,
            dim_feedforward=cfg.dim_feedforward,
            dropout=cfg.dropout,
            return_intermediate_dec=True,
            pre_norm=cfg.pre_norm,
        )
        self.class_embed = nn.Linear(d, cfg.num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)
        if self.backbone.channels_last:
            self.input_proj.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor, mask: Tensor | None = None) -> dict:
        """``images [B, 3, H, W]`` + padding ``mask [B, H, W]`` (True = padding) -> predictions."""
        feat, small_mask = self.backbone(images, mask)[-1]  # validates images / mask
        pos = self.position_embedding(small_mask).to(feat.dtype)  # [B, d, h, w]
        src = self.input_proj(feat)  # [B, d, h, w]
        # [B, d, h, w] -> [B, hw, d]; a free view when src is channels_last
        src = src.flatten(2).transpose(1, 2)
        pos = pos.flatten(2).transpose(1, 2)
        # skip the key-padding mask entirely when nothing is padded (fused attention fast path)
        key_padding = None if mask is None or not bool(mask.any()) else small_mask.flatten(1)
        hs, _ = self.transformer(src, key_padding, self.query_embed.weight, pos)  # [L, B, Q, d]

        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])
            ]
        return out


class PostProcess(nn.Module):
    """Model outputs -> per-image ``{'scores', 'labels', 'boxes'}`` with absolute xyxy boxes.

    Softmax over classes, drop the no-object column, keep the best class per query; boxes are scaled by
    ``target_sizes`` ``[B, 2]`` given as (h, w) of the original images.
    """

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        target_sizes = torch.as_tensor(target_sizes, device=logits.device)
        if target_sizes.dim() != 2 or tuple(target_sizes.shape) != (logits.shape[0], 2):
            raise ValueError(
                f"target_sizes: expected shape (B, 2) = {(logits.shape[0], 2)} as (h, w), got {tuple(target_sizes.shape)}"
            )
        scores, labels = F.softmax(logits, -1)[..., :-1].max(-1)
        h, w = target_sizes.to(boxes.dtype).unbind(1)
        scale = torch.stack([w, h, w, h], dim=1)[:, None, :]
        xyxy = box_convert(boxes, "cxcywh", "xyxy") * scale
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, xyxy)]
