"""Stage 2a: positional encodings for a 2-D feature map.

Attention is permutation-invariant, so every feature-map cell gets a code for its (row, column).

``PositionEmbeddingSine`` (official DETR, and Deformable DETR with ``offset=-0.5``):

* ``y = cumsum(~mask, rows)`` and ``x = cumsum(~mask, cols)`` count *valid* cells only, so a padded
  image gets the same codes as the unpadded one; with ``normalize`` they are rescaled to (0, scale]:
  ``y = (y + offset) / (y_last + 1e-6) * scale`` (``y_last`` = the count at the last row = image height).
* each coordinate is divided by ``T ** (2 * (i // 2) / F)`` for ``i = 0 .. F-1`` (F = ``num_pos_feats``);
  even channels take ``sin``, odd channels ``cos``, interleaved: ``[sin f0, cos f0, sin f1, cos f1, ...]``.
* output = ``cat(pos_y, pos_x)`` on the channel axis -> ``[B, 2F, h, w]`` (2F = d_model = 256).

``PositionEmbeddingLearned``: one learned vector per column and per row (up to 50 each),
``cat(col, row)`` -> ``[B, 2F, h, w]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from detr_lite.config import ModelConfig


def _check_mask(mask: Tensor) -> None:
    if not isinstance(mask, Tensor) or mask.dim() != 3 or mask.dtype != torch.bool:
        got = (tuple(mask.shape), mask.dtype) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask: expected a bool tensor [B, h, w] (True = padded), got {got}")


class PositionEmbeddingSine(nn.Module):
    """Fixed sine/cosine code of the (normalised) row and column of each valid cell."""

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000,
        normalize: bool = True,
        scale: float | None = 2 * math.pi,
        offset: float = 0.0,
        eps: float = 1e-6,
    ):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats: expected an even number (sin/cos pairs), got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.offset = offset
        self.eps = eps

    def forward(self, mask: Tensor) -> Tensor:
        _check_mask(mask)
        not_mask = ~mask
        y = not_mask.cumsum(1, dtype=torch.float32)  # [B, h, w]: 1, 2, ... down each column
        x = not_mask.cumsum(2, dtype=torch.float32)  # [B, h, w]: 1, 2, ... along each row
        if self.normalize:
            y = (y + self.offset) / (y[:, -1:, :] + self.eps) * self.scale
            x = (x + self.offset) / (x[:, :, -1:] + self.eps) * self.scale

        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.num_pos_feats)

        def encode(coord: Tensor) -> Tensor:  # [B, h, w] -> [B, h, w, F] with sin/cos interleaved
            angles = coord[..., None] / dim_t
            return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=4).flatten(3)

        return torch.cat((encode(y), encode(x)), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute code: ``col_embed[j]`` and ``row_embed[i]`` (feature maps up to 50 x 50)."""

    def __init__(self, num_pos_feats: int = 128, max_size: int = 50):
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: Tensor) -> Tensor:
        _check_mask(mask)
        b, h, w = mask.shape
        limit = self.row_embed.num_embeddings
        if h > limit or w > limit:
            raise ValueError(
                f"mask: learned position embedding supports h, w <= {limit}, got (h, w) = {(h, w)}"
            )
        col = self.col_embed.weight[:w]  # [w, F]
        row = self.row_embed.weight[:h]  # [h, F]
        pos = torch.cat((col[None, :, :].expand(h, w, -1), row[:, None, :].expand(h, w, -1)), dim=-1)
        return pos.permute(2, 0, 1)[None].expand(b, -1, -1, -1)


def build_position_encoding(cfg: ModelConfig, offset: float = 0.0) -> nn.Module:
    """Sine (default) or learned encoding with ``hidden_dim // 2`` features per axis."""
    n = cfg.hidden_dim // 2
    if cfg.position_embedding == "sine":
        return PositionEmbeddingSine(n, temperature=cfg.pe_temperature, normalize=True, offset=offset)
    if cfg.position_embedding == "learned":
        return PositionEmbeddingLearned(n)
    raise ValueError(
        f"ModelConfig.position_embedding: expected 'sine' or 'learned', got {cfg.position_embedding!r}"
    )
