"""Parity with the official DETR (facebookresearch/detr) for detr_r50, detr_r50_dc5, detr_r101, detr_r101_dc5.

How the fixture in ``tests/fixtures/official_detr/`` was made (once, outside the repo, CPU, fp32):

1. build each architecture with the *official* code (``models.detr.build`` with the COCO arguments:
   ``backbone=resnet50|resnet101``, ``dilation=False|True``, ``hidden_dim=256``, 6+6 layers, 100 queries,
   ``aux_loss=True``) and put it in eval mode;
2. fill its state dict with :func:`official_parity.official_like_state_dict` (seeded, deterministic, key by key in
   sorted order) and load it into the official model;
3. run the official model on :func:`parity_batch` (two images of different sizes padded into one
   2 x 3 x 160 x 192 batch with a mask) and save ``pred_logits``, ``pred_boxes`` and the first auxiliary
   output's boxes, together with the official key names and shapes (``keys.json``; the DC5 variants share the
   keys of their non-dilated twin).

This test regenerates the very same official-layout state dict from the recorded keys + shapes + seed,
loads it through :func:`detr_lite.official.load_official_checkpoint` (which renames the keys and checks
them), runs the same batch, and compares with the official outputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detr_lite.official import load_official_checkpoint, official_config
from tests import official_parity
from tests.official_parity import load_fixture, official_like_state_dict

FIXTURES = Path(__file__).parent / "fixtures" / "official_detr"
ARCHS = ("detr_r50", "detr_r50_dc5", "detr_r101", "detr_r101_dc5")
KEYSET = {"detr_r50": "r50", "detr_r50_dc5": "r50", "detr_r101": "r101", "detr_r101_dc5": "r101"}
SEED = {"detr_r50": 50, "detr_r50_dc5": 55, "detr_r101": 101, "detr_r101_dc5": 105}
TOL = 1e-4


def parity_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Image 0 is 160 x 192, image 1 is 128 x 150 padded (zeros, mask True) to the same 160 x 192."""
    return official_parity.parity_batch((160, 192), (128, 150), seed)


@pytest.fixture(scope="module")
def fixture_data():
    return load_fixture(FIXTURES)


@pytest.mark.parametrize("arch", ARCHS)
def test_official_parity(arch, fixture_data):
    keys, outputs = fixture_data
    state = official_like_state_dict(keys[KEYSET[arch]], SEED[arch])
    model = load_official_checkpoint({"model": state}, arch=arch)
    assert not model.training
    images, mask = parity_batch()
    with torch.no_grad():
        out = model(images, mask)
    ref = outputs[arch]
    diffs = {
        "pred_logits": (out["pred_logits"] - ref["pred_logits"]).abs().max().item(),
        "pred_boxes": (out["pred_boxes"] - ref["pred_boxes"]).abs().max().item(),
        "aux0_boxes": (out["aux_outputs"][0]["pred_boxes"] - ref["aux0_boxes"]).abs().max().item(),
    }
    print(arch, {k: f"{v:.2e}" for k, v in diffs.items()})
    assert max(diffs.values()) < TOL, diffs
    # the outputs are not degenerate: logits vary across queries, boxes are inside (0, 1)
    assert ref["pred_logits"].std() > 0.1
    assert 0 < ref["pred_boxes"].min() and ref["pred_boxes"].max() < 1


def test_official_config_matches_arch():
    assert official_config("detr_r50").backbone == "resnet50" and not official_config("detr_r50").dilation
    assert (
        official_config("detr_r101_dc5").backbone == "resnet101" and official_config("detr_r101_dc5").dilation
    )
    assert official_config("detr_r50").num_classes == 91


def test_load_from_file_and_key_errors(tmp_path, fixture_data):
    keys, _ = fixture_data
    state = official_like_state_dict(keys["r50"], 0)
    path = tmp_path / "detr-r50.pth"
    torch.save({"model": state}, path)
    model = load_official_checkpoint(path, arch="detr_r50")
    assert torch.equal(model.query_embed.weight, state["query_embed.weight"])
    assert torch.equal(
        model.backbone.body.layer4[2].conv3.weight, state["backbone.0.body.layer4.2.conv3.weight"]
    )

    broken = dict(state)
    del broken["class_embed.bias"]
    broken["extra.weight"] = torch.zeros(1)
    broken["query_embed.weight"] = torch.zeros(300, 256)
    with pytest.raises(
        ValueError, match="missing keys?.*class_embed.bias.*unexpected keys?.*extra.weight.*query_embed"
    ):
        load_official_checkpoint(broken, arch="detr_r50")
    # an R50 checkpoint is not an R101
    with pytest.raises(ValueError, match="missing keys.*layer3"):
        load_official_checkpoint(state, arch="detr_r101")
    with pytest.raises(ValueError, match="unknown official architecture"):
        load_official_checkpoint(state, arch="detr_r18")
    with pytest.raises(ValueError, match="file not found"):
        load_official_checkpoint(tmp_path / "nope.pth", arch="detr_r50")


def test_pre_norm_transformer_matches_official():
    """Official ``Transformer(normalize_before=True)`` (DETR's ``--pre_norm``: ``x + f(norm(x))`` layers and a
    final encoder LayerNorm), d 64, 4 heads, 2 + 2 layers, padded batch: the fixture holds the official key
    names/shapes, the inputs and the official ``hs`` / ``memory`` (generated once outside the repo)."""
    from detr_lite.transformer import Transformer

    fx = torch.load(FIXTURES / "prenorm_transformer.pt", weights_only=True)
    ours = Transformer(64, 4, 2, 2, 128, dropout=0.0, pre_norm=True).eval()
    state = official_like_state_dict(fx["keys"], fx["seed"])
    ours.load_state_dict(state)  # identical key names, encoder.norm included
    b, c, h, w = fx["src"].shape
    flat = lambda x: x.flatten(2).transpose(1, 2)  # noqa: E731  [B, C, H, W] -> [B, HW, C]
    with torch.no_grad():
        hs, memory = ours(flat(fx["src"]), fx["mask"].flatten(1), fx["query"], flat(fx["pos"]))
    assert hs.shape == fx["hs"].shape == (2, b, 6, 64)
    assert (hs - fx["hs"]).abs().max() < 1e-5
    assert (memory - flat(fx["memory"])).abs().max() < 1e-5
    post = Transformer(64, 4, 2, 2, 128, dropout=0.0, pre_norm=False).eval()
    assert "encoder.norm.weight" not in post.state_dict()  # post-norm has no final encoder norm
