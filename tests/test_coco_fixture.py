"""The COCO-like fixture: real gapped category ids, crowd RLE regions, polygons, grayscale JPEGs;
and the data pipeline, COCOeval and the train CLI accept it (num_classes derived = 91)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from detr_lite.config import get_config
from detr_lite.data.coco import build_dataset, collate_fn, num_classes_from_coco, validate_coco_folder
from detr_lite.engine import coco_bbox_eval
from tests.coco_fixture import FIXTURE_CATEGORIES, make_coco_fixture
from tests.helpers import SHIPPED_DETR

IDS = [cid for cid, _, _ in FIXTURE_CATEGORIES]


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_fixture")
    stats = make_coco_fixture(root, seed=0, num_train=6, num_val=4)
    return root, stats


def _ann(root, split):
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def test_categories_are_real_coco_ids_with_gaps(fixture_root):
    root, _ = fixture_root
    for split in ("train2017", "val2017"):
        cats = sorted(_ann(root, split)["categories"], key=lambda c: c["id"])
        assert [c["id"] for c in cats] == [1, 3, 18, 44, 90]
        assert [c["name"] for c in cats] == ["person", "car", "dog", "bottle", "toothbrush"]
        used = {a["category_id"] for a in _ann(root, split)["annotations"]}
        assert used <= set(IDS) and len(used) >= 2


def test_crowd_regions_are_rle_and_match_their_boxes(fixture_root):
    root, stats = fixture_root
    for split in ("train2017", "val2017"):
        d = _ann(root, split)
        crowd = [a for a in d["annotations"] if a["iscrowd"] == 1]
        normal = [a for a in d["annotations"] if a["iscrowd"] == 0]
        assert len(crowd) == stats[split]["crowd"] >= 2 and normal
        assert all(set(a) >= {"segmentation", "area", "bbox", "iscrowd"} for a in d["annotations"])
        for a in normal:  # polygons: a list of flat [x0, y0, x1, y1, ...] lists
            assert isinstance(a["segmentation"], list) and len(a["segmentation"][0]) % 2 == 0
        sizes = {im["id"]: (im["height"], im["width"]) for im in d["images"]}
        for a in crowd:  # uncompressed RLE, as in COCO's crowd annotations
            seg = a["segmentation"]
            assert isinstance(seg["counts"], list) and seg["size"] == list(sizes[a["image_id"]])
            m = mask_utils.decode(mask_utils.frPyObjects(seg, *seg["size"]))
            assert m.sum() == a["area"] > 0
            ys, xs = np.nonzero(m)
            x, y, w, h = a["bbox"]  # the mask lies inside its (amodal polygon) box, up to a pixel
            assert xs.min() >= np.floor(x) - 1 and xs.max() <= np.ceil(x + w) + 1
            assert ys.min() >= np.floor(y) - 1 and ys.max() <= np.ceil(y + h) + 1


def test_images_look_like_coco(fixture_root):
    root, stats = fixture_root
    for split in ("train2017", "val2017"):
        d = _ann(root, split)
        ids = [im["id"] for im in d["images"]]
        assert ids == stats[split]["image_ids"] and len(set(ids)) == len(ids)
        assert np.diff(ids).max() > 1  # sparse ids, not 1..N
        modes = []
        for im in d["images"]:
            assert im["file_name"] == f"{im['id']:012d}.jpg"
            with Image.open(root / split / im["file_name"]) as pil:
                assert pil.format == "JPEG" and pil.size == (im["width"], im["height"])
                modes.append(pil.mode)
        assert modes.count("L") == 1 and modes.count("RGB") == len(modes) - 1
    train_ids = set(_ann(root, "train2017")["images"][i]["id"] for i in range(6))
    assert not train_ids & set(stats["val2017"]["image_ids"])


def test_fixture_is_deterministic(tmp_path):
    make_coco_fixture(tmp_path / "a", seed=3, num_train=2, num_val=1)
    make_coco_fixture(tmp_path / "b", seed=3, num_train=2, num_val=1)
    for split in ("train2017", "val2017"):
        rel = f"annotations/instances_{split}.json"
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_pipeline_accepts_it_and_drops_crowd(fixture_root):
    root, _ = fixture_root
    cfg = get_config("detr-shapes").data
    for split, train in (("train2017", True), ("val2017", False)):
        validate_coco_folder(root, split)
        ds = build_dataset(root, split, cfg, train=train)
        assert num_classes_from_coco(ds.coco) == 91
        d = _ann(root, split)
        for i in range(len(ds)):
            img, t = ds[i]
            image_id = int(t["image_id"])
            n_normal = sum(1 for a in d["annotations"] if a["image_id"] == image_id and not a["iscrowd"])
            assert img.shape[0] == 3  # the grayscale JPEG too
            assert len(t["labels"]) <= n_normal  # crowd regions never become targets
            if not train:
                assert len(t["labels"]) == n_normal
            assert set(t["labels"].tolist()) <= set(IDS)
        images, mask, targets = collate_fn([ds[0], ds[1]])
        assert images.shape[:2] == (2, 3) and mask.shape == (2, *images.shape[-2:])


def test_cocoeval_ignores_crowd_regions(fixture_root):
    """Perfect detections of the non-crowd objects score AP 1: crowd regions are not misses."""
    root, _ = fixture_root
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(root / "annotations" / "instances_val2017.json"))
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in coco.dataset["annotations"]
        if not a["iscrowd"]
    ]
    metrics = coco_bbox_eval(coco, dets, coco.getImgIds())
    assert metrics["AP"] == pytest.approx(1.0)
    # and a detection lying exactly on a crowd region is ignored, not a false positive
    crowd = next(a for a in coco.dataset["annotations"] if a["iscrowd"])
    extra = {
        "image_id": crowd["image_id"],
        "category_id": crowd["category_id"],
        "bbox": crowd["bbox"],
        "score": 0.9,
    }
    assert coco_bbox_eval(coco, [*dets, extra], coco.getImgIds())["AP"] == pytest.approx(1.0)


@pytest.mark.slow
def test_train_cli_derives_91_classes(fixture_root, tmp_path):
    from detr_lite.train import main as train_main

    root, _ = fixture_root
    out = tmp_path / "run"
    rc = train_main(
        ["--config", "detr-shapes", "--data", str(root), "--output", str(out), "--epochs", "1",
         "--backbone-weights", str(SHIPPED_DETR),
         "--batch-size", "2", "--max-iters-per-epoch", "1", "--device", "cpu", "--num-workers", "0",
         "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["config"]["model"]["num_classes"] == 91
    assert ckpt["model"]["class_embed.weight"].shape[0] == 92  # 91 classes + no-object
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epoch = [r for r in records if r["type"] == "epoch"]
    assert len(epoch) == 1 and 0.0 <= epoch[0]["AP"] <= 1.0
