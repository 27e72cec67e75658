"""The synthetic shapes generator and the bundled split in data/shapes."""

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detr_lite.data.shapes import (
    LARGE_MIN,
    SHAPE_CLASSES,
    SMALL_MAX,
    generate,
    main,
    polygon_area,
    render_image,
    split_stats,
)

ROOT = Path(__file__).resolve().parents[1] / "data" / "shapes"
SPLITS = ("train2017", "val2017")


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bundled():
    return {s: json.loads((ROOT / "annotations" / f"instances_{s}.json").read_text()) for s in SPLITS}


# ---------------------------------------------------------------- generator
def test_regeneration_is_byte_identical(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, seed=7, num_train=6, num_val=3)
    generate(b, seed=7, num_train=6, num_val=3)
    generate(c, seed=8, num_train=6, num_val=3)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len(fa) == 6 + 3 + 2
    assert fa == fb
    assert fa != fc


def test_bundled_images_are_reproduced_by_the_generator(bundled):
    """Re-render a few bundled images from (seed 0, split, index) and compare the PNG bytes."""
    for split_index, split in enumerate(SPLITS):
        for i in (0, 1, 17):
            img, objects = render_image(np.random.default_rng([0, split_index, i]))
            buf = io.BytesIO()
            img.save(buf, format="PNG", optimize=False, compress_level=9)
            info = bundled[split]["images"][i]
            assert buf.getvalue() == (ROOT / split / info["file_name"]).read_bytes()
            anns = [a for a in bundled[split]["annotations"] if a["image_id"] == info["id"]]
            assert [a["category_id"] for a in anns] == [o["class_index"] + 1 for o in objects]


def test_gapped_category_ids_and_cli(tmp_path, capsys):
    main(
        [
            "--out",
            str(tmp_path),
            "--seed",
            "3",
            "--num-train",
            "4",
            "--num-val",
            "2",
            "--category-ids",
            "1",
            "3",
            "4",
            "7",
            "9",
        ]
    )
    stats = json.loads(capsys.readouterr().out)
    assert stats["train2017"]["images"] == 4 and stats["val2017"]["images"] == 2
    d = json.loads((tmp_path / "annotations" / "instances_train2017.json").read_text())
    assert [c["id"] for c in d["categories"]] == [1, 3, 4, 7, 9]
    assert [c["name"] for c in d["categories"]] == list(SHAPE_CLASSES)
    assert {a["category_id"] for a in d["annotations"]} <= {1, 3, 4, 7, 9}


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(category_ids=(1, 2, 3)), "category_ids"),
        (dict(category_ids=(0, 1, 2, 3, 4)), "ids >= 1"),
        (dict(category_ids=(1, 1, 2, 3, 4)), "distinct"),
        (dict(image_size=(16, 64)), "image_size"),
    ],
)
def test_bad_arguments(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        generate(tmp_path, num_train=1, num_val=1, **kw)


# ---------------------------------------------------------------- the bundled split
def test_layout_and_size():
    for s in SPLITS:
        assert (ROOT / "annotations" / f"instances_{s}.json").is_file()
    total = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    assert total <= 6_000_000, total


@pytest.mark.parametrize("split", SPLITS)
def test_area_ranges_empty_images_and_classes(bundled, split):
    d = bundled[split]
    st = split_stats(d)
    n = st["annotations"]
    # every COCO area range is well represented (COCOeval's APs / APm / APl all meaningful)
    for rng in ("small", "medium", "large"):
        assert st["area_ranges"][rng] >= 0.08 * n, (rng, st["area_ranges"])
    assert st["empty_images"] >= 0.02 * st["images"]
    assert {c["id"]: c["name"] for c in d["categories"]} == {
        i + 1: name for i, name in enumerate(SHAPE_CLASSES)
    }
    assert min(st["per_class"].values()) >= 0.15 * n
    per_image = np.bincount([a["image_id"] for a in d["annotations"]], minlength=len(d["images"]) + 1)
    assert per_image.max() <= 6


@pytest.mark.parametrize("split", SPLITS)
def test_annotations_are_consistent(bundled, split):
    d = bundled[split]
    images = {im["id"]: im for im in d["images"]}
    assert sorted(images) == list(range(1, len(images) + 1))
    ids = [a["id"] for a in d["annotations"]]
    assert len(set(ids)) == len(ids)
    for a in d["annotations"]:
        im = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"] and w >= 1 and h >= 1
        poly = np.array(a["segmentation"][0]).reshape(-1, 2)
        # bbox = polygon bounds; area = polygon area (segmentation rounded to 0.1 px)
        np.testing.assert_allclose([x, y, x + w, y + h], [*poly.min(0), *poly.max(0)], atol=0.06)
        assert a["area"] == pytest.approx(polygon_area(poly), rel=0.02, abs=2)
        assert a["iscrowd"] == 0


def test_image_files_match_json(bundled):
    d = bundled["val2017"]
    for im in d["images"][:40]:
        with Image.open(ROOT / "val2017" / im["file_name"]) as f:
            assert f.mode == "RGB" and f.size == (im["width"], im["height"])
    assert len(list((ROOT / "train2017").glob("*.png"))) == len(bundled["train2017"]["images"])
    assert len(list((ROOT / "val2017").glob("*.png"))) == len(d["images"])


def test_objects_are_visible_in_pixels(bundled):
    """The pixels at a non-occluded shape's centre differ from the image's background."""
    d = bundled["val2017"]
    by_image = {}
    for a in d["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    checked = 0
    for im in d["images"][:30]:
        anns = by_image.get(im["id"], [])
        arr = np.asarray(Image.open(ROOT / "val2017" / im["file_name"]), dtype=np.int32)
        for a in anns[-1:]:  # the last-drawn shape is on top of everything
            x, y, w, h = a["bbox"]
            box = arr[int(y) : int(y + h), int(x) : int(x + w)].reshape(-1, 3)
            # a solid shape: its most common colour covers a good part of its box
            _, counts = np.unique(box, axis=0, return_counts=True)
            assert counts.max() >= 0.2 * len(box)
            checked += 1
    assert checked >= 20


def test_readme_counts_match_the_data(bundled):
    text = (ROOT / "README.md").read_text()
    for split in SPLITS:
        st = split_stats(bundled[split])
        r = st["area_ranges"]
        row = f"| {split} | {st['images']} | {st['empty_images']} | {st['annotations']} | {r['small']} | {r['medium']} | {r['large']} |"
        assert row in text, row
    assert re.search(r"--num-train 1100 --num-val 150", text)
    assert SMALL_MAX == 32**2 and LARGE_MIN == 96**2
