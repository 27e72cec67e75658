"""A tiny dataset that looks like real COCO 2017, for smoke tests and CI.

The bundled shapes data is already in COCO format, but real COCO has quirks a toy dataset does
not, and each one has broken a DETR data pipeline somewhere:

* **category ids with gaps**: COCO's 80 classes use ids 1..90 (12 ids are unused), so a
  softmax DETR needs ``num_classes = max id + 1 = 91`` logits, not 80. The fixture uses the real
  ids of person (1), car (3), dog (18), bottle (44) and toothbrush (90);
* **crowd annotations**: ``iscrowd = 1`` regions with an RLE ``segmentation`` (not a polygon).
  Training must drop them from the targets; COCOeval uses them as "ignore" regions;
* **polygon segmentations** for ordinary objects;
* **sparse image ids** and 12-digit JPEG file names (``000000000139.jpg``);
* **a grayscale JPEG** in each split (COCO has a few), which must still become 3 channels.

:func:`make_coco_fixture` draws the images with the shapes generator
(:func:`detr_lite.data.shapes.generate`), then rewrites them into this form. CLI::

    python -m tests.coco_fixture --out /tmp/coco_fixture   # from the repository root
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from detr_lite.data.shapes import generate

# Five real COCO categories (id, name, supercategory); note the gaps between the ids.
FIXTURE_CATEGORIES: tuple[tuple[int, str, str], ...] = (
    (1, "person", "person"),
    (3, "car", "vehicle"),
    (18, "dog", "animal"),
    (44, "bottle", "kitchen"),
    (90, "toothbrush", "indoor"),
)


def _crowd_rle(polygon: list[float], h: int, w: int) -> tuple[dict, int]:
    """The region of ``polygon`` as COCO stores crowd regions (uncompressed RLE ``{counts, size}``),
    and its pixel area (COCO's ``area`` of a crowd region counts mask pixels)."""
    m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], h, w)))  # [h, w] uint8
    # COCO's uncompressed RLE: run lengths of 0s and 1s in column-major (Fortran) order, starting with 0s
    flat = np.asarray(m, dtype=np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"counts": [int(c) for c in counts], "size": [h, w]}, int(flat.sum())


def _rewrite_split(root: Path, split: str, id_offset: int, crowd_every: int, min_crowd: int) -> dict:
    ann_path = root / "annotations" / f"instances_{split}.json"
    coco = json.loads(ann_path.read_text())
    old_cats = sorted(c["id"] for c in coco["categories"])
    real = {cid: (name, sup) for cid, name, sup in FIXTURE_CATEGORIES}
    if old_cats != sorted(real):
        raise ValueError(f"{ann_path}: categories {old_cats}, expected {sorted(real)}")
    coco["categories"] = [
        {"id": cid, "name": real[cid][0], "supercategory": real[cid][1]} for cid in old_cats
    ]

    # sparse image ids + 12-digit JPEG names; one grayscale image per split
    new_id = {}
    img_dir = root / split
    gray_done = False
    for k, img in enumerate(coco["images"]):
        nid = id_offset + 7 * k + 3 * (k % 3)
        new_id[img["id"]] = nid
        src = img_dir / img["file_name"]
        pil = Image.open(src).convert("RGB")
        has_objects = any(a["image_id"] == img["id"] for a in coco["annotations"])
        if not gray_done and has_objects:
            pil = pil.convert("L")
            gray_done = True
        name = f"{nid:012d}.jpg"
        pil.save(img_dir / name, format="JPEG", quality=90)
        src.unlink()
        img.update(id=nid, file_name=name, license=1, date_captured="2013-11-14 16:28:13")
    sizes = {img["id"]: (img["height"], img["width"]) for img in coco["images"]}

    # a few annotations become crowd regions (RLE), the rest keep their polygon
    anns = coco["annotations"]
    crowd_idx = [i for i in range(len(anns)) if i % crowd_every == crowd_every // 2]
    if len(crowd_idx) < min(min_crowd, len(anns)):
        crowd_idx = list(range(min(min_crowd, len(anns))))
    for i, a in enumerate(anns):
        a["image_id"] = new_id[a["image_id"]]
        a["id"] = 100_000 * (id_offset // 100_000 + 1) + 11 * i
        if i in crowd_idx:
            h, w = sizes[a["image_id"]]
            a["segmentation"], a["area"] = _crowd_rle(a["segmentation"][0], h, w)
            a["iscrowd"] = 1
    coco["licenses"] = [{"id": 1, "name": "Attribution License", "url": "about:blank"}]
    coco["info"]["description"] = f"detr_lite COCO-like fixture ({split})"
    ann_path.write_text(json.dumps(coco, separators=(",", ":")))
    return {
        "images": len(coco["images"]),
        "annotations": len(anns),
        "crowd": len(crowd_idx),
        "image_ids": [img["id"] for img in coco["images"]],
    }


def make_coco_fixture(
    out_dir: str | Path,
    seed: int = 0,
    num_train: int = 6,
    num_val: int = 4,
    image_size: tuple[int, int] = (64, 96),
    max_objects: int = 4,
    crowd_every: int = 5,
    min_crowd: int = 2,
) -> dict:
    """Write a COCO-2017-like dataset under ``out_dir`` (``train2017/``, ``val2017/``, ``annotations/``).

    Returns ``{split: {'images', 'annotations', 'crowd', 'image_ids'}}``. Deterministic for a seed.
    Every ``crowd_every``-th annotation (at least ``min_crowd`` per split) is an ``iscrowd=1`` region.
    """
    out = Path(out_dir)
    generate(
        out,
        seed=seed,
        num_train=num_train,
        num_val=num_val,
        image_size=tuple(image_size),
        max_objects=max_objects,
        empty_fraction=0.0,
        category_ids=tuple(cid for cid, _, _ in FIXTURE_CATEGORIES),
    )
    return {
        "train2017": _rewrite_split(out, "train2017", 100, crowd_every, min_crowd),
        "val2017": _rewrite_split(out, "val2017", 500_000, crowd_every, min_crowd),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.coco_fixture", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=6)
    p.add_argument("--num-val", type=int, default=4)
    a = p.parse_args(argv)
    stats = make_coco_fixture(a.out, seed=a.seed, num_train=a.num_train, num_val=a.num_val)
    print(json.dumps({k: {kk: v for kk, v in s.items() if kk != "image_ids"} for k, s in stats.items()}))


if __name__ == "__main__":
    main()
