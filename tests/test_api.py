"""detr_lite.Detector: inputs of every kind, the val transforms without a target, explain(), official files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from detr_lite import Detector
from detr_lite.api import COCO_CLASSES, infer_official_arch
from detr_lite.config import get_config
from detr_lite.data.transforms import build_transforms, to_pil_rgb
from tests.official_parity import official_like_state_dict

VAL = Path(__file__).resolve().parent.parent / "data" / "shapes" / "val2017"
IMAGE = VAL / "000001.png"
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def detr():
    torch.set_num_threads(2)
    return Detector.from_checkpoint("detr_shapes", device="cpu")


@pytest.fixture(scope="module")
def deformable():
    return Detector.from_checkpoint("deformable_shapes", device="cpu")


def test_val_transforms_run_without_a_target():
    tf = build_transforms(get_config("detr-shapes").data, train=False)
    im = PIL.Image.open(IMAGE).convert("RGB")
    x = tf(im)
    assert isinstance(x, torch.Tensor) and x.shape == (3, 160, 192)
    y, none = tf(im, None)
    assert none is None and torch.equal(x, y)
    from torchvision import tv_tensors

    target = {
        "boxes": tv_tensors.BoundingBoxes([[10, 10, 50, 60]], format="XYXY", canvas_size=(im.height, im.width)),
        "labels": torch.tensor([1]),
        "iscrowd": torch.tensor([0]),
    }
    z, t = tf(im, target)
    assert torch.equal(x, z) and t["boxes"].shape == (1, 4)


def test_to_pil_rgb_converts_every_kind_of_image():
    rgb = np.asarray(PIL.Image.open(IMAGE).convert("RGB"))
    same = [
        rgb,
        np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)]),  # RGBA: alpha dropped
        torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous(),  # uint8 [C, H, W]
        torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255,  # float [C, H, W] in 0..1
        rgb.astype(np.uint16) * 257,  # 16-bit
        PIL.Image.fromarray(rgb).convert("RGBA"),
    ]
    for im in same:
        assert np.array_equal(np.asarray(to_pil_rgb(im)), rgb), type(im)
    grey = rgb[..., 0]
    for im in (grey, grey[..., None], torch.from_numpy(grey.copy()), grey.astype(np.uint16) * 257, grey.astype(np.float32) / 255):
        out = np.asarray(to_pil_rgb(im))
        assert out.shape == rgb.shape and np.array_equal(out[..., 0], grey) and np.array_equal(out[..., 2], grey)
    assert np.asarray(to_pil_rgb(np.ones((4, 5), bool))).max() == 255
    for bad in (np.zeros((4, 5, 2), np.uint8), torch.zeros(2, 3, 4, 5), "not an image", np.zeros((0, 3, 3), np.uint8)):
        with pytest.raises(ValueError, match="image"):
            to_pil_rgb(bad)


def test_predict_accepts_paths_pil_numpy_and_tensors(detr):
    ref = detr.predict(IMAGE)
    assert len(ref) > 0 and ref.image_size == (160, 192) and ref.source == str(IMAGE)
    assert ref.boxes.shape == (len(ref), 4) and ref.names == [detr.class_names[c] for c in ref.labels.tolist()]
    assert bool((ref.scores[:-1] >= ref.scores[1:]).all()) and bool((ref.scores >= 0.5).all())
    rgb = np.asarray(PIL.Image.open(IMAGE).convert("RGB"))
    forms = [str(IMAGE), PIL.Image.open(IMAGE), rgb, torch.from_numpy(rgb.copy()).permute(2, 0, 1)]
    for got in detr.predict(forms, batch_size=1):
        assert torch.equal(got.labels, ref.labels) and torch.allclose(got.boxes, ref.boxes)
    gray = detr.predict(rgb.mean(-1).astype(np.uint8))  # grey works too (different detections are fine)
    assert gray.image_size == (160, 192)


def test_batched_predictions_equal_single_ones(detr):
    files = sorted(VAL.glob("*.png"))[:6]
    batched = detr.predict(files, threshold=0.0, batch_size=6)
    for f, b in zip(files, batched):
        s = detr.predict(f, threshold=0.0)
        assert torch.equal(s.labels, b.labels) and torch.allclose(s.scores, b.scores, atol=1e-5)
        assert torch.allclose(s.boxes, b.boxes, atol=1e-3)


def test_boxes_are_in_the_pixels_of_the_image_as_given(detr):
    im = PIL.Image.open(IMAGE).convert("RGB")
    small = detr.predict(im)
    big = detr.predict(im.resize((im.width * 2, im.height * 2), PIL.Image.BILINEAR))
    assert big.image_size == (2 * im.height, 2 * im.width)
    assert torch.equal(small.labels[:2], big.labels[:2])
    assert torch.allclose(2 * small.boxes[:2], big.boxes[:2], atol=4.0)


@pytest.mark.parametrize("which", ["detr", "deformable"])
def test_postprocess_matches_the_evaluation_postprocessor(which, request):
    from detr_lite.models import build_postprocessor

    det = request.getfixturevalue(which)
    x = det.preprocess(IMAGE)[0][None]
    out = det.forward(x)
    ours = det.postprocess(out["pred_logits"][0], out["pred_boxes"][0], (160, 192), threshold=0.0)
    theirs = build_postprocessor(det.cfg.model)(out, torch.tensor([[160, 192]]))[0]
    order = theirs["scores"].argsort(descending=True, stable=True)
    assert torch.allclose(ours.scores, theirs["scores"][order])
    assert torch.allclose(ours.boxes, theirs["boxes"][order], atol=1e-4)
    coco = ours.to_coco(7)
    assert coco[0]["image_id"] == 7 and len(coco[0]["bbox"]) == 4


def test_explain_detr_gives_one_attention_map_per_detection(detr):
    e = detr.explain(IMAGE)
    assert e.kind == "attention" and len(e.attention) == len(e.detections) > 0
    stride = detr.model.backbone.strides[-1]
    assert e.attention[0].shape == (-(-160 // stride), -(-192 // stride))
    assert all(abs(float(a.sum()) - 1) < 1e-4 for a in e.attention)
    assert e.extent[1] >= 192 and e.extent[2] >= 160
    assert e.upsampled_attention(0).shape == (160, 192)
    # the map of a detection puts more weight inside its box than uniform attention would
    a, box = e.attention[0], e.detections.boxes[0]
    gh, gw = a.shape
    ys = (torch.arange(gh) + 0.5) * e.cell[1]
    xs = (torch.arange(gw) + 0.5) * e.cell[0]
    inside = (ys[:, None] >= box[1]) & (ys[:, None] <= box[3]) & (xs[None] >= box[0]) & (xs[None] <= box[2])
    assert float(a[inside].sum()) > float(inside.float().mean())


def test_explain_deformable_gives_sampling_points_in_pixels(deformable):
    e = deformable.explain(IMAGE, threshold=0.0)
    n = len(e.detections)
    assert e.kind == "sampling" and n == len(e.locations) == len(e.weights) == len(e.references) > 0
    cfg = deformable.cfg.model
    assert e.locations[0].shape == (cfg.nheads, cfg.num_feature_levels, cfg.dec_n_points, 2)
    sums = e.weights[0].sum((1, 2))
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    rx, ry = e.references[0]
    assert 0 <= rx <= 192 and 0 <= ry <= 160


def test_infer_official_arch_from_the_keys():
    deformable = json.loads((FIXTURES / "official_deformable" / "keys.json").read_text())
    for arch, entry in deformable.items():
        keys = {k: torch.empty(0) for k, _ in entry["keys"]} | {k: torch.empty(0) for k in entry.get("aliases", {})}
        assert infer_official_arch(keys) == arch
    detr = json.loads((FIXTURES / "official_detr" / "keys.json").read_text())
    for name, entry in detr.items():
        keys = {k: torch.empty(0) for k, _ in (entry["keys"] if isinstance(entry, dict) else entry)}
        assert infer_official_arch(keys) == f"detr_{name}"
        assert infer_official_arch(keys, filename=f"detr-{name}-dc5-abc.pth") == f"detr_{name}_dc5"
    with pytest.raises(ValueError, match="neither a detr_lite checkpoint"):
        infer_official_arch({"conv.weight": torch.empty(0)})


@pytest.mark.parametrize("arch", ["detr_r50", "deformable_detr_r50"])
def test_from_checkpoint_loads_an_official_file(arch, tmp_path):
    if arch == "detr_r50":
        entry = json.loads((FIXTURES / "official_detr" / "keys.json").read_text())["r50"]
    else:
        entry = json.loads((FIXTURES / "official_deformable" / "keys.json").read_text())[arch]
    keys = entry["keys"] if isinstance(entry, dict) else entry
    aliases = entry.get("aliases") if isinstance(entry, dict) else None
    state = official_like_state_dict(keys, seed=0, aliases=aliases)
    path = tmp_path / "official.pth"
    torch.save({"model": state}, path)  # the model zoo's layout
    det = Detector.from_checkpoint(path, device="cpu", val_size=64, val_max_size=96)
    assert det.arch == ("detr" if arch == "detr_r50" else "deformable_detr") and det.cfg.name == arch
    assert det.num_classes == 91 and det.class_names[1] == "person" and det.class_names[90] == "toothbrush"
    r = det.predict(np.zeros((50, 80, 3), np.uint8), threshold=0.0)
    assert r.image_size == (50, 80) and len(r) > 0 and set(r.labels.tolist()) <= set(range(91))


def test_coco_class_names_have_the_official_ids():
    assert len(COCO_CLASSES) == 91
    assert [COCO_CLASSES[i] for i in (1, 3, 18, 44, 90)] == ["person", "car", "dog", "bottle", "toothbrush"]
    assert sum(n != "N/A" for n in COCO_CLASSES) == 80


def test_from_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        Detector.from_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError):
        Detector.from_checkpoint(bad)
    with pytest.raises(ValueError, match="carries its config"):
        Detector.from_checkpoint("detr_shapes", arch="detr_r50")
    det = Detector.from_checkpoint("detr_shapes", device="cpu")
    with pytest.raises(ValueError, match="no such file"):
        det.predict(tmp_path / "missing.png")
    junk = tmp_path / "junk.png"
    junk.write_text("junk")
    with pytest.raises(ValueError, match="cannot read image"):
        det.predict(junk)
