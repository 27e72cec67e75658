"""Shared pieces of the official-parity tests (test_official_detr.py, test_official_deformable.py).

The committed fixtures ``tests/fixtures/official_*/outputs.pt`` were produced from exactly these
tensors: any change here must keep them bit-identical.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def official_like_state_dict(
    keys_and_shapes: list, seed: int, aliases: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Deterministic, well-scaled random weights for the given keys (visited in sorted order).

    Matrices / conv kernels / embeddings: ``randn / sqrt(fan_in)``; norm weights: ``1 + 0.1 randn``;
    biases: ``0.02 randn``; BN ``running_mean``: ``0.1 randn``; ``running_var``: ``U(0.5, 1.5)``.
    ``aliases`` maps a key to the key whose tensor it shares (it gets the very same values).
    """
    aliases = aliases or {}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sorted(keys_and_shapes):
        if key in aliases:
            continue
        shape = tuple(shape)
        if key.endswith("running_var"):
            t = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("running_mean"):
            t = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif key.endswith("weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = 0.02 * torch.randn(shape, generator=g)
        out[key] = t
    for key, source in aliases.items():
        out[key] = out[source]
    return out


def parity_batch(
    size: tuple[int, int], valid: tuple[int, int], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image 0 is ``size`` (H, W); image 1 is ``valid`` (H, W), zero-padded (mask True) to ``size``."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, *size, generator=g)
    mask = torch.zeros(2, *size, dtype=torch.bool)
    mask[1, valid[0] :, :] = True
    mask[1, :, valid[1] :] = True
    images[1, :, mask[1]] = 0.0
    return images, mask


def load_fixture(fixtures: Path) -> tuple[dict, dict]:
    """The recorded official key names/shapes (``keys.json``) and outputs (``outputs.pt``)."""
    keys = json.loads((fixtures / "keys.json").read_text())
    outputs = torch.load(fixtures / "outputs.pt", weights_only=True)
    return keys, outputs
