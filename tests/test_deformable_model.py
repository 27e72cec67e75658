"""Deformable DETR model: stage shapes, official initialisation, padding, refinement / two-stage,
post-processing and input errors (tiny configs, CPU, a few seconds)."""

from __future__ import annotations

import math

import pytest
import torch

from detr_lite.config import ModelConfig, get_config
from detr_lite.deformable.model import DeformableDETR, PostProcess
from detr_lite.deformable.transformer import DeformableTransformerEncoder, inverse_sigmoid
from detr_lite.models import build_criterion, build_model, build_postprocessor
from tests.helpers import tiny_model_cfg

B, H, W = 2, 128, 160


# the sizes the checks below expect: 4 levels, 12 queries, 5 classes (focal: no no-object logit)
SIZES = dict(arch="deformable_detr", num_classes=5, hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2,
             dim_feedforward=128, dropout=0.0, num_queries=12, num_feature_levels=4, enc_n_points=2, dec_n_points=3)  # fmt: skip


def model_cfg(**kw) -> ModelConfig:
    return tiny_model_cfg(**{**SIZES, **kw})


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, H, W, generator=g)
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    mask[1, :, 120:] = True  # second image is 96 x 120 inside a 128 x 160 canvas
    mask[1, 96:] = True
    images[mask[:, None].expand_as(images)] = 0
    return images, mask


def targets():
    return [
        {"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]]), "labels": torch.tensor([2])},
        {"boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.7, 0.6, 0.2, 0.3]]), "labels": torch.tensor([0, 4])},
    ]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeformableDETR(model_cfg()).eval()


def test_stage_shapes(model):
    images, mask = batch()
    srcs, masks, pos = model.build_pyramid(images, mask)
    # C3, C4 of... the default backbone_layers end in layer4: C3-C5 (strides 8, 16, 32) + a stride-64 conv
    assert [tuple(s.shape) for s in srcs] == [(B, 64, 16, 20), (B, 64, 8, 10), (B, 64, 4, 5), (B, 64, 2, 3)]
    assert [tuple(m.shape) for m in masks] == [(B, 16, 20), (B, 8, 10), (B, 4, 5), (B, 2, 3)]
    assert all(p.shape == s.shape for p, s in zip(pos, srcs))
    assert model.backbone.strides == [8, 16, 32] and model.backbone.num_channels == [128, 256, 512]
    # padded area: 96 x 120 of 128 x 160 -> 12 x 15 valid cells of 16 x 20 at stride 8
    assert (~masks[0][1]).sum() == 12 * 15 and not masks[0][0].any()

    with torch.no_grad():
        t = model.transformer(srcs, masks, pos, query_embed=model.query_embed.weight)
        out = model(images, mask)
    s = 16 * 20 + 8 * 10 + 4 * 5 + 2 * 3
    assert t["memory"].shape == (B, s, 64)
    assert t["hs"].shape == (2, B, 12, 64)
    assert t["spatial_shapes"].tolist() == [[16, 20], [8, 10], [4, 5], [2, 3]]
    assert t["level_start_index"].tolist() == [0, 320, 400, 420]
    torch.testing.assert_close(t["valid_ratios"][1, 0], torch.tensor([0.75, 0.75]))
    assert t["init_reference"].shape == (B, 12, 2)
    assert out["pred_logits"].shape == (B, 12, 5)  # sigmoid/focal: K logits, no "no-object"
    assert out["pred_boxes"].shape == (B, 12, 4)
    assert len(out["aux_outputs"]) == 1 and "enc_outputs" not in out
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()


def test_official_initialisation(model):
    for head in model.class_embed:
        torch.testing.assert_close(head.bias, torch.full((5,), -math.log((1 - 0.01) / 0.01)))
    last = model.bbox_embed[0].layers[-1]
    assert torch.count_nonzero(last.weight) == 0
    assert last.bias.tolist() == [0.0, 0.0, -2.0, -2.0]
    # without refinement every decoder layer shares one head (official state-dict layout)
    assert model.class_embed[0] is model.class_embed[1] and model.bbox_embed[0] is model.bbox_embed[1]
    for proj in model.input_proj:
        assert torch.count_nonzero(proj[0].bias) == 0 and isinstance(proj[1], torch.nn.GroupNorm)
    assert torch.count_nonzero(model.transformer.reference_points.bias) == 0
    assert model.transformer.level_embed.shape == (4, 64) and model.transformer.level_embed.std() > 0.5
    # the zero last box layer means: at init every box is centred on its reference point, w = h = sigmoid(-2)
    images, mask = batch()
    with torch.no_grad():
        out = model(images, mask)
        ref = model.transformer.reference_points(model.query_embed.weight[:, :64]).sigmoid()
    torch.testing.assert_close(out["pred_boxes"][..., :2], ref[None].expand(B, -1, -1))
    torch.testing.assert_close(
        out["pred_boxes"][..., 2:], torch.full((B, 12, 2), torch.sigmoid(torch.tensor(-2.0)))
    )


def test_encoder_reference_points_are_valid_cell_centres():
    shapes = torch.tensor([[4, 6], [2, 3]])
    ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.5, 0.75], [2 / 3, 1.0]]])  # (w, h) per level
    ref = DeformableTransformerEncoder.get_reference_points(shapes, ratios, "cpu")
    assert ref.shape == (2, 24 + 6, 2, 2)
    # no padding: (j + 0.5) / W, (i + 0.5) / H on every level
    torch.testing.assert_close(ref[0, 0, 0], torch.tensor([0.5 / 6, 0.5 / 4]))
    torch.testing.assert_close(ref[0, 24 + 5, 1], torch.tensor([2.5 / 3, 1.5 / 2]))
    # padding: normalised by the valid size, then expressed in each level's padded map
    torch.testing.assert_close(ref[1, 0, 0], torch.tensor([0.5 / 3 * 0.5, 0.5 / 3 * 0.75]))
    torch.testing.assert_close(ref[1, 0, 1], torch.tensor([0.5 / 3 * (2 / 3), 0.5 / 3 * 1.0]))


def test_padding_is_invisible_to_valid_tokens(model):
    images, mask = batch()
    with torch.no_grad():
        srcs, masks, pos = model.build_pyramid(images, mask)
        t = model.transformer(srcs, masks, pos, query_embed=model.query_embed.weight)
        noisy = [s.clone() for s in srcs]
        for s, m in zip(noisy, masks):
            s[m[:, None].expand_as(s)] = 100.0  # garbage features at padded cells
        t2 = model.transformer(noisy, masks, pos, query_embed=model.query_embed.weight)
    valid = ~t["mask_flatten"]
    torch.testing.assert_close(t2["memory"][valid], t["memory"][valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t2["hs"], t["hs"], atol=1e-5, rtol=1e-5)


def test_batch_elements_are_independent(model):
    images, mask = batch()
    with torch.no_grad():
        both = model(images, mask)
        alone = model(images[1:], mask[1:])
    torch.testing.assert_close(both["pred_logits"][1:], alone["pred_logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both["pred_boxes"][1:], alone["pred_boxes"], atol=1e-5, rtol=1e-4)


def test_fast_and_reference_msda_give_the_same_model(model):
    ref_model = DeformableDETR(model_cfg(), implementation="reference").eval()
    ref_model.load_state_dict(model.state_dict())
    images, mask = batch()
    with torch.no_grad():
        a, b = model(images, mask), ref_model(images, mask)
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "refine,two_stage,levels",
    [(False, False, 4), (True, False, 4), (True, True, 4), (False, True, 4), (False, False, 1)],
)
def test_variants_forward_backward(refine, two_stage, levels):
    torch.manual_seed(0)
    cfg = model_cfg(with_box_refine=refine, two_stage=two_stage, num_feature_levels=levels)
    model = build_model(cfg).train()
    criterion = build_criterion(cfg)
    images, mask = batch()
    out = model(images, mask)
    assert out["pred_logits"].shape == (B, 12, 5) and len(out["aux_outputs"]) == 1
    if two_stage:
        s = 16 * 20 + 8 * 10 + 4 * 5 + 2 * 3
        assert out["enc_outputs"]["pred_logits"].shape == (B, s, 5)
        assert out["enc_outputs"]["pred_boxes"].shape == (B, s, 4)
        assert not hasattr(model, "query_embed")
    if refine:  # independent heads per layer (+1 for the two-stage proposals)
        assert len({id(h) for h in model.bbox_embed}) == len(model.bbox_embed) == 2 + two_stage
    if levels == 1:
        assert model.backbone.strides == [32] and len(model.input_proj) == 1
    losses = criterion(out, targets())
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    if two_stage:
        assert "loss_ce_enc" in losses
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    # the query (hence pos and level_embed) only feeds sampling_offsets / attention_weights, whose
    # weights start at zero: no gradient reaches level_embed on the very first step, but those layers learn
    assert model.transformer.level_embed.grad.abs().sum() == 0
    for attn in (
        model.transformer.encoder.layers[0].self_attn,
        model.transformer.decoder.layers[-1].cross_attn,
    ):
        assert attn.sampling_offsets.weight.grad.abs().sum() > 0
        assert attn.attention_weights.weight.grad.abs().sum() > 0


def test_refinement_detaches_reference_points():
    torch.manual_seed(0)
    model = build_model(model_cfg(with_box_refine=True)).train()
    images, mask = batch()
    srcs, masks, pos = model.build_pyramid(images, mask)
    t = model.transformer(
        srcs, masks, pos, model.query_embed.weight, model.class_embed, model.bbox_embed, refine=True
    )
    assert all(r.shape == (B, 12, 4) and not r.requires_grad for r in t["references"])
    # layer 0's box = sigmoid(delta + inverse_sigmoid(ref)) with a 2-d reference shifting only the centre
    delta = model.bbox_embed[0](t["hs"][0])
    expected = torch.cat(
        [delta[..., :2] + inverse_sigmoid(t["init_reference"]), delta[..., 2:]], -1
    ).sigmoid()
    torch.testing.assert_close(t["references"][0], expected.detach())


def test_postprocess_top_k_over_queries_and_classes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 40, 5, generator=g)
    boxes = torch.rand(2, 40, 4, generator=g) * 0.5 + 0.25
    sizes = torch.tensor([[100, 200], [50, 60]])
    res = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    assert len(res) == 2 and res[0]["scores"].shape == (100,) and res[0]["boxes"].shape == (100, 4)
    for i in range(2):
        prob = logits[i].sigmoid()
        order = prob.flatten().argsort(descending=True)[:100]
        torch.testing.assert_close(res[i]["scores"], prob.flatten()[order])
        assert res[i]["labels"].tolist() == (order % 5).tolist()
        cx, cy, w, h = boxes[i][order // 5].unbind(-1)
        hh, ww = sizes[i].tolist()
        expected = torch.stack(
            [(cx - w / 2) * ww, (cy - h / 2) * hh, (cx + w / 2) * ww, (cy + h / 2) * hh], -1
        )
        torch.testing.assert_close(res[i]["boxes"], expected)
    # fewer than 100 (query, class) pairs: keep all of them
    small = PostProcess()({"pred_logits": logits[:, :10], "pred_boxes": boxes[:, :10]}, sizes)
    assert small[0]["scores"].shape == (50,)
    assert isinstance(build_postprocessor(model_cfg()), PostProcess)
    with pytest.raises(ValueError, match="target_sizes: expected shape \\(B, 2\\)"):
        PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([100, 200]))


def test_input_errors(model):
    images, mask = batch()
    full = mask.clone()
    full[0] = True
    with pytest.raises(ValueError, match="fully padded image"):
        model(images, full)
    with pytest.raises(ValueError, match="mask"):
        model(images, mask[:, :10])
    with pytest.raises(ValueError, match="3 channels"):
        model(images[:, :1], mask)
    srcs, masks, pos = model.build_pyramid(images, mask)
    with pytest.raises(ValueError, match="expected 4 levels of srcs/masks/pos_embeds, got 3/3/3"):
        model.transformer(srcs[:3], masks[:3], pos[:3], query_embed=model.query_embed.weight)
    with pytest.raises(ValueError, match="hidden_dim: GroupNorm\\(32, d\\) needs d % 32 == 0, got 48"):
        DeformableDETR(model_cfg(hidden_dim=48))


def test_presets_build():
    shapes = get_config("deformable-shapes")
    assert shapes.model.arch == "deformable_detr" and shapes.model.backbone_layers == ("layer2", "layer3")
    coco_cfg = get_config("deformable-detr-r50-coco").model
    coco_cfg.pretrained_backbone = False  # no download in tests
    with torch.device("meta"):
        model = build_model(shapes.model)
        coco = build_model(coco_cfg)
    assert model.backbone.strides == [8, 16]
    n = sum(p.numel() for p in coco.parameters())
    assert round(n / 1e6) == 40, n  # the paper's Table 1: 40 M parameters
    two = get_config("deformable-detr-r50-two-stage-coco").model
    assert (
        two.with_box_refine and two.two_stage and get_config("deformable-detr-r50-coco").train.lr_drop == 40
    )
