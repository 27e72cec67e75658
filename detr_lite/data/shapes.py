"""A deterministic synthetic detection dataset in COCO format ("shapes").

Every image is drawn from a seed, so the bundled copy in ``data/shapes`` can be regenerated
byte for byte::

    python -m detr_lite.data.shapes --out data/shapes --seed 0 --num-train 1100 --num-val 150

What the generator puts in an image:

* a textured background: a smooth two-colour gradient, soft stripes, or low-frequency noise
  (all smooth, so the PNGs stay small);
* 0..``max_objects`` filled shapes of five classes (``SHAPE_CLASSES``), each with a random
  colour that contrasts with the background under it, random size and rotation;
* sizes drawn per object from the three COCO area ranges (small < 32², medium, large > 96²),
  where "area" is the polygon area, as in COCO's ``area`` field that COCOeval buckets by;
* overlaps: objects are drawn in order and may occlude earlier ones, but never hide more than
  ``max_occlusion`` of an earlier object's box;
* some images with no objects at all.

Annotations follow COCO: ``bbox`` = [x, y, w, h] of the whole (amodal) shape in pixel
coordinates where pixel ``i`` covers [i, i+1); ``segmentation`` = one polygon; ``area`` = its
polygon area; ``iscrowd`` = 0. Category ids are raw COCO-style ids (1..5 by default, so a
softmax model uses ``num_classes = max id + 1 = 6``); pass ``category_ids`` to get other ids,
e.g. gapped ones such as (1, 3, 4, 7, 9) for tests.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
DEFAULT_CATEGORY_IDS: tuple[int, ...] = (1, 2, 3, 4, 5)

# COCO area ranges (COCOeval's areaRng): small < 32², medium in [32², 96²), large >= 96².
SMALL_MAX = 32**2
LARGE_MIN = 96**2
# Area (pixels) ranges the generator samples from, log-uniformly, with these probabilities.
_AREA_BUCKETS = {"small": (100.0, 1000.0), "medium": (1100.0, 9000.0), "large": (9500.0, 16000.0)}
_BUCKET_PROBS = {"small": 0.34, "medium": 0.46, "large": 0.20}


# --------------------------------------------------------------------------------------------
# Shapes as unit polygons (centred at 0, roughly radius 1); scaled to a target area later.
# --------------------------------------------------------------------------------------------
def _regular(n: int, phase: float = 0.0) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _unit_polygon(name: str, rng: np.random.Generator) -> np.ndarray:
    """Vertices [N, 2] (x, y) of one shape instance, before scaling, rotation excluded."""
    if name == "circle":  # slightly elliptical disc, 24-gon
        aspect = rng.uniform(0.8, 1.0)
        p = _regular(24)
        return p * np.array([1.0, aspect])
    if name == "square":
        return _regular(4, np.pi / 4)
    if name == "triangle":
        return _regular(3, -np.pi / 2)
    if name == "star":  # 5 outer points, inner radius 0.45
        outer = _regular(10, -np.pi / 2)
        radius = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return outer * radius[:, None]
    if name == "cross":  # plus sign with arm half-width a
        a = 0.3
        pts = [
            (a, -1),
            (a, -a),
            (1, -a),
            (1, a),
            (a, a),
            (a, 1),
            (-a, 1),
            (-a, a),
            (-1, a),
            (-1, -a),
            (-a, -a),
            (-a, -1),
        ]
        return np.array(pts, dtype=np.float64)
    raise ValueError(f"shape name: expected one of {SHAPE_CLASSES}, received {name!r}")


def polygon_area(poly: np.ndarray) -> float:
    """Shoelace formula for a simple polygon given as [N, 2] vertices."""
    x, y = poly[:, 0], poly[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _rotation_range(name: str) -> float:
    # Squares and crosses stay near axis-aligned (they read as "square"/"plus" at small sizes);
    # triangles and stars spin freely.
    return {"circle": np.pi, "square": np.pi / 9, "triangle": np.pi, "star": np.pi, "cross": np.pi / 12}[name]


# --------------------------------------------------------------------------------------------
# Backgrounds: smooth, so PNG's predictive filters compress them well.
# --------------------------------------------------------------------------------------------
def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    c0 = rng.uniform(20, 235, size=3)
    c1 = np.clip(c0 + rng.uniform(-90, 90, size=3), 0, 255)
    if kind == 0:  # linear gradient in a random direction
        ang = rng.uniform(0, 2 * np.pi)
        t = (np.cos(ang) * xx + np.sin(ang) * yy) / max(h, w)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    elif kind == 1:  # soft stripes
        ang = rng.uniform(0, np.pi)
        period = rng.uniform(12, 40)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(ang) * xx + np.sin(ang) * yy) / period)
        c1 = c0 + (c1 - c0) * 0.5  # lower contrast than a gradient
    else:  # low-frequency value noise: a coarse random grid, bicubically upsampled
        g = int(rng.integers(3, 7))
        coarse = rng.uniform(0, 255, size=(g, g)).astype(np.uint8)
        t = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float64) / 255.0
        t = np.round(t * 32) / 32  # 33 levels: soft contour bands that PNG compresses well
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> tuple[int, int, int]:
    """A random colour at least ~100 (L2 in RGB) away from the background colour ``under``."""
    for _ in range(50):
        c = rng.integers(0, 256, size=3)
        if np.linalg.norm(c - under) > 100:
            break
    return tuple(int(v) for v in c)


# --------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------
def _sample_size(rng: np.random.Generator, size_range: tuple[int, int]) -> tuple[int, int]:
    lo, hi = size_range
    choices = np.arange(lo, hi + 1, 16) if hi - lo >= 16 else np.array([lo, hi])
    h, w = (int(v) for v in rng.choice(choices, size=2))
    return h, w


def _overlap_fraction(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection of xyxy boxes a and b divided by the area of a."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area_a = max((a[2] - a[0]) * (a[3] - a[1]), 1e-9)
    return iw * ih / area_a


def render_image(
    rng: np.random.Generator,
    size_range: tuple[int, int] = (128, 192),
    max_objects: int = 6,
    empty_fraction: float = 0.06,
    max_occlusion: float = 0.45,
) -> tuple[Image.Image, list[dict]]:
    """Draw one image; returns (PIL RGB image, list of objects {class_index, polygon, bbox_xyxy})."""
    h, w = _sample_size(rng, size_range)
    canvas = Image.fromarray(_background(rng, h, w))
    bg = np.asarray(canvas).copy()
    draw = ImageDraw.Draw(canvas)
    n = 0 if rng.random() < empty_fraction else int(rng.integers(1, max_objects + 1))
    # 1) sample every object's class and size; at most one "large" object per image
    specs = []
    for _ in range(n):
        cls = int(rng.integers(len(SHAPE_CLASSES)))
        bucket = str(rng.choice(list(_BUCKET_PROBS), p=list(_BUCKET_PROBS.values())))
        if bucket == "large" and any(b == "large" for _, b, _ in specs):
            bucket = "medium"
        lo, hi = _AREA_BUCKETS[bucket]
        specs.append((cls, bucket, math.exp(rng.uniform(math.log(lo), math.log(hi)))))
    # 2) paint back to front (largest first), so small shapes sit on top of big ones
    specs.sort(key=lambda s: -s[2])
    objects: list[dict] = []
    for cls, _bucket, target_area in specs:
        name = SHAPE_CLASSES[cls]
        unit = _unit_polygon(name, rng)
        for _attempt in range(30):
            ang = rng.uniform(-_rotation_range(name), _rotation_range(name))
            rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
            poly = unit @ rot.T
            poly *= math.sqrt(target_area / polygon_area(poly))
            span = poly.max(0) - poly.min(0)
            shrink = min(1.0, (w - 3) / span[0], (h - 3) / span[1])
            poly *= shrink  # a shape too big for this image is shrunk to fit
            cx = rng.uniform(-poly[:, 0].min() + 1, w - 1 - poly[:, 0].max())
            cy = rng.uniform(-poly[:, 1].min() + 1, h - 1 - poly[:, 1].max())
            poly = poly + np.array([cx, cy])
            box = np.concatenate([poly.min(0), poly.max(0)])
            # the new shape is drawn on top: it must not hide too much of any earlier shape
            if any(_overlap_fraction(o["bbox_xyxy"], box) > max_occlusion for o in objects):
                continue
            ci, cj = int(np.clip(cy, 0, h - 1)), int(np.clip(cx, 0, w - 1))
            colour = _contrasting_colour(rng, bg[ci, cj].astype(np.float64))
            # PIL puts vertex (x, y) at the centre of pixel (x, y); continuous coordinates put
            # pixel i on [i, i+1), so shift by -0.5 to rasterise the continuous polygon.
            draw.polygon([(float(x) - 0.5, float(y) - 0.5) for x, y in poly], fill=colour)
            objects.append({"class_index": cls, "polygon": poly, "bbox_xyxy": box})
            break
    return canvas, objects


# --------------------------------------------------------------------------------------------
# Dataset writer
# --------------------------------------------------------------------------------------------
def _r(v: float) -> float:
    return round(float(v), 2)


def _write_split(
    out_dir: Path,
    split: str,
    split_index: int,
    num_images: int,
    seed: int,
    category_ids: tuple[int, ...],
    **render_kw,
) -> dict:
    img_dir = out_dir / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        # an independent stream per (seed, split, image): regenerating one image needs no others
        rng = np.random.default_rng([seed, split_index, i])
        img, objects = render_image(rng, **render_kw)
        image_id = i + 1
        file_name = f"{image_id:06d}.png"
        img.save(img_dir / file_name, format="PNG", optimize=False, compress_level=9)
        images.append({"id": image_id, "file_name": file_name, "height": img.height, "width": img.width})
        for o in objects:
            x0, y0, x1, y1 = o["bbox_xyxy"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(category_ids[o["class_index"]]),
                    "bbox": [_r(x0), _r(y0), _r(x1 - x0), _r(y1 - y0)],
                    "area": _r(polygon_area(o["polygon"])),
                    "segmentation": [[round(float(c), 1) for c in o["polygon"].reshape(-1)]],
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": f"detr_lite synthetic shapes, split {split}, seed {seed}", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": int(cid), "name": name, "supercategory": "shape"}
            for cid, name in zip(category_ids, SHAPE_CLASSES)
        ],
    }
    ann_dir = out_dir / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    with open(ann_dir / f"instances_{split}.json", "w", encoding="utf-8") as f:
        # one annotation per line: readable in diffs, still compact
        f.write(_dump_coco(coco))
    return split_stats(coco)


def _dump_coco(coco: dict) -> str:
    dump = lambda o: json.dumps(o, sort_keys=True, separators=(",", ":"))
    lines = ["{"]
    keys = sorted(coco)
    for k_i, key in enumerate(keys):
        value = coco[key]
        end = "," if k_i < len(keys) - 1 else ""
        if isinstance(value, list) and value:
            lines.append(f"{json.dumps(key)}:[")
            lines.extend(dump(v) + ("," if i < len(value) - 1 else "") for i, v in enumerate(value))
            lines.append("]" + end)
        else:
            lines.append(f"{json.dumps(key)}:{dump(value)}{end}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def split_stats(coco: dict) -> dict:
    """Counts per class and per COCO area range (by the ``area`` field, as COCOeval buckets)."""
    areas = Counter()
    for a in coco["annotations"]:
        areas["small" if a["area"] < SMALL_MAX else "large" if a["area"] >= LARGE_MIN else "medium"] += 1
    id_to_name = {c["id"]: c["name"] for c in coco["categories"]}
    per_class = Counter(id_to_name[a["category_id"]] for a in coco["annotations"])
    with_objects = {a["image_id"] for a in coco["annotations"]}
    return {
        "images": len(coco["images"]),
        "annotations": len(coco["annotations"]),
        "empty_images": len(coco["images"]) - len(with_objects),
        "area_ranges": {k: areas[k] for k in ("small", "medium", "large")},
        "per_class": {n: per_class[n] for n in id_to_name.values()},
    }


def generate(
    out_dir: str | Path,
    seed: int = 0,
    num_train: int = 1100,
    num_val: int = 150,
    image_size: tuple[int, int] = (128, 192),
    max_objects: int = 6,
    empty_fraction: float = 0.06,
    category_ids: tuple[int, ...] = DEFAULT_CATEGORY_IDS,
) -> dict:
    """Write the dataset in COCO 2017 layout under ``out_dir``; returns per-split statistics.

    ``image_size`` = (min, max) side length: each image's height and width are drawn
    independently from ``range(min, max + 1, 16)``, so batches need padding (and masks).
    """
    if len(category_ids) != len(SHAPE_CLASSES) or len(set(category_ids)) != len(category_ids):
        raise ValueError(
            f"category_ids: expected {len(SHAPE_CLASSES)} distinct ids, received {tuple(category_ids)}"
        )
    if min(category_ids) < 1:
        raise ValueError(f"category_ids: expected ids >= 1 (COCO style), received {tuple(category_ids)}")
    if image_size[0] < 32 or image_size[1] < image_size[0]:
        raise ValueError(
            f"image_size: expected (min, max) with 32 <= min <= max, received {tuple(image_size)}"
        )
    out = Path(out_dir)
    kw = dict(size_range=tuple(image_size), max_objects=max_objects, empty_fraction=empty_fraction)
    stats = {}
    for split_index, (split, n) in enumerate((("train2017", num_train), ("val2017", num_val))):
        stats[split] = _write_split(out, split, split_index, n, seed, tuple(category_ids), **kw)
    return stats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m detr_lite.data.shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (COCO layout is written inside)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=1100)
    p.add_argument("--num-val", type=int, default=150)
    p.add_argument("--image-size", type=int, nargs=2, default=(128, 192), metavar=("MIN", "MAX"))
    p.add_argument("--max-objects", type=int, default=6)
    p.add_argument("--empty-fraction", type=float, default=0.06)
    p.add_argument("--category-ids", type=int, nargs=len(SHAPE_CLASSES), default=DEFAULT_CATEGORY_IDS)
    a = p.parse_args(argv)
    stats = generate(
        a.out,
        seed=a.seed,
        num_train=a.num_train,
        num_val=a.num_val,
        image_size=tuple(a.image_size),
        max_objects=a.max_objects,
        empty_fraction=a.empty_fraction,
        category_ids=tuple(a.category_ids),
    )
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
