"""Multi-scale deformable attention: both cores against a per-point loop, the official function,
each other and gradcheck; the module's initialisation, masking, location formulas and errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from detr_lite.deformable.msda import MSDeformAttn, ms_deform_attn, ms_deform_attn_reference

FIXTURES = Path(__file__).parent / "fixtures" / "official_deformable"
CORES = [ms_deform_attn_reference, ms_deform_attn]


def naive_msda(value, shapes, loc, attn):
    """Per-point Python loop: bilinear interpolation with zero padding, pixel centres at i + 0.5."""
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = loc.shape
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(n, lq, m, d, dtype=value.dtype)
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                for lvl, (h, w) in enumerate(shapes):
                    for p in range(n_points):
                        x = float(loc[b, q, head, lvl, p, 0]) * w - 0.5
                        y = float(loc[b, q, head, lvl, p, 1]) * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = torch.zeros(d, dtype=value.dtype)
                        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= xx < w and 0 <= yy < h:
                                    sample += wx * wy * value[b, starts[lvl] + yy * w + xx, head]
                        out[b, q, head] += attn[b, q, head, lvl, p] * sample
    return out.reshape(n, lq, m * d)


def random_inputs(shapes, n=2, m=2, d=3, n_points=2, lq=5, dtype=torch.float64, seed=0, spread=1.4):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=g, dtype=dtype)
    # some points fall outside [0, 1] to exercise the zero padding
    loc = torch.rand(n, lq, m, len(shapes), n_points, 2, generator=g, dtype=dtype) * spread - (spread - 1) / 2
    attn = torch.rand(n, lq, m, len(shapes), n_points, generator=g, dtype=dtype)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    return value, torch.tensor(shapes, dtype=torch.int64), loc, attn


@pytest.mark.parametrize("core", CORES)
def test_core_matches_per_point_loop(core):
    shapes = [(4, 5), (2, 3), (1, 1)]
    value, ss, loc, attn = random_inputs(shapes)
    # exact corner/edge cases: pixel centres, the map border, and far outside
    loc[0, 0, 0, 0, 0] = torch.tensor([0.5 / 5, 0.5 / 4], dtype=loc.dtype)
    loc[0, 0, 0, 0, 1] = torch.tensor([1.0, 0.0], dtype=loc.dtype)
    loc[0, 1, 1, 1, 0] = torch.tensor([-3.0, 5.0], dtype=loc.dtype)
    expected = naive_msda(value, shapes, loc, attn)
    got = core(value, ss, loc, attn)
    assert got.shape == (2, 5, 2 * 3)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("core", CORES)
def test_core_matches_official_pytorch_function(core):
    """Fixture: outputs of the official ``ms_deform_attn_core_pytorch`` (float64) on seeded inputs."""
    fx = json.loads((FIXTURES / "msda_core.json").read_text())

    def tensor(key, shape_key):
        return torch.tensor(fx[key], dtype=torch.float64).view(fx[shape_key])

    value = tensor("value", "value_shape")
    loc = tensor("sampling_locations", "loc_shape")
    attn = tensor("attention_weights", "attn_shape")
    expected = tensor("output", "output_shape")
    got = core(value, torch.tensor(fx["spatial_shapes"]), loc, attn)
    assert (got - expected).abs().max() < 1e-10
    # and in float32, as the model runs it
    got32 = core(value.float(), torch.tensor(fx["spatial_shapes"]), loc.float(), attn.float())
    assert (got32.double() - expected).abs().max() < 1e-5


@pytest.mark.parametrize("core", CORES)
def test_core_gradcheck_float64(core):
    shapes = [(3, 4), (2, 2)]
    value, ss, loc, attn = random_inputs(shapes, n=1, m=2, d=2, n_points=2, lq=3, seed=3)
    value.requires_grad_()
    loc.requires_grad_()
    attn.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, p, a: core(v, ss, p, a), (value, loc, attn), eps=1e-6, atol=1e-6
    )


def test_fast_equals_reference_float32_realistic():
    """Encoder-like self-attention over a 4-level pyramid: forward and all three gradients."""
    shapes = [(24, 30), (12, 15), (6, 8), (3, 4)]
    value, ss, loc, attn = random_inputs(
        shapes, n=2, m=8, d=32, n_points=4, lq=400, dtype=torch.float32, spread=1.2
    )
    grad_out = torch.randn(2, 400, 8 * 32, generator=torch.Generator().manual_seed(5))
    results = []
    for core in CORES:
        inputs = [t.clone().requires_grad_() for t in (value, loc, attn)]
        out = core(inputs[0], ss, inputs[1], inputs[2])
        grads = torch.autograd.grad(out, inputs, grad_out)
        results.append((out, *grads))
    for name, ref, fast in zip(("output", "value", "loc", "attn"), *results):
        scale = ref.abs().max().clamp_min(1.0)
        err = ((ref - fast).abs().max() / scale).item()
        assert err <= 1e-5, f"{name}: relative max error {err:.2e}"


def test_fast_path_partial_grads_and_dtype():
    shapes = [(3, 4), (2, 2)]
    value, ss, loc, attn = random_inputs(shapes, dtype=torch.float32)
    value.requires_grad_()  # only value needs a gradient
    out = ms_deform_attn(value, ss, loc, attn)
    (grad,) = torch.autograd.grad(out.sum(), value)
    assert grad.shape == value.shape and grad.dtype == torch.float32
    ref = ms_deform_attn_reference(value, ss, loc, attn)
    (grad_ref,) = torch.autograd.grad(ref.sum(), value)
    torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize("core", CORES)
def test_core_errors_name_sizes(core):
    value, ss, loc, attn = random_inputs([(3, 4), (2, 2)])
    with pytest.raises(ValueError, match="sum of H_l\\*W_l.*is 16.*S=15"):
        core(value[:, :15], ss, loc, attn)
    with pytest.raises(ValueError, match="spatial_shapes must be \\[L=2, 2\\]"):
        core(value, ss[:1], loc, attn)
    with pytest.raises(ValueError, match="attention_weights must be"):
        core(value, ss, loc, attn[..., :1])
    with pytest.raises(ValueError, match="value must be \\[N, S, M, D\\]"):
        core(value[0], ss, loc, attn)


# ------------------------------------------------------------------------------------------------
# module
# ------------------------------------------------------------------------------------------------
def _module_inputs(n=2, d=32, shapes=((8, 10), (4, 5)), lq=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(shapes)
    sizes = ss.prod(1)
    start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    s = int(sizes.sum())
    query = torch.randn(n, lq, d, generator=g)
    src = torch.randn(n, s, d, generator=g)
    ref = torch.rand(n, lq, len(shapes), 2, generator=g)
    return query, ref, src, ss, start


def test_module_init_matches_official_pattern():
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=8, n_points=3)
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
    bias = attn.sampling_offsets.bias.view(8, 2, 3, 2)
    # head 0 looks right (1, 0); head 2 looks down (0, 1); head 1 diagonal (1, 1) after max-abs scaling
    torch.testing.assert_close(bias[0, 0, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(bias[1, 0, 0], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(bias[2, 0, 0], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[4, 0, 0], torch.tensor([-1.0, 0.0]), atol=1e-6, rtol=0)
    # point k sits k + 1 steps out; every level repeats the pattern
    torch.testing.assert_close(bias[:, :, 2], 3 * bias[:, :, 0])
    torch.testing.assert_close(bias[:, 1], bias[:, 0])
    assert bias.abs().max(-1).values[:, :, 0].eq(1).all()
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.bias) == 0
    assert torch.count_nonzero(attn.value_proj.bias) == 0 and torch.count_nonzero(attn.output_proj.bias) == 0
    # xavier-uniform bound sqrt(6 / (fan_in + fan_out))
    assert attn.value_proj.weight.abs().max() <= math.sqrt(6 / 64)
    # zero attention logits -> uniform weights 1 / (L * P); offsets -> ring around the reference
    query, ref, src, ss, start = _module_inputs()
    _, (loc, weights) = attn(query, ref, src, ss, start, return_sampling=True)
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 6))
    w_l = torch.tensor([10.0, 5.0])
    expected_x = ref[:, :, None, :, None, 0] + bias[None, None, :, :, :, 0] / w_l[:, None]
    torch.testing.assert_close(loc[..., 0], expected_x)


def test_module_location_formulas_2d_and_4d():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.1)
    query, ref, src, ss, start = _module_inputs()
    offsets = attn.sampling_offsets(query).view(2, 6, 4, 2, 2, 2)
    _, (loc, _) = attn(query, ref, src, ss, start, return_sampling=True)
    norm = torch.tensor([[10.0, 8.0], [5.0, 4.0]])  # (W_l, H_l)
    torch.testing.assert_close(loc, ref[:, :, None, :, None] + offsets / norm[None, None, None, :, None])
    boxes = torch.cat([ref * 0.5 + 0.25, torch.full_like(ref, 0.2)], -1)
    _, (loc4, _) = attn(query, boxes, src, ss, start, return_sampling=True)
    expected = boxes[:, :, None, :, None, :2] + offsets / 2 * boxes[:, :, None, :, None, 2:] * 0.5
    torch.testing.assert_close(loc4, expected)


def test_module_fast_equals_reference_and_padding_is_masked():
    torch.manual_seed(0)
    fast = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    with torch.no_grad():
        fast.sampling_offsets.weight.normal_(0, 0.2)
        fast.attention_weights.weight.normal_(0, 0.2)
    ref_impl = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2, implementation="reference")
    ref_impl.load_state_dict(fast.state_dict())
    query, ref, src, ss, start = _module_inputs()
    mask = torch.zeros(2, src.shape[1], dtype=torch.bool)
    mask[1, 40:80] = True  # part of level 0 and 1 of the second image is padding
    out = fast(query, ref, src, ss, start, mask)
    torch.testing.assert_close(out, ref_impl(query, ref, src, ss, start, mask), atol=1e-6, rtol=1e-5)
    # values at padded positions are zeroed after value_proj: changing them changes nothing
    src2 = src.clone()
    src2[1, 40:80] = 1e3
    torch.testing.assert_close(fast(query, ref, src2, ss, start, mask), out)
    assert not torch.allclose(fast(query, ref, src2, ss, start, None), out)


def _count_core_calls(monkeypatch) -> dict[str, int]:
    from detr_lite.deformable import msda

    calls = {"fast": 0, "reference": 0}
    for name, key in (("ms_deform_attn", "fast"), ("ms_deform_attn_reference", "reference")):
        real = getattr(msda, name)

        def counted(*a, _real=real, _key=key):
            calls[_key] += 1
            return _real(*a)

        monkeypatch.setattr(msda, name, counted)
    return calls


def test_module_auto_implementation_is_the_fast_path_on_cpu(monkeypatch):
    """The default ("auto") runs the fast core on CPU (grid_sample on CUDA: tests/test_cuda.py)."""
    calls = _count_core_calls(monkeypatch)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    assert attn.implementation == "auto"
    attn(*_module_inputs())
    assert calls == {"fast": 1, "reference": 0}
    with pytest.raises(ValueError, match="implementation must be 'auto', 'fast' or 'reference', got 'cuda'"):
        MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2, implementation="cuda")


def test_module_errors_name_sizes():
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    query, ref, src, ss, start = _module_inputs()
    with pytest.raises(ValueError, match="sum of H_l\\*W_l .* is 100, input_flatten has S=99"):
        attn(query, ref, src[:, :99], ss, start)
    with pytest.raises(ValueError, match="input_spatial_shapes must be \\[n_levels=2, 2\\], got \\(1, 2\\)"):
        attn(query, ref, src, ss[:1], start)
    with pytest.raises(ValueError, match="input_level_start_index must be \\[n_levels=2\\], got \\(3,\\)"):
        attn(query, ref, src, ss, torch.tensor([0, 80, 100]))
    with pytest.raises(
        ValueError, match="input_level_start_index \\[0, 70\\] != cumulative level sizes \\[0, 80\\]"
    ):
        attn(query, ref, src, ss, torch.tensor([0, 70]))
    with pytest.raises(ValueError, match="reference_points must be \\[N=2, Lq=6, n_levels=2, 2 or 4\\]"):
        attn(query, ref[:, :, :1], src, ss, start)
    with pytest.raises(
        ValueError, match="reference_points must be normalised to \\[0, 1\\], got values in \\[0.62, 11.7\\]"
    ):
        attn(query, ref * 12, src, ss, start)  # pixel coordinates by mistake
    with pytest.raises(ValueError, match="query must be \\[N, Lq, 32\\]"):
        attn(query[..., :16], ref, src, ss, start)
    with pytest.raises(ValueError, match="input_padding_mask must be \\[N, S\\]"):
        attn(query, ref, src, ss, start, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_heads=8)
