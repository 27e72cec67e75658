"""Positional encodings against a hand-written formula and their padding invariance."""

from __future__ import annotations

import math

import pytest
import torch

from detr_lite.config import ModelConfig
from detr_lite.position_encoding import (
    PositionEmbeddingLearned,
    PositionEmbeddingSine,
    build_position_encoding,
)


def sine_by_hand(mask: torch.Tensor, feats: int, offset: float = 0.0, temperature: float = 10000.0):
    """Loop-by-loop transcription of the formula (one image, tiny)."""
    h, w = mask.shape
    out = torch.zeros(2 * feats, h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            y = sum(not mask[r, j] for r in range(i + 1))
            x = sum(not mask[i, c] for c in range(j + 1))
            y_last = sum(not mask[r, j] for r in range(h))
            x_last = sum(not mask[i, c] for c in range(w))
            y = (y + offset) / (y_last + 1e-6) * 2 * math.pi
            x = (x + offset) / (x_last + 1e-6) * 2 * math.pi
            for c in range(feats):
                div = temperature ** (2 * (c // 2) / feats)
                fn = math.sin if c % 2 == 0 else math.cos
                out[c, i, j] = fn(y / div)  # first half: rows
                out[feats + c, i, j] = fn(x / div)  # second half: columns
    return out


@pytest.mark.parametrize("offset", [0.0, -0.5])
def test_sine_matches_formula_on_tiny_mask(offset):
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[1, 2, :] = True  # image 1: 2 x 3 valid, padded below and right
    mask[1, :, 3] = True
    pe = PositionEmbeddingSine(num_pos_feats=6, offset=offset)(mask)
    assert pe.shape == (2, 12, 3, 4) and pe.dtype == torch.float32
    for b in range(2):
        expected = sine_by_hand(mask[b], 6, offset).float()
        valid = ~mask[b]
        torch.testing.assert_close(pe[b][:, valid], expected[:, valid], atol=1e-5, rtol=0)


def test_sine_padding_invariance():
    """The valid region of a padded image gets the codes of the same image without padding."""
    pe = PositionEmbeddingSine(128)
    small = pe(torch.zeros(1, 5, 7, dtype=torch.bool))
    mask = torch.ones(1, 9, 11, dtype=torch.bool)
    mask[:, :5, :7] = False
    padded = pe(mask)
    torch.testing.assert_close(padded[:, :, :5, :7], small, atol=1e-5, rtol=0)
    assert padded.shape == (1, 256, 9, 11)


def test_learned_embedding():
    torch.manual_seed(0)
    pe = PositionEmbeddingLearned(16)
    out = pe(torch.zeros(2, 3, 5, dtype=torch.bool))
    assert out.shape == (2, 32, 3, 5)
    torch.testing.assert_close(out[1, :16, 2, 4], pe.col_embed.weight[4])
    torch.testing.assert_close(out[0, 16:, 2, 4], pe.row_embed.weight[2])
    with pytest.raises(ValueError, match="h, w <= 50"):
        pe(torch.zeros(1, 51, 3, dtype=torch.bool))


def test_builder_and_bad_mask():
    assert isinstance(build_position_encoding(ModelConfig(hidden_dim=64)), PositionEmbeddingSine)
    pe = build_position_encoding(ModelConfig(hidden_dim=64, position_embedding="learned"))
    assert isinstance(pe, PositionEmbeddingLearned) and pe.row_embed.embedding_dim == 32
    with pytest.raises(ValueError, match="position_embedding"):
        build_position_encoding(ModelConfig(position_embedding="rope"))
    with pytest.raises(ValueError, match=r"mask: expected a bool tensor \[B, h, w\]"):
        PositionEmbeddingSine()(torch.zeros(3, 4))
