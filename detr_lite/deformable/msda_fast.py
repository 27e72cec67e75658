"""The fast CPU path of multi-scale deformable attention (the maths of ``msda.py``, reorganised).

:func:`detr_lite.deformable.msda.ms_deform_attn_reference` is the readable version: one
``grid_sample`` per level, then a weighted sum. This module computes the same numbers faster on CPU:

* **Forward.** All levels go into one zero-padded value table; every sample becomes the 4 table rows
  of its bilinear corners with weights ``attention * bilinear``, and ``F.embedding_bag(mode="sum")``
  does gather + weight + sum in one kernel, without the ``[..., L*P, D]`` sample tensor.
* **Backward**, written by hand: ``d table`` scatters ``weight * d out`` into the rows each sample
  read (``index_add_``), ``d weight`` is the dot product of ``d out`` with the row it multiplied
  (``index_select``), in cache-sized chunks; the bilinear weights then give ``d locations`` and
  ``d attention``. Nothing of size ``[..., L*P, D]`` is kept for autograd.

``tests/test_msda.py`` checks every path against the reference, a per-point loop and ``gradcheck``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ms_deform_attn_core"]

# ----------------------------------------------------------------------------------------------
# the padded value table
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


def _level_constants(shapes: list[tuple[int, int]], n_points: int, device, dtype):
    """Per-sample constants laid out flat along the ``L * P`` samples of a row, so that every
    elementwise op below runs over ``[rows, L*P(*2)]`` with a long contiguous inner loop (broadcasting
    a ``[L, 1, 2]`` tensor over ``[N, Lq, M, L, P, 2]`` instead is ~10-100x slower on CPU).

    ``size`` [L*P*2] = (W_l, H_l) per sample; ``row_len`` [L*P] = padded width; ``offset`` [L*P] =
    table row of padded pixel (0, 0) of the level within its head's block (after the 1-pixel border);
    ``corners`` [L*P*4] = row offsets of the 4 bilinear corners; ``head_size`` = rows per head.
    """
    pad = _PAD_BEFORE + _PAD_AFTER
    row_len = [w + pad for _, w in shapes]
    starts, total = [], 0
    for (h, _), wp in zip(shapes, row_len):
        starts.append(total + _PAD_BEFORE * wp + _PAD_BEFORE)
        total += (h + pad) * wp

    def per_sample(values, dt):  # one entry per level -> repeated for each of its P points
        t = torch.tensor(values, device=device, dtype=dt)
        return t.repeat_interleave(n_points, dim=0).reshape(-1)

    size = per_sample([[w, h] for h, w in shapes], dtype)
    corners = per_sample([[0, 1, wp, wp + 1] for wp in row_len], torch.int32)
    return size, per_sample(row_len, dtype), per_sample(starts, dtype), corners, total


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


def _gather_scatter_backward(table, idx, weights, go, n: int, need_v: bool, need_w: bool):
    """Scatter / gather over the table rows, in cache-sized chunks (one Python thread per image
    group on CPU): ``(d table, d weight)``, each None where not needed."""
    rows, k = idx.shape
    d = table.shape[-1]
    grad_table = torch.zeros_like(table) if need_v else None
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

    return grad_table, grad_w


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
        rows, lp = n * lq * m, n_levels * n_points
        # compute in float32 (float64 stays float64, e.g. for gradcheck); output in value's dtype
        ct = torch.float64 if torch.float64 in (value.dtype, sampling_locations.dtype) else torch.float32
        dev = value.device
        table = _pad_levels(value.to(ct), shapes)
        size, row_len, offset, corners, head_size = _level_constants(shapes, n_points, dev, ct)

        # pixel coordinates (align_corners=False: pixel i covers [i, i + 1), centre i + 0.5), clamped
        # to [-1, W] so that every corner is a row of the padded table (outside corners read zeros)
        loc = sampling_locations.to(ct).reshape(rows, lp * 2)
        xy = torch.addcmul(torch.tensor(-0.5, device=dev, dtype=ct), loc, size)  # [rows, L*P*2]
        xy_clamped = torch.clamp(xy, min=torch.full_like(size, -1.0), max=size)
        xy0 = xy_clamped.floor()
        frac = (xy_clamped - xy0).view(rows, lp, 2)  # (fx, fy)
        xy0 = xy0.view(rows, lp, 2)
        # row of the top-left corner: offset + y0 * padded_W + x0 (exact in floating point) + head block
        idx00 = torch.addcmul(xy0[..., 0], xy0[..., 1], row_len).add_(offset).to(torch.int32)
        head = torch.arange(m, device=dev, dtype=torch.int32).repeat(n * lq).view(rows, 1)
        image = torch.arange(n, device=dev, dtype=torch.int32).repeat_interleave(lq * m).view(rows, 1)
        idx00 += (image * m + head) * head_size
        idx = idx00.repeat_interleave(4, dim=1) + corners  # [rows, L*P*4]

        fx, fy = frac[..., 0], frac[..., 1]
        gx, gy = 1 - fx, 1 - fy
        attn = attention_weights.to(ct).reshape(rows, lp)
        # folded weight of every corner: attention * bilinear, corner order (y0x0, y0x1, y1x0, y1x1)
        top, bottom = gy * attn, fy * attn
        weights = torch.stack([top * gx, top * fx, bottom * gx, bottom * fx], dim=-1).view(rows, lp * 4)
        out = F.embedding_bag(idx, table, per_sample_weights=weights, mode="sum")  # [rows, D]
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(table, idx, weights, frac, attn, xy, size)
            ctx.meta = (shapes, n, m, sampling_locations.shape, value.dtype, sampling_locations.dtype,
                        attention_weights.dtype)  # fmt: skip
        return out.view(n, lq, m * d).to(value.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        table, idx, weights, frac, attn, xy, size = ctx.saved_tensors
        shapes, n, m, loc_shape, v_dtype, loc_dtype, attn_dtype = ctx.meta
        rows, k = idx.shape
        d = table.shape[-1]
        need_v, need_loc, need_attn = ctx.needs_input_grad[:3]
        go = grad_out.to(table.dtype).reshape(rows, d).contiguous()
        need_w = need_loc or need_attn
        grad_table, grad_w = _gather_scatter_backward(table, idx, weights, go, n, need_v, need_w)

        grad_value = grad_loc = grad_attn = None
        if need_v:
            grad_value = _unpad_levels(grad_table, shapes, n, m).to(v_dtype)
        if need_w:
            # d out / d (corner weight) -> d attention and d (fx, fy); out = attn * sum_ab wy_a wx_b g_ab
            # with wx = (1 - fx, fx) and wy = (1 - fy, fy)
            g00, g01, g10, g11 = grad_w.view(rows, -1, 4).unbind(-1)
            fx, fy = frac[..., 0], frac[..., 1]
            gx, gy = 1 - fx, 1 - fy
            row0, row1 = g00 * gx + g01 * fx, g10 * gx + g11 * fx  # interpolated along x, per y corner
            if need_attn:
                grad_attn = (row0 * gy + row1 * fy).view(loc_shape[:-1]).to(attn_dtype)
            if need_loc:
                col0, col1 = g00 * gy + g10 * fy, g01 * gy + g11 * fy  # along y, per x corner
                d_frac = torch.stack([col1 - col0, row1 - row0], -1).view(rows, -1)
                # x = loc_x * W - 0.5; zero gradient where the coordinate was clamped (outside the map)
                inside = (xy > -1) & (xy < size)
                grad_loc = d_frac * attn.repeat_interleave(2, dim=1) * size * inside
                grad_loc = grad_loc.view(loc_shape).to(loc_dtype)
        return grad_value, grad_loc, grad_attn, None


def ms_deform_attn_core(value: Tensor, sampling_locations: Tensor, attention_weights: Tensor, shapes) -> Tensor:
    """The fast path on validated inputs (``shapes``: the level sizes as Python ``(h, w)`` tuples)."""
    return _MSDeformAttnFunction.apply(value, sampling_locations, attention_weights, shapes)
