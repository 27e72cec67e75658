"""Deformable DETR rebuilt from primitives, as notebook 08 teaches it, equals the package.

The encoder layer (MSDeformAttn + Add & Norm + FFN), the decoder layer in the process notes' order
(query self-attention, deformable cross-attention, FFN), the decoder stack with and without
iterative box refinement, and the two-stage proposals are written here from ``MSDeformAttn``,
``nn.Linear``, ``nn.LayerNorm`` and ``nn.MultiheadAttention``, loaded with the package's (perturbed,
so that offsets and weights depend on the query) parameters, and compared with ``torch.allclose``.
Tiny configs on CPU: a few seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detr_lite.config import ModelConfig
from detr_lite.deformable.model import DeformableDETR
from detr_lite.deformable.msda import MSDeformAttn
from detr_lite.deformable.transformer import get_valid_ratio, inverse_sigmoid
from tests.helpers import tiny_model_cfg

B, H, W = 2, 128, 160


def tiny_cfg(**kw) -> ModelConfig:
    """A 4-level toy Deformable DETR (tests/helpers.tiny_model_cfg with the deformable settings)."""
    deformable = dict(
        arch="deformable_detr", num_classes=5, hidden_dim=64, nheads=4, enc_layers=2, dec_layers=3,
        dim_feedforward=96, dropout=0.0, num_queries=10, num_feature_levels=4, enc_n_points=2,
        dec_n_points=3, backbone_layers=("layer2", "layer3"),
    )  # fmt: skip
    return tiny_model_cfg(**{**deformable, **kw})


def make_model(**kw) -> DeformableDETR:
    torch.manual_seed(0)
    model = DeformableDETR(tiny_cfg(**kw)).eval()
    with torch.no_grad():  # as if trained: offsets and weights depend on the query, boxes move
        for module in model.modules():
            if isinstance(module, MSDeformAttn):
                module.sampling_offsets.weight.normal_(0.0, 0.05)
                module.attention_weights.weight.normal_(0.0, 0.2)
        for head in model.bbox_embed:
            head.layers[-1].weight.normal_(0.0, 0.05)
    return model


def batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, H, W, generator=g)
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    mask[1, :, 120:] = True  # the second image is 96 x 120 inside the 128 x 160 canvas
    mask[1, 96:] = True
    return images, mask


class EncoderLayerByHand(nn.Module):
    def __init__(self, d, d_ffn, n_levels, n_heads, n_points):
        super().__init__()
        self.self_attn = MSDeformAttn(d, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d)
        self.linear1 = nn.Linear(d, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d)
        self.norm2 = nn.LayerNorm(d)

    def forward(self, x, pos, ref, shapes, starts, pad):
        x = self.norm1(x + self.self_attn(x + pos, ref, x, shapes, starts, pad, validate=False))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class DecoderLayerByHand(nn.Module):
    def __init__(self, d, d_ffn, n_levels, n_heads, n_points):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, n_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.cross_attn = MSDeformAttn(d, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d)
        self.linear1 = nn.Linear(d, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d)
        self.norm3 = nn.LayerNorm(d)

    def forward(self, tgt, query_pos, ref, memory, shapes, starts, pad):
        q = tgt + query_pos  # (1) query self-attention
        tgt = self.norm2(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        attended = self.cross_attn(tgt + query_pos, ref, memory, shapes, starts, pad, validate=False)  # (2)
        tgt = self.norm1(tgt + attended)
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))  # (3) FFN


def copy_layers(cls, package_layers, cfg, n_points):
    layers = []
    for layer in package_layers:
        mine = cls(cfg.hidden_dim, cfg.dim_feedforward, cfg.num_feature_levels, cfg.nheads, n_points)
        mine.load_state_dict(layer.state_dict())  # every parameter name must match
        layers.append(mine.eval())
    return layers


def flatten(model, images, mask):
    srcs, masks, pos = model.build_pyramid(images, mask)
    tr = model.transformer
    src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
    pad = torch.cat([m.flatten(1) for m in masks], 1)
    lvl_pos = torch.cat([p.flatten(2).transpose(1, 2) + tr.level_embed[lvl] for lvl, p in enumerate(pos)], 1)
    shapes = torch.tensor([s.shape[-2:] for s in srcs])
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    ratios = torch.stack([get_valid_ratio(m) for m in masks], 1)
    # encoder reference points: cell centres in units of the valid image, then scaled per level
    refs = []
    for lvl, (h, w) in enumerate(shapes.tolist()):
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        refs.append(
            torch.stack(
                [
                    xs.flatten()[None] / (ratios[:, lvl, 0, None] * w),
                    ys.flatten()[None] / (ratios[:, lvl, 1, None] * h),
                ],
                -1,
            )
        )
    centres = torch.cat(refs, 1)  # [B, S, 2]
    package = model.transformer(
        srcs,
        masks,
        pos,
        query_embed=None if model.two_stage else model.query_embed.weight,
        class_embed=model.class_embed,
        bbox_embed=model.bbox_embed,
        refine=model.with_box_refine,
    )
    return dict(
        src=src, pad=pad, lvl_pos=lvl_pos, shapes=shapes, starts=starts, ratios=ratios, centres=centres
    ), package


def encode(model, f):
    layers = copy_layers(
        EncoderLayerByHand, model.transformer.encoder.layers, model.cfg, model.cfg.enc_n_points
    )
    ref = f["centres"][:, :, None] * f["ratios"][:, None]  # [B, S, L, 2]
    x = f["src"]
    for layer in layers:
        x = layer(x, f["lvl_pos"], ref, f["shapes"], f["starts"], f["pad"])
    return x


def decode(model, f, memory, tgt, query_pos, ref, refine):
    layers = copy_layers(
        DecoderLayerByHand, model.transformer.decoder.layers, model.cfg, model.cfg.dec_n_points
    )
    hs, refs = [], []
    for lid, layer in enumerate(layers):
        ratios = torch.cat([f["ratios"], f["ratios"]], -1) if ref.shape[-1] == 4 else f["ratios"]
        tgt = layer(
            tgt, query_pos, ref[:, :, None] * ratios[:, None], memory, f["shapes"], f["starts"], f["pad"]
        )
        if refine:  # sigma(delta + sigma^-1(ref)), the new reference detached
            delta = model.bbox_embed[lid](tgt)
            if ref.shape[-1] == 2:
                delta = torch.cat([delta[..., :2] + inverse_sigmoid(ref), delta[..., 2:]], -1)
                ref = delta.sigmoid().detach()
            else:
                ref = (delta + inverse_sigmoid(ref)).sigmoid().detach()
        hs.append(tgt)
        refs.append(ref)
    return torch.stack(hs), refs


@pytest.mark.parametrize("refine", [False, True])
@torch.no_grad()
def test_encoder_and_decoder_by_hand_equal_the_package(refine):
    model = make_model(with_box_refine=refine)
    images, mask = batch()
    f, package = flatten(model, images, mask)
    assert torch.allclose(
        f["centres"][:, :, None] * f["ratios"][:, None],
        model.transformer.encoder.get_reference_points(f["shapes"], f["ratios"], "cpu"),
        atol=1e-6,
    )
    memory = encode(model, f)
    assert memory.shape == package["memory"].shape
    assert torch.allclose(memory, package["memory"], atol=1e-5)

    d = model.cfg.hidden_dim
    query_pos, tgt = model.query_embed.weight.split(d, dim=1)
    query_pos, tgt = query_pos[None].expand(B, -1, -1), tgt[None].expand(B, -1, -1)
    ref = model.transformer.reference_points(query_pos).sigmoid()
    assert torch.allclose(ref, package["init_reference"], atol=1e-6)
    hs, refs = decode(model, f, memory, tgt, query_pos, ref, refine)
    assert hs.shape == (model.cfg.dec_layers, B, model.cfg.num_queries, d)
    assert torch.allclose(hs, package["hs"], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(refs, package["references"]))
    moved = [float((r[..., :2] - ref).abs().max()) for r in refs]
    assert (min(moved) > 1e-4) if refine else (max(moved) == 0.0)

    out = model(images, mask)
    delta = model.bbox_embed[-1](hs[-1])
    last_ref = refs[-2] if refine else ref
    if last_ref.shape[-1] == 4:
        boxes = (delta + inverse_sigmoid(last_ref)).sigmoid()
    else:
        boxes = torch.cat([delta[..., :2] + inverse_sigmoid(last_ref), delta[..., 2:]], -1).sigmoid()
    assert torch.allclose(out["pred_boxes"], boxes, atol=1e-5)
    if refine:  # layer i's box is the reference it hands on
        assert torch.allclose(out["pred_boxes"], refs[-1], atol=1e-6)


@torch.no_grad()
def test_two_stage_proposals_and_queries_by_hand_equal_the_package():
    model = make_model(with_box_refine=True, two_stage=True)
    images, mask = batch()
    f, package = flatten(model, images, mask)
    memory = encode(model, f)
    assert torch.allclose(memory, package["memory"], atol=1e-5)

    tr, n_dec, d = model.transformer, model.cfg.dec_layers, model.cfg.hidden_dim
    proposals = []
    for lvl, (h, w) in enumerate(f["shapes"].tolist()):
        centre = f["centres"][:, f["starts"][lvl] : f["starts"][lvl] + h * w]
        proposals.append(torch.cat([centre, torch.full_like(centre, 0.05 * 2.0**lvl)], -1))
    proposals = torch.cat(proposals, 1)
    usable = ((proposals > 0.01) & (proposals < 0.99)).all(-1) & ~f["pad"]
    logit = torch.log(proposals / (1 - proposals)).masked_fill(~usable[..., None], float("inf"))
    out_memory = tr.enc_output_norm(tr.enc_output(memory.masked_fill(~usable[..., None], 0.0)))
    enc_class = model.class_embed[n_dec](out_memory)
    enc_coord = model.bbox_embed[n_dec](out_memory) + logit
    assert torch.allclose(enc_class, package["enc_outputs_class"], atol=1e-5)
    assert torch.allclose(enc_coord, package["enc_outputs_coord_unact"], atol=1e-4)  # inf == inf

    topk = enc_class[..., 0].topk(model.num_queries, dim=1).indices
    top = torch.gather(enc_coord, 1, topk[..., None].expand(-1, -1, 4))
    assert torch.allclose(top.sigmoid(), package["init_reference"], atol=1e-6)
    dim_t = 10000 ** (2 * (torch.arange(d // 2) // 2) / (d // 2))
    angles = top.sigmoid()[..., None] * 2 * math.pi / dim_t
    code = torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], -1).flatten(2)
    assert torch.allclose(code, tr.get_proposal_pos_embed(top, d // 2), atol=1e-5)
    query_pos, tgt = tr.pos_trans_norm(tr.pos_trans(code)).split(d, dim=-1)

    hs, refs = decode(model, f, memory, tgt, query_pos, top.sigmoid(), refine=True)
    assert torch.allclose(hs, package["hs"], atol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(refs, package["references"]))


def test_refined_reference_is_detached():
    """A loss on the last layer's box reaches the last box head only, not the heads before it."""
    model = make_model(with_box_refine=True)
    images, mask = batch()
    with torch.no_grad():
        f, _ = flatten(model, images, mask)
        memory = encode(model, f)
    d = model.cfg.hidden_dim
    query_pos, tgt = model.query_embed.weight.split(d, dim=1)
    query_pos, tgt = query_pos[None].expand(B, -1, -1), tgt[None].expand(B, -1, -1)
    ref = model.transformer.reference_points(query_pos).sigmoid().detach()
    hs, refs = decode(model, f, memory, tgt.detach(), query_pos.detach(), ref, refine=True)
    last = (model.bbox_embed[-1](hs[-1]) + inverse_sigmoid(refs[-2])).sigmoid()
    heads = [head.layers[-1].weight for head in model.bbox_embed]
    grads = torch.autograd.grad(last.sum(), heads, allow_unused=True)
    assert grads[-1] is not None and grads[-1].abs().sum() > 0
    assert all(g is None for g in grads[:-1])
