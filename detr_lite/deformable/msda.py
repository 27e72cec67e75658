"""Multi-scale deformable attention (MSDA), the core of Deformable DETR.

The Deformable DETR process notes describe deformable attention by its three inputs:

1. the feature maps (here: all pyramid levels flattened into one ``value`` sequence),
2. a query element ``z_q`` (one row of ``query``),
3. a reference point ``p_q`` (``reference_points``, normalised (x, y) in [0, 1]).

For every query, head ``m``, level ``l`` and point ``k`` a linear layer predicts a sampling
offset and another predicts an attention weight (softmax over the ``L * P`` points of a head). The
value map is sampled bilinearly at ``p_q + offset`` and the samples are summed with those weights:

    out_m(q) = sum_{l, k} A_{mlqk} * V_m^l(p_q + Δp_{mlqk})

Instead of attending to all ``H*W`` keys, each query looks at only ``L*P`` points (16 in the
official model), which is why the encoder can afford all four pyramid levels.

Two interchangeable implementations of the sampling-and-sum core live here:

* :func:`ms_deform_attn_reference` - the readable one: ``F.grid_sample`` per level, then a
  weighted sum. This is the version notebook 07 builds by hand.
* :func:`ms_deform_attn` - the fast path, which the model uses on CPU (on CUDA ``MSDeformAttn``'s
  default ``implementation="auto"`` picks the reference: ``grid_sample`` is faster there). All levels are flattened into one
  zero-padded value table; every sample becomes 4 table rows (the bilinear corners) with weights
  ``attention * bilinear``, and ``F.embedding_bag(mode="sum")`` does gather + weight + sum in one
  fused kernel; its backward is written by hand. It lives in ``msda_fast.py``.

Both agree to float32 round-off; ``tests/test_msda.py`` checks them against a per-point Python
loop, against each other, against the official pure-PyTorch function, and with ``gradcheck``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr_lite.deformable.msda_fast import ms_deform_attn_core

__all__ = ["ms_deform_attn_reference", "ms_deform_attn", "MSDeformAttn"]


# ----------------------------------------------------------------------------------------------
# input validation (shared by both implementations)
# ----------------------------------------------------------------------------------------------
def _level_shapes(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> list[tuple[int, int]]:
    """Check the four core inputs agree; return the level sizes as Python ``(h, w)`` tuples."""
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be [N, S, M, D], got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "ms_deform_attn: sampling_locations must be [N, Lq, M, L, P, 2], "
            f"got shape {tuple(sampling_locations.shape)}"
        )
    n, s, m, _ = value.shape
    n2, lq, m2, n_levels, n_points, _ = sampling_locations.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape != (n_levels, 2):
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must be [L={n_levels}, 2] to match sampling_locations, "
            f"got shape {tuple(spatial_shapes.shape)}"
        )
    if (n2, m2) != (n, m):
        raise ValueError(
            f"ms_deform_attn: sampling_locations batch/heads {(n2, m2)} != value batch/heads {(n, m)}"
        )
    expected_w = (n, lq, m, n_levels, n_points)
    if tuple(attention_weights.shape) != expected_w:
        raise ValueError(
            f"ms_deform_attn: attention_weights must be {list(expected_w)}, got {list(attention_weights.shape)}"
        )
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    total = sum(h * w for h, w in shapes)
    if total != s:
        raise ValueError(
            f"ms_deform_attn: sum of H_l*W_l over spatial_shapes {shapes} is {total}, value has S={s}"
        )
    return shapes


# ----------------------------------------------------------------------------------------------
# reference implementation: grid_sample per level
# ----------------------------------------------------------------------------------------------
def ms_deform_attn_reference(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Readable MSDA core: bilinear sampling with ``F.grid_sample``, then a weighted sum.

    Args:
        value: ``[N, S, M, D]`` values of all levels, flattened and concatenated (S = sum H_l*W_l),
            split into ``M`` heads of ``D`` channels.
        spatial_shapes: ``[L, 2]`` int64, ``(H_l, W_l)`` of every level, in the order of ``value``.
        sampling_locations: ``[N, Lq, M, L, P, 2]`` normalised ``(x, y)``; (0, 0) is the top-left
            corner of the top-left pixel, (1, 1) the bottom-right corner of the bottom-right one.
        attention_weights: ``[N, Lq, M, L, P]`` (softmax-normalised over ``L*P`` by the caller).

    Returns:
        ``[N, Lq, M*D]``: the heads' weighted sums, concatenated head by head.
    """
    shapes = _level_shapes(value, spatial_shapes, sampling_locations, attention_weights)
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    per_level_values = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample wants coordinates in [-1, 1] (align_corners=False: -1 is the left edge of pixel 0)
    grids = 2.0 * sampling_locations - 1.0
    samples = []
    for lvl, (h, w) in enumerate(shapes):
        # [N, H*W, M, D] -> [N*M, D, H, W]: every head becomes its own "image"
        v = per_level_values[lvl].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]: a Lq x P "image" of sampling positions per head
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [N*M, D, Lq, L, P] weighted by [N*M, 1, Lq, L, P], summed over (L, P)
    sampled = torch.stack(samples, dim=-2)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels, n_points)
    out = (sampled * weights).sum(dim=(-1, -2))  # [N*M, D, Lq]
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()


def ms_deform_attn(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Fast MSDA core; same signature and result as :func:`ms_deform_attn_reference`.

    Gathers the 4 bilinear corners of every sample from one zero-padded table of all levels with
    ``F.embedding_bag`` (weights = attention x bilinear) and uses a hand-written backward
    (``detr_lite/deformable/msda_fast.py``). Works on CPU and CUDA; computes in float32 (float64
    inputs stay float64) and returns ``value.dtype``.
    """
    if torch.compiler.is_exporting():  # torch.export / ONNX: level sizes stay tensors (no .tolist())
        from detr_lite.deformable.msda_export import ms_deform_attn_gather

        return ms_deform_attn_gather(value, spatial_shapes, sampling_locations, attention_weights)
    shapes = _level_shapes(value, spatial_shapes, sampling_locations, attention_weights)
    return ms_deform_attn_core(value, sampling_locations, attention_weights, shapes)


# ----------------------------------------------------------------------------------------------
# the attention module
# ----------------------------------------------------------------------------------------------
class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with the official initialisation and state-dict names.

    Args:
        d_model: channels of queries and values. ``n_heads`` heads of ``d_model // n_heads``.
        n_levels: number of feature levels ``L``; n_points: points per head per level ``P``.
        implementation: ``"auto"`` (default: ``"fast"`` on CPU, ``"reference"`` on CUDA),
            ``"fast"`` (:func:`ms_deform_attn`) or ``"reference"`` (:func:`ms_deform_attn_reference`).
            Same maths, both computed in float32 under autocast. On a 2-core CPU the fast path is
            ~1.9x faster (forward + backward) with 2.7x less memory; on an H200 ``grid_sample`` is ~2x
            faster than it, at 1.3x more memory (``benchmarks/bench_msda.py``).

    ``forward(query [N, Lq, d], reference_points [N, Lq, L, 2 or 4], input_flatten [N, S, d],
    input_spatial_shapes [L, 2], input_level_start_index [L], input_padding_mask [N, S] or None)``
    returns ``[N, Lq, d]``. Reference points are normalised to the padded map ((0,0) top-left,
    (1,1) bottom-right); 4-d references are boxes ``(cx, cy, w, h)`` and scale the offsets.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        implementation: str = "auto",
    ):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model={d_model} must be divisible by n_heads={n_heads}")
        if implementation not in ("auto", "fast", "reference"):
            raise ValueError(
                f"MSDeformAttn: implementation must be 'auto', 'fast' or 'reference', got {implementation!r}"
            )
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.implementation = implementation
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Official init: offsets start on a ring of directions, attention starts uniform."""
        # head m looks in direction m * 2π / M; (cos, sin) scaled so the larger component is 1, so
        # the first point sits on the neighbouring pixel (8 heads -> the 8-neighbourhood); point k
        # goes k + 1 pixels out. Same pattern at every level.
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        direction = torch.stack([theta.cos(), theta.sin()], dim=-1)
        direction = direction / direction.abs().max(dim=-1, keepdim=True).values
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = direction.view(self.n_heads, 1, 1, 2) * scale  # [M, 1, P, 2]
        bias = bias.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        # zero weight and bias: softmax over the L*P logits starts uniform
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def _check(self, query, reference_points, input_flatten, spatial_shapes, level_start_index, padding_mask):
        name = type(self).__name__
        if query.dim() != 3 or query.shape[-1] != self.d_model:
            raise ValueError(f"{name}: query must be [N, Lq, {self.d_model}], got {tuple(query.shape)}")
        n, lq, _ = query.shape
        if input_flatten.dim() != 3 or input_flatten.shape[0] != n or input_flatten.shape[-1] != self.d_model:
            raise ValueError(
                f"{name}: input_flatten must be [N={n}, S, {self.d_model}], got {tuple(input_flatten.shape)}"
            )
        if spatial_shapes.dim() != 2 or spatial_shapes.shape != (self.n_levels, 2):
            raise ValueError(
                f"{name}: input_spatial_shapes must be [n_levels={self.n_levels}, 2], got {tuple(spatial_shapes.shape)}"
            )
        if level_start_index.shape != (self.n_levels,):
            raise ValueError(
                f"{name}: input_level_start_index must be [n_levels={self.n_levels}], "
                f"got {tuple(level_start_index.shape)}"
            )
        if (
            reference_points.dim() != 4
            or reference_points.shape[:3] != (n, lq, self.n_levels)
            or (reference_points.shape[-1] not in (2, 4))
        ):
            raise ValueError(
                f"{name}: reference_points must be [N={n}, Lq={lq}, n_levels={self.n_levels}, 2 or 4], "
                f"got {tuple(reference_points.shape)}"
            )
        sizes = spatial_shapes.prod(1)
        total = int(sizes.sum())
        if total != input_flatten.shape[1]:
            raise ValueError(
                f"{name}: sum of H_l*W_l over input_spatial_shapes {spatial_shapes.tolist()} is {total}, "
                f"input_flatten has S={input_flatten.shape[1]}"
            )
        expected_start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
        if not torch.equal(level_start_index.to(expected_start), expected_start):
            raise ValueError(
                f"{name}: input_level_start_index {level_start_index.tolist()} != cumulative level sizes "
                f"{expected_start.tolist()}"
            )
        if padding_mask is not None and tuple(padding_mask.shape) != tuple(input_flatten.shape[:2]):
            raise ValueError(
                f"{name}: input_padding_mask must be [N, S]={list(input_flatten.shape[:2])}, got {list(padding_mask.shape)}"
            )
        lo, hi = reference_points[..., :2].aminmax()
        if lo < 0 or hi > 1:
            raise ValueError(
                f"{name}: reference_points must be normalised to [0, 1], got values in [{float(lo):.3g}, {float(hi):.3g}]"
            )

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_level_start_index: Tensor,
        input_padding_mask: Tensor | None = None,
        *,
        validate: bool = True,
        return_sampling: bool = False,
    ):
        """Deformable attention of ``query`` over ``input_flatten`` (see class docstring).

        ``validate=False`` skips the input checks (used by the Deformable transformer, which
        validates once and whose encoder legitimately uses reference points beyond 1 for padded
        query cells). ``return_sampling=True`` also returns ``(sampling_locations [N, Lq, M, L, P, 2],
        attention_weights [N, Lq, M, L, P])`` for visualisation.
        """
        if validate:
            self._check(
                query,
                reference_points,
                input_flatten,
                input_spatial_shapes,
                input_level_start_index,
                input_padding_mask,
            )
        n, lq, _ = query.shape
        s = input_flatten.shape[1]
        m, n_levels, n_points = self.n_heads, self.n_levels, self.n_points

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, m, self.d_model // m)

        offsets = self.sampling_offsets(query).view(n, lq, m, n_levels, n_points, 2)
        logits = self.attention_weights(query).view(n, lq, m, n_levels * n_points)
        weights = logits.softmax(-1).view(n, lq, m, n_levels, n_points)

        # Per-level and per-reference factors are materialised at full size before the arithmetic:
        # broadcasting a [L, 1, 2]-like tensor over the 6-d [N, Lq, M, L, P, 2] directly gives inner
        # loops of 2 elements, ~3x slower on CPU (same values and gradients either way).
        full = (n, lq, m, n_levels, n_points, 2)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (W_l, H_l) to normalise
            normaliser = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            normaliser = normaliser[:, None, :].expand(n_levels, n_points, 2).contiguous()
            loc = reference_points[:, :, None, :, None, :].expand(full).contiguous() + offsets / normaliser
        elif reference_points.shape[-1] == 4:
            # offsets are relative to the reference box: P points span half its width/height
            centre = reference_points[:, :, None, :, None, :2].expand(full).contiguous()
            size = reference_points[:, :, None, :, None, 2:].expand(full).contiguous()
            loc = centre + offsets / n_points * size * 0.5
        else:
            raise ValueError(
                f"MSDeformAttn: reference_points last dim must be 2 or 4, got {reference_points.shape[-1]}"
            )

        impl = self.implementation
        if impl == "auto":
            impl = "reference" if value.is_cuda else "fast"
        if impl == "fast":  # computes in float32 itself (float64 stays float64)
            sampled = ms_deform_attn(value, input_spatial_shapes, loc, weights)
        else:  # grid_sample in float32 too, also under autocast (bf16 locations would be off by pixels)
            ct = torch.float64 if torch.float64 in (value.dtype, loc.dtype) else torch.float32
            with torch.autocast(value.device.type, enabled=False):
                sampled = ms_deform_attn_reference(
                    value.to(ct), input_spatial_shapes, loc.to(ct), weights.to(ct)
                )
            sampled = sampled.to(value.dtype)
        out = self.output_proj(sampled)
        if return_sampling:
            return out, (loc, weights)
        return out
