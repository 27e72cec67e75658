"""COCO dataset, transforms, collate and up-front validation."""

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_convert

from detr_lite.config import DataConfig, get_config
from detr_lite.data.coco import build_dataset, collate_fn, load_rgb, validate_coco_folder
from detr_lite.data.transforms import IMAGENET_MEAN, IMAGENET_STD

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1] / "data" / "shapes"
MEAN = torch.tensor(IMAGENET_MEAN)[:, None, None]
STD = torch.tensor(IMAGENET_STD)[:, None, None]


def write_coco(root: Path, images, annotations, split="val2017", categories=None):
    """images: list of (file_name, PIL image or None to skip writing); annotations: COCO dicts."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (name, img) in enumerate(images, start=1):
        if img is not None:
            img.save(root / split / name)
            w, h = img.size
        else:
            w, h = 64, 48
        entries.append({"id": i, "file_name": name, "width": w, "height": h})
    for k, a in enumerate(annotations, start=1):
        a.setdefault("id", k)
        a.setdefault("iscrowd", 0)
        a.setdefault("area", a["bbox"][2] * a["bbox"][3])
    cats = categories or [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]
    d = {"images": entries, "annotations": annotations, "categories": cats}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(d))
    return d


def identity_cfg(short: int = 48) -> DataConfig:
    """Val transform that leaves a (48 x 64) image at its own size."""
    return DataConfig(val_size=short, val_max_size=1000)


def denorm(img: torch.Tensor) -> torch.Tensor:
    return img * STD + MEAN


def abs_xyxy(target) -> torch.Tensor:
    h, w = target["size"].tolist()
    return box_convert(target["boxes"], "cxcywh", "xyxy") * torch.tensor([w, h, w, h])


# ---------------------------------------------------------------- bundled data through the pipeline
def test_bundled_val_item_and_boxes():
    cfg = get_config("detr-shapes").data
    ds = build_dataset(ROOT, "val2017", cfg, train=False)
    assert len(ds) == 150 and ds.num_classes == 6 and ds.num_degenerate_boxes == 0
    img, t = ds[0]
    assert img.dtype == torch.float32 and img.ndim == 3 and img.shape[0] == 3
    assert min(img.shape[1:]) == cfg.val_size
    assert set(t) == {"boxes", "labels", "image_id", "orig_size", "size", "area", "iscrowd"}
    assert t["size"].tolist() == list(img.shape[1:])
    assert t["labels"].dtype == torch.int64 and t["boxes"].shape == (len(t["labels"]), 4)
    assert (t["boxes"] >= 0).all() and (t["boxes"] <= 1).all()
    # normalised cxcywh x original size == the COCO annotation boxes
    oh, ow = t["orig_size"].tolist()
    got = box_convert(t["boxes"], "cxcywh", "xywh") * torch.tensor([ow, oh, ow, oh])
    ref = torch.tensor([a["bbox"] for a in ds.coco.imgToAnns[t["image_id"]]])
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-4)


def test_bundled_train_items_and_dataloader():
    cfg = get_config("detr-shapes").data
    ds = build_dataset(ROOT, "train2017", cfg, train=True)
    torch.manual_seed(0)
    random.seed(0)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False, collate_fn=collate_fn)
    images, mask, targets = next(iter(loader))
    assert images.shape[0] == 4 and mask.shape == (4, *images.shape[2:]) and mask.dtype == torch.bool
    for i, t in enumerate(targets):
        h, w = t["size"].tolist()
        assert h <= cfg.train_max_size and w <= cfg.train_max_size
        assert not mask[i, :h, :w].any() and mask[i, h:, :].all() and mask[i, :, w:].all()
        assert (t["boxes"] >= 0).all() and (t["boxes"] <= 1 + 1e-6).all() and (t["boxes"][:, 2:] > 0).all()


# ---------------------------------------------------------------- pixel-level correctness
def test_normalisation_is_imagenet(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    write_coco(tmp_path, [("a.png", Image.fromarray(arr))], [])
    img, t = build_dataset(tmp_path, "val2017", identity_cfg(), train=False)[0]
    assert img.shape == (3, 48, 64)
    expected = (torch.from_numpy(arr).permute(2, 0, 1).float() / 255 - MEAN) / STD
    torch.testing.assert_close(img, expected, atol=1e-5, rtol=1e-5)
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["labels"].dtype == torch.int64


def _rect_image(x0, y0, x1, y1, w=64, h=48):
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[y0:y1, x0:x1] = (250, 40, 40)
    return Image.fromarray(arr)


def _pixel_box(img):
    """xyxy of the red pixels in a normalised image (None if no red)."""
    red = denorm(img)[0] > 0.5
    ys, xs = torch.nonzero(red, as_tuple=True)
    if len(xs) == 0:
        return None
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_train_augmentations_move_boxes_with_pixels(tmp_path):
    """Flip, multi-scale resize and random crop: the target box must follow the red rectangle."""
    write_coco(
        tmp_path,
        [("a.png", _rect_image(8, 10, 30, 40))],
        [{"image_id": 1, "category_id": 3, "bbox": [8, 10, 22, 30]}],
    )
    cfg = DataConfig(
        train_scales=(40, 48, 56), train_max_size=90, crop_resize_scales=(44, 50), crop_size=(20, 40)
    )
    ds = build_dataset(tmp_path, "val2017", cfg, train=True)
    torch.manual_seed(0)
    random.seed(0)
    sides, kept = set(), 0
    for _ in range(40):
        img, t = ds[0]
        pix = _pixel_box(img)
        if len(t["boxes"]) == 0:
            # the crop missed the rectangle: at most a sliver (< 1 px) of red may remain
            assert pix is None or (pix[2:] - pix[:2]).min() <= 2
            continue
        kept += 1
        assert t["labels"].tolist() == [3]
        box = abs_xyxy(t)[0]
        torch.testing.assert_close(box, pix, atol=1.5, rtol=0)
        sides.add("left" if box[0] + box[2] < t["size"][1] else "right")
    assert kept >= 20 and sides == {"left", "right"}  # flips happened both ways


def test_hflip_only(tmp_path):
    """With only the flip active (p=1 via many draws), cx -> 1 - cx exactly."""
    write_coco(
        tmp_path,
        [("a.png", _rect_image(8, 10, 30, 40))],
        [{"image_id": 1, "category_id": 1, "bbox": [8, 10, 22, 30]}],
    )
    cfg = DataConfig(train_scales=(48,), train_max_size=1000, crop_resize_scales=(48,), crop_size=(48, 64))
    ds = build_dataset(tmp_path, "val2017", cfg, train=True)
    unflipped = torch.tensor([19 / 64, 25 / 48, 22 / 64, 30 / 48])
    flipped = torch.tensor([1 - 19 / 64, 25 / 48, 22 / 64, 30 / 48])
    seen = set()
    torch.manual_seed(1)
    random.seed(1)
    for _ in range(20):
        img, t = ds[0]
        if t["size"].tolist() != [48, 64]:
            continue  # the crop branch picked a smaller window
        b = t["boxes"][0]
        if torch.allclose(b, unflipped, atol=1e-5):
            seen.add("plain")
        else:
            torch.testing.assert_close(b, flipped, atol=1e-5, rtol=0)
            assert _pixel_box(img).tolist() == [34, 10, 56, 40]
            seen.add("flipped")
    assert seen == {"plain", "flipped"}


def test_collate_pads_and_masks():
    a = (torch.ones(3, 4, 6), {"x": 1})
    b = (torch.full((3, 7, 5), 2.0), {"x": 2})
    images, mask, targets = collate_fn([a, b])
    assert images.shape == (2, 3, 7, 6) and mask.shape == (2, 7, 6)
    assert (images[0, :, :4, :6] == 1).all() and (images[0, :, 4:] == 0).all()
    assert (images[1, :, :7, :5] == 2).all() and (images[1, :, :, 5:] == 0).all()
    expected = torch.ones(2, 7, 6, dtype=torch.bool)
    expected[0, :4, :6] = False
    expected[1, :7, :5] = False
    assert torch.equal(mask, expected) and [t["x"] for t in targets] == [1, 2]
    # the torch path (used for tensors that need grad or live on a GPU) gives the same batch
    a_grad = (a[0].clone().requires_grad_(), a[1])
    images2, mask2, _ = collate_fn([a_grad, b])
    assert torch.equal(images2.detach(), images) and torch.equal(mask2, mask) and images2.requires_grad


# ---------------------------------------------------------------- bad / unusual inputs
def test_missing_root_and_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder not found"):
        validate_coco_folder(tmp_path / "nope", "val2017")
    with pytest.raises(FileNotFoundError, match=r"instances_val2017\.json: annotation file not found"):
        validate_coco_folder(tmp_path, "val2017")


def test_bad_json(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text('{"images": [')
    with pytest.raises(ValueError, match=r"instances_val2017\.json: not valid JSON"):
        validate_coco_folder(tmp_path, "val2017")
    (tmp_path / "annotations" / "instances_val2017.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="top level must be a JSON object"):
        validate_coco_folder(tmp_path, "val2017")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.pop("categories"), "missing required top-level key 'categories'"),
        (lambda d: d["images"][0].pop("file_name"), r"images\[0\] is missing required key 'file_name'"),
        (lambda d: d["annotations"][0].pop("bbox"), r"annotations\[0\] is missing required key 'bbox'"),
        (
            lambda d: d["annotations"][0].pop("category_id"),
            r"annotations\[0\] is missing required key 'category_id'",
        ),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"annotations\[0\]\['bbox'\] must be"),
        (lambda d: d["annotations"][0].update(image_id=99), r"'image_id'\] = 99 is not in 'images'"),
        (lambda d: d["annotations"][0].update(category_id=2), r"'category_id'\] = 2 is not in 'categories'"),
    ],
)
def test_missing_or_bad_keys(tmp_path, mutate, match):
    d = write_coco(
        tmp_path,
        [("a.png", _rect_image(1, 1, 5, 5))],
        [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]}],
    )
    mutate(d)
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match) as e:
        build_dataset(tmp_path, "val2017", identity_cfg(), train=False)
    assert "\n" not in str(e.value) and "instances_val2017.json" in str(e.value)


def test_missing_images_reported_once_with_count(tmp_path):
    imgs = [("a.png", _rect_image(1, 1, 5, 5))] + [(f"gone{i}.png", None) for i in range(5)]
    write_coco(tmp_path, imgs, [])
    with pytest.raises(
        FileNotFoundError, match=r"5 of 6 images .* are missing, e\.g\. gone0\.png, gone1\.png, gone2\.png$"
    ):
        validate_coco_folder(tmp_path, "val2017")


def test_degenerate_boxes_dropped_counted_and_warned(tmp_path, caplog):
    anns = [
        {"image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10]},  # fine
        {"image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10]},  # zero width
        {"image_id": 1, "category_id": 3, "bbox": [5, 5, 10, -3]},  # negative height
        {"image_id": 1, "category_id": 3, "bbox": [70, 5, 10, 10]},  # right of the 64-px image
        {"image_id": 1, "category_id": 3, "bbox": [-5, 40, 20, 20]},  # partly outside: clipped, kept
    ]
    write_coco(tmp_path, [("a.png", _rect_image(1, 1, 5, 5))], anns)
    with caplog.at_level(logging.WARNING, logger="detr_lite.data.coco"):
        ds = build_dataset(tmp_path, "val2017", identity_cfg(), train=False)
    assert ds.num_degenerate_boxes == 3
    warnings = [r for r in caplog.records if "3 annotation boxes" in r.getMessage()]
    assert len(warnings) == 1
    _, t = ds[0]
    assert t["labels"].tolist() == [1, 3]
    torch.testing.assert_close(
        abs_xyxy(t), torch.tensor([[5.0, 5, 15, 15], [0, 40, 15, 48]]), atol=1e-4, rtol=0
    )


def test_iscrowd_dropped_from_targets_kept_for_eval(tmp_path):
    anns = [
        {"image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10]},
        {"image_id": 1, "category_id": 3, "bbox": [20, 5, 30, 30], "iscrowd": 1},
    ]
    write_coco(tmp_path, [("a.png", _rect_image(1, 1, 5, 5))], anns)
    ds = build_dataset(tmp_path, "val2017", identity_cfg(), train=False)
    _, t = ds[0]
    assert t["labels"].tolist() == [1] and t["iscrowd"].tolist() == [0]
    assert len(ds.coco.getAnnIds(imgIds=[1])) == 2  # COCOeval still sees the crowd region


def test_image_modes_become_rgb(tmp_path):
    grey = np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) % 256
    imgs = {
        "l.png": Image.fromarray(grey.astype(np.uint8), mode="L"),
        "la.png": Image.fromarray(np.stack([grey, np.full_like(grey, 128)], -1).astype(np.uint8), mode="LA"),
        "p.png": Image.fromarray(grey.astype(np.uint8), mode="L").convert("P"),
        "rgba.png": Image.fromarray(
            np.dstack([grey] * 3 + [np.full_like(grey, 7)]).astype(np.uint8), mode="RGBA"
        ),
        "i16.png": Image.fromarray((grey * 257).astype(np.uint16)),  # full 16-bit range
    }
    write_coco(tmp_path, list(imgs.items()), [{"image_id": 5, "category_id": 1, "bbox": [1, 1, 10, 10]}])
    for name in imgs:
        rgb = load_rgb(tmp_path / "val2017" / name)
        assert rgb.mode == "RGB" and rgb.size == (64, 48)
        arr = np.asarray(rgb)
        if name != "p.png":  # palette conversion may merge colours
            np.testing.assert_array_equal(arr[..., 0], grey.astype(np.uint8), err_msg=name)
    ds = build_dataset(tmp_path, "val2017", identity_cfg(), train=False)
    for i in range(len(imgs)):
        img, t = ds[i]
        assert img.shape == (3, 48, 64)
    assert ds[4][1]["labels"].tolist() == [1]


def test_corrupt_image_names_the_file(tmp_path):
    write_coco(tmp_path, [("a.png", _rect_image(1, 1, 5, 5))], [])
    (tmp_path / "val2017" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = build_dataset(tmp_path, "val2017", identity_cfg(), train=False)
    with pytest.raises(ValueError, match=r"a\.png: cannot read image"):
        ds[0]


def test_num_classes_is_max_id_plus_one(tmp_path):
    cats = [{"id": 1, "name": "a"}, {"id": 7, "name": "b"}, {"id": 90, "name": "c"}]
    write_coco(tmp_path, [("a.png", _rect_image(1, 1, 5, 5))], [], categories=cats)
    assert build_dataset(tmp_path, "val2017", identity_cfg(), train=False).num_classes == 91


def test_missing_area_and_iscrowd_are_filled_for_cocoeval(tmp_path):
    d = write_coco(
        tmp_path,
        [("a.png", _rect_image(1, 1, 5, 5))],
        [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 5]}],
    )
    for a in d["annotations"]:
        a.pop("area")
        a.pop("iscrowd")
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(d))
    ds = build_dataset(tmp_path, "val2017", identity_cfg(), train=False)
    ann = ds.coco.anns[1]
    assert ann["area"] == 20 and ann["iscrowd"] == 0


@pytest.mark.parametrize("val_size", [37, 48, 61, 100])
def test_boxes_touching_the_border_survive_resizing(tmp_path, val_size):
    """Regression: float rounding in a resize must not push x1 past W and get the box dropped."""
    anns = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 64, 48]},
        {"image_id": 1, "category_id": 3, "bbox": [50, 30, 14, 18]},
        {"image_id": 1, "category_id": 3, "bbox": [0, 17, 9, 31]},
    ]
    write_coco(tmp_path, [("a.png", _rect_image(1, 1, 5, 5))], anns)
    ds = build_dataset(tmp_path, "val2017", DataConfig(val_size=val_size, val_max_size=1000), train=False)
    img, t = ds[0]
    assert t["labels"].tolist() == [1, 3, 3]
    oh, ow = t["orig_size"].tolist()
    got = box_convert(t["boxes"], "cxcywh", "xywh") * torch.tensor([ow, oh, ow, oh])
    torch.testing.assert_close(
        got, torch.tensor([a["bbox"] for a in anns], dtype=torch.float32), atol=1e-3, rtol=0
    )


def test_sanitize_keeps_box_pushed_past_border_by_rounding():
    """Regression: resizing 26 -> 56 px maps x1 = 26 to 56.000004; a bare SanitizeBoundingBoxes
    drops that (valid) box as out-of-image, ours clamps first."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    from detr_lite.data.transforms import _sanitize

    img = tv_tensors.Image(torch.zeros(3, 22, 26, dtype=torch.uint8))
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor([[16.8125, 0, 26, 18.6667]]), format="XYXY", canvas_size=(22, 26)
        ),
        "labels": torch.tensor([2]),
        "iscrowd": torch.tensor([0]),
    }
    img, target = v2.RandomShortestSize([48], max_size=90)(img, target)
    assert target["boxes"][0, 2] > 56  # the rounding error this guards against
    _, bare = v2.SanitizeBoundingBoxes(labels_getter=None)(img, target)
    _, ours = _sanitize()(img, target)
    assert len(bare["boxes"]) == 0
    assert ours["labels"].tolist() == [2] and ours["boxes"][0, 2].item() == 56
