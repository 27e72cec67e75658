"""Multi-scale deformable attention (MSDA), the core of Deformable DETR.

The seed notes describe deformable attention by its three inputs:

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
  fused kernel. Its backward is written by hand (chunked ``index_add_`` / ``index_select``), so it
  never materialises the ``[..., L*P, D]`` sample tensor that the reference keeps for autograd.

Both agree to float32 round-off; ``tests/test_msda.py`` checks them against a per-point Python
loop, against each other, against the official pure-PyTorch function, and with ``gradcheck``.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


# ----------------------------------------------------------------------------------------------
# fast path: one padded value table + embedding_bag, hand-written backward
# ----------------------------------------------------------------------------------------------
# Each level is padded with 1 zero pixel on the top/left and 2 on the bottom/right. After clamping
# the pixel coordinate to [-1, W] every bilinear corner (x0 in [-1, W], x0 + 1 in [0, W + 1]) is a
# real row of the table, so no per-corner validity mask is needed: outside corners read zeros,
# exactly what grid_sample's padding_mode="zeros" does.
_PAD_BEFORE, _PAD_AFTER = 1, 2
# rows of [K, D] gathered per backward chunk on CPU (keeps the working set in cache)
_CPU_CHUNK_ELEMS = 1 << 19
_GPU_CHUNK_ELEMS = 1 << 26


def _pad_levels(value: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
    """``[N, S, M, D]`` -> padded table ``[N*M*Sp, D]`` (head-major, level after level)."""
    n, _, m, d = value.shape
    levels = value.split([h * w for h, w in shapes], dim=1)
    padded = []
    for v, (h, w) in zip(levels, shapes):
        v = v.view(n, h, w, m, d).permute(0, 3, 1, 2, 4)  # [N, M, H, W, D]
        v = F.pad(v, (0, 0, _PAD_BEFORE, _PAD_AFTER, _PAD_BEFORE, _PAD_AFTER))
        padded.append(v.reshape(n, m, -1, d))
    return torch.cat(padded, dim=2).reshape(-1, d)


def _unpad_levels(table: Tensor, shapes: list[tuple[int, int]], n: int, m: int) -> Tensor:
    """Inverse of :func:`_pad_levels` (drops the padding): ``[N*M*Sp, D]`` -> ``[N, S, M, D]``."""
    d = table.shape[-1]
    sizes = [(h + _PAD_BEFORE + _PAD_AFTER) * (w + _PAD_BEFORE + _PAD_AFTER) for h, w in shapes]
    levels = table.view(n, m, -1, d).split(sizes, dim=2)
    out = []
    for v, (h, w) in zip(levels, shapes):
        hp, wp = h + _PAD_BEFORE + _PAD_AFTER, w + _PAD_BEFORE + _PAD_AFTER
        v = v.view(n, m, hp, wp, d)[:, :, _PAD_BEFORE : _PAD_BEFORE + h, _PAD_BEFORE : _PAD_BEFORE + w]
        out.append(v.permute(0, 2, 3, 1, 4).reshape(n, h * w, m, d))
    return torch.cat(out, dim=1)


def _level_constants(shapes: list[tuple[int, int]], device, dtype):
    """Per-level tensors shaped to broadcast over ``[N, Lq, M, L, P, ...]``.

    ``size`` [L, 1, 2] = (W_l, H_l); ``row_len`` [L, 1] = padded width; ``offset`` [L, 1] = table row of
    padded pixel (0, 0) of the level relative to its head's block (includes the 1-pixel border);
    ``corners`` [L, 1, 4] = row offsets of the 4 bilinear corners; ``head_size`` = rows per head.
    """
    pad = _PAD_BEFORE + _PAD_AFTER
    size = torch.tensor([[w, h] for h, w in shapes], device=device, dtype=dtype).view(-1, 1, 2)
    row_len = [w + pad for _, w in shapes]
    starts, total = [], 0
    for (h, _), wp in zip(shapes, row_len):
        starts.append(total + _PAD_BEFORE * wp + _PAD_BEFORE)
        total += (h + pad) * wp
    row_len_t = torch.tensor(row_len, device=device, dtype=dtype).view(-1, 1)
    offset = torch.tensor(starts, device=device, dtype=dtype).view(-1, 1)
    corners = torch.tensor([[0, 1, wp, wp + 1] for wp in row_len], device=device, dtype=torch.int32)
    return size, row_len_t, offset, corners.view(-1, 1, 4), total


def _chunk_rows(num_rows: int, k: int, d: int, device: torch.device) -> int:
    budget = _GPU_CHUNK_ELEMS if device.type == "cuda" else _CPU_CHUNK_ELEMS
    return max(1, min(num_rows, budget // max(1, k * d)))


def _backward_rows(table, idx, weights, go, grad_table, grad_w, lo: int, hi: int, step: int) -> None:
    """Rows ``lo:hi`` of the backward, in cache-sized chunks: scatter ``weight * grad`` into
    ``grad_table`` (if given) and ``grad_w[r, k] = <grad[r], table[idx[r, k]]>`` (if given)."""
    k, d = idx.shape[1], table.shape[1]
    # one reusable chunk buffer (fresh multi-MB allocations per chunk would dominate on CPU)
    buf_all = torch.empty(min(step, hi - lo), k, d, device=table.device, dtype=table.dtype)
    for s in range(lo, hi, step):
        e = min(hi, s + step)
        idx_c = idx[s:e].reshape(-1).long()  # int64: index_add_ takes its fast scatter path
        buf = buf_all[: e - s]
        if grad_table is not None:  # d out / d table[row] = sum of weight * grad over samples reading it
            torch.mul(weights[s:e, :, None], go[s:e, None, :], out=buf)
            grad_table.index_add_(0, idx_c, buf.view(-1, d))
        if grad_w is not None:  # d out / d weight = <grad, the row it multiplied>
            torch.index_select(table, 0, idx_c, out=buf.view(-1, d))
            buf.mul_(go[s:e, None, :])
            torch.sum(buf, dim=-1, out=grad_w[s:e])


class _MSDeformAttnFunction(torch.autograd.Function):
    """Fast MSDA core with a memory-light, hand-written backward (see module docstring).

    Bags are the (n, q, m) triples in the input order, so the ``[N*Lq*M, D]`` result is already the
    ``[N, Lq, M*D]`` output; each bag holds ``L*P*4`` table rows (the corners) with weights
    ``attention * bilinear``.
    """

    @staticmethod
    def forward(ctx, value, sampling_locations, attention_weights, shapes):
        n, _, m, d = value.shape
        _, lq, _, n_levels, n_points, _ = sampling_locations.shape
        # compute in float32 (float64 stays float64, e.g. for gradcheck); output in value's dtype
        ct = torch.float64 if torch.float64 in (value.dtype, sampling_locations.dtype) else torch.float32
        dev = value.device
        table = _pad_levels(value.to(ct), shapes)
        size, row_len, offset, corners, head_size = _level_constants(shapes, dev, ct)

        # pixel coordinates (align_corners=False: pixel i covers [i, i + 1), centre i + 0.5), clamped
        # to [-1, W] so that every corner is a row of the padded table (outside corners read zeros)
        xy = torch.addcmul(torch.tensor(-0.5, device=dev, dtype=ct), sampling_locations.to(ct), size)
        xy_clamped = torch.clamp(xy, min=torch.full_like(size, -1.0), max=size)
        xy0 = xy_clamped.floor()
        frac = xy_clamped - xy0  # [N, Lq, M, L, P, 2] (fx, fy)
        # row of the top-left corner: offset + y0 * padded_W + x0 (exact in floating point) + head block
        idx00 = torch.addcmul(xy0[..., 0], xy0[..., 1], row_len).add_(offset).to(torch.int32)
        head_base = torch.arange(n * m, device=dev, dtype=torch.int32).view(n, 1, m, 1, 1) * head_size
        idx = (idx00 + head_base).unsqueeze(-1) + corners  # [N, Lq, M, L, P, 4]

        lin = torch.stack([1 - frac, frac], dim=-2)  # [..., corner 0/1, (x, y)]
        wx, wy = lin[..., 0], lin[..., 1]
        attn = attention_weights.to(ct)
        # folded weight of every corner: attention * bilinear, corner order (y0x0, y0x1, y1x0, y1x1)
        weights = ((wy * attn.unsqueeze(-1)).unsqueeze(-1) * wx.unsqueeze(-2)).flatten(-2)
        rows, k = n * lq * m, n_levels * n_points * 4
        idx = idx.view(rows, k)
        weights = weights.view(rows, k)
        out = F.embedding_bag(idx, table, per_sample_weights=weights, mode="sum")  # [rows, D]
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(table, idx, weights, lin, attn, xy)
            ctx.meta = (shapes, value.dtype, sampling_locations.dtype, attention_weights.dtype)
        return out.view(n, lq, m * d).to(value.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        table, idx, weights, lin, attn, xy = ctx.saved_tensors
        shapes, v_dtype, loc_dtype, attn_dtype = ctx.meta
        n, lq, m, n_levels, n_points = attn.shape
        rows, k = idx.shape
        d = table.shape[-1]
        need_v, need_loc, need_attn = ctx.needs_input_grad[:3]
        go = grad_out.to(table.dtype).reshape(rows, d).contiguous()

        grad_table = torch.zeros_like(table) if need_v else None
        need_w = need_loc or need_attn
        grad_w = torch.empty(rows, k, device=table.device, dtype=table.dtype) if need_w else None
        step = _chunk_rows(rows, k, d, table.device)
        workers = min(torch.get_num_threads(), n) if table.device.type == "cpu" else 1
        if workers <= 1:
            _backward_rows(table, idx, weights, go, grad_table, grad_w, 0, rows, step)
        else:
            # ATen's CPU scatter (index_add_) slows down with several OpenMP threads on cache-sized
            # chunks (and collapses on a busy machine). Instead: one single-threaded loop per Python
            # thread, each over whole images, whose table rows (and gradients) are disjoint.
            per_image = rows // n
            edges = [round(i * n / workers) * per_image for i in range(workers + 1)]
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(workers) as pool:
                    jobs = [
                        pool.submit(_backward_rows, table, idx, weights, go, grad_table, grad_w, lo, hi, step)
                        for lo, hi in zip(edges[:-1], edges[1:])
                    ]
                    for job in jobs:
                        job.result()
            finally:
                torch.set_num_threads(threads)

        grad_value = grad_loc = grad_attn = None
        if need_v:
            grad_value = _unpad_levels(grad_table, shapes, n, m).to(v_dtype)
        if need_w:
            g = grad_w.view(n, lq, m, n_levels, n_points, 2, 2)  # (..., y corner, x corner)
            wx, wy = lin[..., 0], lin[..., 1]
            # out = attn * sum_ab wy_a wx_b g_ab, with wx = (1 - fx, fx) and wy = (1 - fy, fy)
            rows_x = (g * wx.unsqueeze(-2)).sum(-1)  # [..., 2]: interpolated along x, per y corner
            if need_attn:
                grad_attn = (rows_x * wy).sum(-1).to(attn_dtype)
            if need_loc:
                cols_y = (g * wy.unsqueeze(-1)).sum(-2)  # [..., 2]: interpolated along y, per x corner
                d_frac = torch.stack([cols_y[..., 1] - cols_y[..., 0], rows_x[..., 1] - rows_x[..., 0]], -1)
                size = torch.tensor([[w, h] for h, w in shapes], device=g.device, dtype=g.dtype).view(
                    -1, 1, 2
                )
                # x = loc_x * W - 0.5; zero gradient where the coordinate was clamped (outside the map)
                inside = (xy > -1) & (xy < size)
                grad_loc = (d_frac * attn.unsqueeze(-1) * size * inside).to(loc_dtype)
        return grad_value, grad_loc, grad_attn, None


def ms_deform_attn(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Fast MSDA core; same signature and result as :func:`ms_deform_attn_reference`.

    Gathers the 4 bilinear corners of every sample from one zero-padded table of all levels with
    ``F.embedding_bag`` (weights = attention x bilinear) and uses a hand-written backward. Works on
    CPU and CUDA; computes in float32 (float64 inputs stay float64) and returns ``value.dtype``.
    """
    shapes = _level_shapes(value, spatial_shapes, sampling_locations, attention_weights)
    return _MSDeformAttnFunction.apply(value, sampling_locations, attention_weights, shapes)


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

        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (W_l, H_l) to normalise
            normaliser = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            loc = (
                reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            # offsets are relative to the reference box: P points span half its width/height
            loc = (
                reference_points[:, :, None, :, None, :2]
                + offsets / n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
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
