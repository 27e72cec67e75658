"""An export-friendly MSDA core: the level sizes stay tensors, so the traced graph follows the input size.

:func:`ms_deform_attn_gather` computes exactly what :func:`detr_lite.deformable.msda.ms_deform_attn_reference`
computes (bilinear sampling with zero padding, ``align_corners=False``, then the attention-weighted sum)
with nothing but tensor arithmetic and one ``gather``: the sizes ``(H_l, W_l)`` and the level start rows
are read from ``spatial_shapes`` *as tensors*, never as Python numbers (no ``.tolist()`` / ``.item()``).
``torch.export`` (and so ``torch.onnx.export(dynamo=True)``) can then trace a Deformable DETR whose input
height and width are dynamic; the reference path needs Python sizes to split the levels into images for
``grid_sample``, and the fast path's ``embedding_bag`` has no ONNX operator.

Every sample reads its 4 bilinear corners from the flattened values of its head: row
``start_l + y * W_l + x`` for an in-map corner (x in [0, W_l), y in [0, H_l)); out-of-map corners get weight
0, as ``grid_sample``'s ``padding_mode="zeros"``. It materialises ``[N*M, Lq*L*P*4, D]`` gathered rows
(4x the reference's samples), fine for inference; ``MSDeformAttn`` uses it only while exporting.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ms_deform_attn_gather"]


def ms_deform_attn_gather(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Same arguments and result as ``ms_deform_attn_reference``: ``value [N, S, M, D]``,
    ``spatial_shapes [L, 2]`` (H_l, W_l), ``sampling_locations [N, Lq, M, L, P, 2]`` normalised (x, y),
    ``attention_weights [N, Lq, M, L, P]`` -> ``[N, Lq, M*D]``; computed in float32 (float64 stays)."""
    n, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    ct = torch.float64 if torch.float64 in (value.dtype, sampling_locations.dtype) else torch.float32
    loc = sampling_locations.to(ct)
    sizes = spatial_shapes.to(value.device)
    hl = sizes[:, 0].view(1, 1, 1, n_levels, 1)  # int64 [1, 1, 1, L, 1]
    wl = sizes[:, 1].view(1, 1, 1, n_levels, 1)
    start = torch.cat([sizes.new_zeros(1), (sizes[:, 0] * sizes[:, 1]).cumsum(0)[:-1]]).view(1, 1, 1, n_levels, 1)

    # pixel coordinates: pixel i covers [i, i + 1), its centre is i + 0.5 (align_corners=False)
    x = loc[..., 0] * wl.to(ct) - 0.5
    y = loc[..., 1] * hl.to(ct) - 0.5
    x0f, y0f = x.floor(), y.floor()
    fx, fy = x - x0f, y - y0f
    x0, y0 = x0f.long(), y0f.long()
    attn = attention_weights.to(ct)
    rows, weights = [], []
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < wl) & (yi >= 0) & (yi < hl)
            row = start + yi.clamp(min=0) * wl + xi.clamp(min=0)
            rows.append(torch.where(inside, row, torch.zeros_like(row)))
            weights.append(wx * wy * attn * inside.to(ct))
    # [N, Lq, M, L, P, 4] -> per head [N*M, Lq * L * P * 4]
    rows = torch.stack(rows, -1).permute(0, 2, 1, 3, 4, 5).reshape(n * m, -1)
    weights = torch.stack(weights, -1).permute(0, 2, 1, 3, 4, 5).reshape(n * m, lq, -1)
    table = value.to(ct).permute(0, 2, 1, 3).reshape(n * m, s, d)
    gathered = torch.gather(table, 1, rows[..., None].expand(-1, -1, d))  # [N*M, K, D]
    out = (gathered.view(n * m, lq, -1, d) * weights[..., None]).sum(2)  # [N*M, Lq, D]
    return out.view(n, m, lq, d).permute(0, 2, 1, 3).reshape(n, lq, m * d).to(value.dtype)
