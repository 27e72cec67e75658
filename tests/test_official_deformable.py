"""Parity with the official Deformable DETR (fundamentalvision/Deformable-DETR) for the archs
deformable_detr_r50, deformable_detr_r50_single_scale, deformable_detr_r50_refine and
deformable_detr_r50_two_stage (= refinement + two-stage, the official "++ two-stage" model).

How ``tests/fixtures/official_deformable/{keys.json,outputs.pt}`` were made (once, outside the repo,
CPU, fp32):

1. build each arch with the *official* ``models.deformable_detr.build`` (COCO arguments: R50,
   d=256, 6+6 layers, FFN 1024, 300 queries, 4 levels (1 for single-scale), 4+4 points, dropout
   0.1, ``aux_loss``, ``with_box_refine`` / ``two_stage`` as named), its CUDA ``MSDeformAttnFunction``
   replaced by the official pure-PyTorch ``ms_deform_attn_core_pytorch``, eval mode;
2. fill its state dict with :func:`official_parity.official_like_state_dict` (seeded; keys that the official model
   shares between modules - e.g. one class head listed once per decoder layer - get one tensor);
3. run it on :func:`parity_batch` (a 2 x 3 x 128 x 160 batch, the second image padded) and keep
   logits and boxes of the first 60 queries (final and first auxiliary layer), the two-stage proposal
   scores and the official post-processor's top-20 detections of the padded image, plus all key
   names and shapes.

The test rebuilds the same state dict from keys + seed, loads it with
:func:`detr_lite.official.load_official_checkpoint` and compares.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detr_lite.deformable.model import PostProcess
from detr_lite.official import load_official_checkpoint, official_config
from tests import official_parity
from tests.official_parity import load_fixture, official_like_state_dict

FIXTURES = Path(__file__).parent / "fixtures" / "official_deformable"
ARCHS = (
    "deformable_detr_r50",
    "deformable_detr_r50_single_scale",
    "deformable_detr_r50_refine",
    "deformable_detr_r50_two_stage",
)
SEED = {
    "deformable_detr_r50": 1,
    "deformable_detr_r50_single_scale": 2,
    "deformable_detr_r50_refine": 3,
    "deformable_detr_r50_two_stage": 4,
}
TOL = 1e-4


def parity_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Image 0 is 128 x 160; image 1 is 100 x 130, zero-padded (mask True) to 128 x 160."""
    return official_parity.parity_batch((128, 160), (100, 130), seed)


@pytest.fixture(scope="module")
def fixture_data():
    return load_fixture(FIXTURES)


def _load(arch, keys):
    entry = keys[arch]
    state = official_like_state_dict(entry["keys"], SEED[arch], entry["aliases"])
    return load_official_checkpoint({"model": state}, arch=arch), state


@pytest.mark.parametrize("arch", ARCHS)
def test_official_parity(arch, fixture_data):
    keys, outputs = fixture_data
    model, _ = _load(arch, keys)
    assert not model.training
    images, mask = parity_batch()
    with torch.no_grad():
        out = model(images, mask)
        res = PostProcess()(out, torch.tensor([[128, 160], [100, 130]]))
    ref = outputs[arch]
    q = ref["pred_logits"].shape[1]
    ours = {
        "pred_logits": out["pred_logits"][:, :q],
        "pred_boxes": out["pred_boxes"][:, :q],
        "aux0_logits": out["aux_outputs"][0]["pred_logits"][:, :q],
        "aux0_boxes": out["aux_outputs"][0]["pred_boxes"][:, :q],
        "post_scores": res[1]["scores"][:20],
        "post_boxes": res[1]["boxes"][:20] / 100,  # pixels -> comparable scale
    }
    theirs = {k: ref[k] for k in ours}
    theirs["post_boxes"] = ref["post_boxes"] / 100
    if arch.endswith("two_stage"):
        ours["enc_logits"] = out["enc_outputs"]["pred_logits"][..., :1]
        theirs["enc_logits"] = ref["enc_logits"]
        finite = torch.isfinite(ref["enc_boxes"])
        assert torch.equal(torch.isfinite(out["enc_outputs"]["pred_boxes"]), finite)
        ours["enc_boxes"] = out["enc_outputs"]["pred_boxes"][finite]
        theirs["enc_boxes"] = ref["enc_boxes"][finite]
    diffs = {k: (ours[k] - theirs[k]).abs().max().item() for k in ours}
    print(arch, {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) < TOL, diffs
    assert res[1]["labels"][:20].tolist() == ref["post_labels"].tolist()
    # the reference is not degenerate: logits vary across queries, boxes inside (0, 1)
    assert ref["pred_logits"].std() > 0.1
    assert 0 < ref["pred_boxes"].min() and ref["pred_boxes"].max() < 1


def test_official_configs():
    cfg = official_config("deformable_detr_r50")
    assert (cfg.arch, cfg.num_classes, cfg.num_queries, cfg.dim_feedforward) == (
        "deformable_detr",
        91,
        300,
        1024,
    )
    assert official_config("deformable_detr_r50_single_scale").num_feature_levels == 1
    two = official_config("deformable_detr_r50_two_stage")
    assert two.two_stage and two.with_box_refine  # the official "++ two-stage" checkpoint
    assert official_config("deformable_detr_r50_refine").with_box_refine


@pytest.mark.slow
def test_decoder_head_copies_are_checked_and_dropped(fixture_data):
    keys, _ = fixture_data
    _, state = _load("deformable_detr_r50_refine", keys)
    assert any(k.startswith("transformer.decoder.bbox_embed.") for k in state)
    broken = dict(state)
    broken["transformer.decoder.bbox_embed.0.layers.0.weight"] = torch.zeros_like(
        state["bbox_embed.0.layers.0.weight"]
    )
    with pytest.raises(ValueError, match="transformer.decoder.bbox_embed.0.layers.0.weight differs"):
        load_official_checkpoint(broken, arch="deformable_detr_r50_refine")
    # a plain multi-scale checkpoint is not a refinement one (per-layer heads missing/unexpected)
    _, plain = _load("deformable_detr_r50", keys)
    with pytest.raises(ValueError, match="does not match the model"):
        load_official_checkpoint(plain, arch="deformable_detr_r50_two_stage")
