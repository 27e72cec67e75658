"""DETR model: output contract, official layout, gradients, post-processing, input validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detr_lite.config import ModelConfig, get_config
from detr_lite.detr import DETR, MLP, PostProcess
from detr_lite.models import build_model, build_postprocessor
from tests.helpers import tiny_model_cfg

# the sizes the shape checks below expect (7 queries, 5 classes + no-object, 3 decoder layers)
SIZES = dict(num_classes=5, nheads=4, enc_layers=2, dec_layers=3, num_queries=7, frozen_bn=True)


def model_cfg(**kw) -> ModelConfig:
    return tiny_model_cfg(**{**SIZES, **kw})


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return DETR(model_cfg()).eval()


def test_r50_shapes_end_to_end():
    """Official sizes: C5 2048 x H/32 x W/32 -> 1x1 conv to d=256 -> HW tokens; 100 queries; 6 layers."""
    torch.manual_seed(0)
    model = DETR(ModelConfig()).eval()
    seen = {}
    model.input_proj.register_forward_hook(lambda m, i, o: seen.update(feat=i[0], proj=o))
    model.transformer.register_forward_hook(lambda m, i, o: seen.update(src=i[0], query=i[2], hs=o[0]))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 128))
    assert seen["feat"].shape == (2, 2048, 3, 4) and seen["proj"].shape == (2, 256, 3, 4)
    assert seen["src"].shape == (2, 12, 256) and seen["query"].shape == (100, 256)
    assert seen["hs"].shape == (6, 2, 100, 256)
    assert out["pred_logits"].shape == (2, 100, 92) and out["pred_boxes"].shape == (2, 100, 4)
    assert len(out["aux_outputs"]) == 5
    assert sum(p.numel() for p in model.parameters()) == 41_524_768  # the official R50 count


def test_state_dict_is_official_up_to_backbone_rename():
    keys = json.loads((Path(__file__).parent / "fixtures/official_detr/keys.json").read_text())["r50"]
    official = {k: tuple(s) for k, s in keys}
    ours = {
        k.replace("backbone.body.", "backbone.0.body.", 1): tuple(v.shape)
        for k, v in DETR(ModelConfig()).state_dict().items()
    }
    assert ours == official


def test_outputs_contract(tiny):
    images = torch.randn(2, 3, 64, 80)
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, :, 48:] = True
    with torch.no_grad():
        out = tiny(images, mask)
        unmasked = tiny(images)
        all_false = tiny(images, torch.zeros_like(mask))
    assert out["pred_logits"].shape == (2, 7, 6) and out["pred_boxes"].shape == (2, 7, 4)
    assert len(out["aux_outputs"]) == 2 and out["aux_outputs"][0]["pred_boxes"].shape == (2, 7, 4)
    assert 0 < out["pred_boxes"].min() and out["pred_boxes"].max() < 1
    torch.testing.assert_close(unmasked["pred_logits"], all_false["pred_logits"])
    # padding image 1 leaves image 0 untouched (no batch-dependent op) but changes image 1
    torch.testing.assert_close(out["pred_logits"][0], unmasked["pred_logits"][0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out["pred_logits"][1], unmasked["pred_logits"][1])
    assert "aux_outputs" not in DETR(model_cfg(aux_loss=False)).eval()(images)


def test_gradients_reach_heads_transformer_and_layer2_to_4_only():
    torch.manual_seed(0)
    model = build_model(model_cfg())
    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    loss = out["pred_logits"].square().mean() + out["pred_boxes"].sum()
    loss = loss + sum(a["pred_boxes"].sum() for a in out["aux_outputs"])
    loss.backward()
    for name, p in model.named_parameters():
        frozen = name.startswith(("backbone.body.conv1", "backbone.body.bn1", "backbone.body.layer1"))
        assert (p.grad is None) == frozen, name
    assert model.query_embed.weight.grad.abs().sum() > 0
    assert model.backbone.body.layer2[0].conv1.weight.grad.abs().sum() > 0


def test_bad_input(tiny):
    with pytest.raises(
        ValueError, match=r"images: expected a 4-D tensor \[B, 3, H, W\], got shape \(3, 64, 64\)"
    ):
        tiny(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="expected 3 channels"):
        tiny(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"mask: expected shape"):
        tiny(torch.zeros(2, 3, 64, 64), torch.zeros(2, 32, 32, dtype=torch.bool))


def test_mlp_layers():
    mlp = MLP(8, 16, 4, 3)
    assert [tuple(layer.weight.shape) for layer in mlp.layers] == [(16, 8), (16, 16), (4, 16)]
    x = torch.randn(5, 8)
    ref = mlp.layers[2](torch.relu(mlp.layers[1](torch.relu(mlp.layers[0](x)))))
    torch.testing.assert_close(mlp(x), ref)


def test_postprocess():
    logits = torch.tensor([[[0.0, 2.0, 0.0], [5.0, 0.0, 0.0]]])  # 2 classes + no-object
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])
    (res,) = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    probs = logits.softmax(-1)[0, :, :2]
    torch.testing.assert_close(res["scores"], probs.max(-1).values)
    assert res["labels"].tolist() == [1, 0]
    # (cx, cy, w, h) normalised -> (x0, y0, x1, y1) in pixels of a 100 (h) x 200 (w) image
    torch.testing.assert_close(
        res["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 50.0, 100.0, 100.0]])
    )
    with pytest.raises(ValueError, match=r"target_sizes: expected shape \(B, 2\) = \(1, 2\)"):
        PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([100, 200]))
    assert isinstance(build_postprocessor(model_cfg()), PostProcess)


def test_shapes_preset_builds_and_runs():
    cfg = get_config("detr-shapes").model
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 128))
    assert out["pred_logits"].shape == (1, cfg.num_queries, cfg.num_classes + 1)
