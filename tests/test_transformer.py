"""Transformer: shapes, parity of ``Attention`` with ``nn.MultiheadAttention``, attention capture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detr_lite import capture_attention
from detr_lite.transformer import Attention, Transformer


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return Transformer(
        d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=64
    ).eval()


def _inputs(b=2, hw=12, d=32, q=5, pad=4):
    g = torch.Generator().manual_seed(1)
    src, pos = torch.randn(b, hw, d, generator=g), torch.randn(b, hw, d, generator=g)
    mask = torch.zeros(b, hw, dtype=torch.bool)
    mask[1, hw - pad :] = True
    return src, mask, torch.randn(q, d, generator=g), pos


def test_default_shapes_and_state_dict_names():
    torch.manual_seed(0)
    t = Transformer().eval()  # official: d 256, 8 heads, 6 + 6 layers, FFN 2048
    src, mask, query, pos = _inputs(b=2, hw=20, d=256, q=100)
    with torch.no_grad():
        hs, memory = t(src, mask, query, pos)
    assert hs.shape == (6, 2, 100, 256) and memory.shape == (2, 20, 256)
    sd = t.state_dict()
    assert sd["encoder.layers.5.self_attn.in_proj_weight"].shape == (768, 256)
    assert sd["decoder.layers.0.multihead_attn.out_proj.weight"].shape == (256, 256)
    assert sd["decoder.norm.weight"].shape == (256,) and "encoder.norm.weight" not in sd
    assert {k.split(".")[-2] for k in sd if k.startswith("decoder.layers.0.norm")} == {
        "norm1",
        "norm2",
        "norm3",
    }


def test_final_norm_applied_to_every_layer(small):
    src, mask, query, pos = _inputs()
    with torch.no_grad():
        hs, _ = small(src, mask, query, pos)
    assert hs.shape == (3, 2, 5, 32)
    # each slice is LayerNorm output: mean 0 / var 1 before the (default 1, 0) affine
    torch.testing.assert_close(hs.mean(-1), torch.zeros(3, 2, 5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("same_qk", [True, False])
def test_attention_matches_nn_multihead_attention(same_qk):
    torch.manual_seed(0)
    ours = Attention(32, 4).eval()
    ref = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    ref.load_state_dict(ours.state_dict())  # identical parameter names and shapes
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 7, 32, generator=g)
    k = q if same_qk else torch.randn(2, 9, 32, generator=g)
    v = torch.randn(2, k.shape[1], 32, generator=g)
    kpm = torch.zeros(2, k.shape[1], dtype=torch.bool)
    kpm[0, -3:] = True
    torch.testing.assert_close(
        ours(q, k, v, kpm), ref(q, k, v, key_padding_mask=kpm)[0], atol=1e-5, rtol=1e-5
    )


def test_no_mask_equals_all_false_mask(small):
    src, mask, query, pos = _inputs()
    with torch.no_grad():
        a, _ = small(src, None, query, pos)
        b, _ = small(src, torch.zeros_like(mask), query, pos)
    torch.testing.assert_close(a, b)


def test_capture_attention_weights(small):
    src, mask, query, pos = _inputs()
    with torch.no_grad():
        plain, _ = small(src, mask, query, pos)
        with capture_attention(small) as attn:
            captured, _ = small(src, mask, query, pos)
    torch.testing.assert_close(plain, captured, atol=1e-5, rtol=1e-5)  # capture does not change results
    assert len(attn) == 2 + 2 * 3
    enc = attn["encoder.layers.0.self_attn"]
    dec_self = attn["decoder.layers.1.self_attn"]
    cross = attn["decoder.layers.2.multihead_attn"]
    assert enc.shape == (2, 4, 12, 12) and dec_self.shape == (2, 4, 5, 5) and cross.shape == (2, 4, 5, 12)
    for w in attn.values():
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    assert torch.all(enc[1, :, :, mask[1]] == 0) and torch.all(cross[1, :, :, mask[1]] == 0)
    assert torch.all(cross[1, :, :, ~mask[1]] > 0) and torch.all(cross[0] > 0)
    # outside the block nothing is recorded any more
    with torch.no_grad():
        small(src, mask, query, pos)
    assert len(attn) == 8 and all(m._record is None for m in small.modules() if isinstance(m, Attention))


def test_capture_attention_layer_filter(small):
    src, mask, query, pos = _inputs()
    with torch.no_grad(), capture_attention(small, layers=["decoder.layers.2"]) as attn:
        small(src, mask, query, pos)
    assert sorted(attn) == ["decoder.layers.2.multihead_attn", "decoder.layers.2.self_attn"]


def test_capture_attention_on_plain_multihead_attention():
    torch.manual_seed(0)
    model = nn.ModuleDict({"mha": nn.MultiheadAttention(16, 2, batch_first=True)}).eval()
    x = torch.randn(3, 6, 16)
    kpm = torch.zeros(3, 6, dtype=torch.bool)
    kpm[2, 4:] = True
    with torch.no_grad(), capture_attention(model) as attn:
        out = model["mha"](x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    w = attn["mha"]
    assert w.shape == (3, 2, 6, 6)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 2, 6))
    assert torch.all(w[2, :, :, 4:] == 0)
    torch.testing.assert_close(out, model["mha"](x, x, x, key_padding_mask=kpm)[0])
    assert not model["mha"]._forward_hooks and not model["mha"]._forward_pre_hooks


def test_dropout_only_in_training(small):
    src, mask, query, pos = _inputs()
    torch.manual_seed(0)
    t = Transformer(
        d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64, dropout=0.5
    )
    t.train()
    assert not torch.equal(t(src, mask, query, pos)[0], t(src, mask, query, pos)[0])
    t.eval()
    torch.testing.assert_close(t(src, mask, query, pos)[0], t(src, mask, query, pos)[0])


def test_bad_shapes(small):
    src, mask, query, pos = _inputs()
    with pytest.raises(ValueError, match=r"src/pos \[B, HW, 32\]"):
        small(src[..., :16], mask, query, pos)
    with pytest.raises(ValueError, match=r"mask \[B, HW\] = \(2, 12\)"):
        small(src, mask[:, :5], query, pos)
