"""COCO-format detection data: validation, dataset, collate.

The same code reads the bundled ``data/shapes`` and real COCO 2017, because both use the COCO
layout::

    ROOT/train2017/*.jpg|png                ROOT/annotations/instances_train2017.json
    ROOT/val2017/*.jpg|png                  ROOT/annotations/instances_val2017.json

``validate_coco_folder`` checks that layout up front (one-line errors naming file and key),
``build_dataset`` returns a ``torchvision.datasets.CocoDetection`` subclass whose items are
``(image [3,H,W] float normalised, target)`` with

    target = {'boxes' [n,4] normalised cxcywh, 'labels' int64 [n] (raw COCO category ids),
              'image_id' int, 'orig_size' [2] (h, w), 'size' [2] (h, w),
              'area' [n] (box area, pixels of the transformed image), 'iscrowd' [n] (zeros)}

and ``collate_fn`` pads a batch to its largest H and W with a ``True``-means-padding mask.

Like the official DETR, crowd annotations (``iscrowd=1``) are removed from training targets;
COCOeval still sees them through ``dataset.coco`` and treats them as "ignore" regions.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection

from detr_lite.config import DataConfig
from detr_lite.data.transforms import build_transforms

log = logging.getLogger(__name__)

_REQUIRED_TOP = ("images", "annotations", "categories")
_REQUIRED_IMAGE = ("id", "file_name")
_REQUIRED_ANN = ("id", "image_id", "category_id", "bbox")
_REQUIRED_CAT = ("id",)


# --------------------------------------------------------------------------------------------
# Validation: everything is checked before any training starts.
# --------------------------------------------------------------------------------------------
def annotation_path(root: str | Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def _check_entries(path: Path, section: str, entries, required: tuple[str, ...]) -> None:
    if not isinstance(entries, list):
        raise ValueError(f"{path}: '{section}' must be a list, received {type(entries).__name__}")
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ValueError(f"{path}: {section}[{i}] must be an object, received {type(e).__name__}")
        for key in required:
            if key not in e:
                raise ValueError(f"{path}: {section}[{i}] is missing required key '{key}'")


def validate_coco_folder(root: str | Path, split: str, check_images: bool = True) -> dict:
    """Check ``root`` holds a readable COCO split; return the parsed annotation dict.

    Raises ``FileNotFoundError`` (folder, annotation file or image files missing) or
    ``ValueError`` (not JSON, missing keys, malformed bbox, dangling ids), each as one line that
    names the file and the key.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data root {root}: folder not found (expected COCO layout with annotations/)"
        )
    ann = annotation_path(root, split)
    if not ann.is_file():
        raise FileNotFoundError(
            f"{ann}: annotation file not found (expected annotations/instances_{split}.json)"
        )
    try:
        with open(ann, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{ann}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{ann}: not valid JSON (not UTF-8 text: {e.reason})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{ann}: top level must be a JSON object, received {type(data).__name__}")
    for key in _REQUIRED_TOP:
        if key not in data:
            raise ValueError(f"{ann}: missing required top-level key '{key}'")
    _check_entries(ann, "images", data["images"], _REQUIRED_IMAGE)
    _check_entries(ann, "annotations", data["annotations"], _REQUIRED_ANN)
    _check_entries(ann, "categories", data["categories"], _REQUIRED_CAT)
    image_ids = {im["id"] for im in data["images"]}
    cat_ids = {c["id"] for c in data["categories"]}
    for i, a in enumerate(data["annotations"]):
        b = a["bbox"]
        if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)):
            raise ValueError(f"{ann}: annotations[{i}]['bbox'] must be [x, y, w, h] numbers, received {b!r}")
        if a["image_id"] not in image_ids:
            raise ValueError(f"{ann}: annotations[{i}]['image_id'] = {a['image_id']!r} is not in 'images'")
        if a["category_id"] not in cat_ids:
            raise ValueError(
                f"{ann}: annotations[{i}]['category_id'] = {a['category_id']!r} is not in 'categories'"
            )
    if check_images:
        img_dir = root / split
        if not img_dir.is_dir():
            raise FileNotFoundError(f"{img_dir}: image folder not found (listed in {ann})")
        present = set(os.listdir(img_dir))
        missing = [im["file_name"] for im in data["images"] if im["file_name"] not in present]
        if missing:
            # file_name may contain sub-folders; check those on disk before complaining
            missing = [m for m in missing if not (img_dir / m).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{img_dir}: {len(missing)} of {len(data['images'])} images listed in {ann.name} are missing, "
                f"e.g. {', '.join(missing[:3])}"
            )
    return data


def num_classes_from_coco(coco: COCO) -> int:
    """Raw COCO ids are used as class indices, so a softmax head needs ``max id + 1`` classes."""
    return max(coco.getCatIds()) + 1


def resolve_num_classes(dataset: CocoDetectionDETR, fixed: int | None = None) -> int:
    """``num_classes`` for a model trained on ``dataset``: its max category id + 1, or ``fixed``
    (``--num-classes``) after checking that it covers every id."""
    ids = dataset.coco.getCatIds()
    if not ids:
        raise ValueError(f"{dataset.ann_file}: lists no categories")
    if fixed is not None and max(ids) >= fixed:
        raise ValueError(
            f"--num-classes {fixed}: the dataset has category id {max(ids)}; expected num_classes >= {max(ids) + 1}"
        )
    return fixed if fixed is not None else max(ids) + 1


# --------------------------------------------------------------------------------------------
# Image loading: any PIL mode -> RGB uint8
# --------------------------------------------------------------------------------------------
def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as 8-bit RGB, whatever its mode (L, LA, P, RGBA, I;16, I, F, CMYK, ...).

    16/32-bit grey images are rescaled to 0..255 by their bit depth (``I;16``: /257) rather than
    clipped, which is what a plain ``convert('RGB')`` would do.
    """
    try:
        im = Image.open(path)
        im.load()
    except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt / not an image
        raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    with im:
        if im.mode == "RGB":
            return im.copy()
        if im.mode.startswith("I;16") or im.mode in ("I", "F"):
            a = np.asarray(im).astype(np.float64)
            if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255):
                a = a / 257.0  # 16-bit range -> 8-bit range
            elif im.mode == "F" and a.max(initial=0) <= 1.0:
                a = a * 255.0
            grey = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), mode="L")
            return grey.convert("RGB")
        if im.mode == "P":
            # palette images may carry transparency; go through RGBA so PIL resolves it
            return im.convert("RGBA").convert("RGB")
        return im.convert("RGB")  # L, LA, RGBA, CMYK, YCbCr, 1, ...


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------
def _clean_boxes(anns: list[dict], width: float, height: float) -> tuple[np.ndarray, np.ndarray, int]:
    """COCO xywh -> clipped xyxy for non-crowd annotations; returns (boxes, keep, n_degenerate).

    ``keep`` indexes ``anns``; a box is degenerate when, after clipping to the image, its width
    or height is below 1 px (the same threshold ``SanitizeBoundingBoxes`` applies later).
    """
    boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    crowd = np.array([a.get("iscrowd", 0) for a in anns], dtype=bool)
    xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
    xyxy[:, 0::2] = xyxy[:, 0::2].clip(0, width)
    xyxy[:, 1::2] = xyxy[:, 1::2].clip(0, height)
    valid = ((xyxy[:, 2] - xyxy[:, 0]) >= 1) & ((xyxy[:, 3] - xyxy[:, 1]) >= 1) & np.isfinite(xyxy).all(1)
    keep = np.nonzero(valid & ~crowd)[0]
    return xyxy[keep], keep, int((~valid & ~crowd).sum())


class CocoDetectionDETR(CocoDetection):
    """``CocoDetection`` returning DETR-ready ``(image, target)`` pairs (see module docstring).

    Built from an already-validated annotation dict, so no JSON is parsed twice. Attributes:
    ``coco`` (pycocotools COCO, for COCOeval), ``num_classes`` (max category id + 1),
    ``num_degenerate_boxes`` (non-crowd boxes that are empty or outside their image; dropped).
    """

    def __init__(self, img_folder: str | Path, ann_data: dict, transforms=None, ann_file: str = "<dict>"):
        # CocoDetection.__init__ would re-read the JSON; set up the same fields ourselves.
        torch.utils.data.Dataset.__init__(self)
        self.root = str(img_folder)
        self.transform = self.target_transform = None
        self.transforms = transforms
        self.ann_file = ann_file
        self.coco = _coco_from_dict(ann_data)
        self.ids = sorted(self.coco.imgs.keys())
        self.num_classes = num_classes_from_coco(self.coco) if self.coco.getCatIds() else 1
        self.num_degenerate_boxes = self._count_degenerate()
        if self.num_degenerate_boxes:
            log.warning(
                "%s: %d annotation boxes have width/height < 1 px or lie outside their image; "
                "they are dropped from the targets",
                ann_file,
                self.num_degenerate_boxes,
            )

    def _count_degenerate(self) -> int:
        n = 0
        for img_id in self.ids:
            info = self.coco.imgs[img_id]
            if "width" not in info or "height" not in info:
                continue  # sizes unknown until the image is read; such boxes are clipped per item
            anns = self.coco.imgToAnns.get(img_id, [])
            n += _clean_boxes(anns, info["width"], info["height"])[2]
        return n

    def _load_image(self, id: int) -> Image.Image:
        return load_rgb(os.path.join(self.root, self.coco.loadImgs(id)[0]["file_name"]))

    def raw_target(self, index: int) -> tuple[Image.Image, dict]:
        """The untransformed ``(PIL image, target)`` with absolute xyxy ``BoundingBoxes``."""
        img_id = self.ids[index]
        image = self._load_image(img_id)
        w, h = image.size
        anns = self.coco.imgToAnns.get(img_id, [])
        boxes, keep, _ = _clean_boxes(anns, w, h)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                format="XYXY",
                canvas_size=(h, w),
                clamping_mode="hard",  # every geometric transform clamps boxes to the image
            ),
            "labels": torch.tensor([anns[i]["category_id"] for i in keep], dtype=torch.int64),
            "iscrowd": torch.zeros(len(keep), dtype=torch.int64),
            "image_id": int(img_id),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
        }
        return image, target

    def __getitem__(self, index: int):
        image, target = self.raw_target(index)
        # PIL goes through the geometric transforms (PIL resize, as the official code)
        if self.transforms is not None:
            return self.transforms(image, target)
        return image, target

    def __len__(self) -> int:
        return len(self.ids)


def _coco_from_dict(data: dict) -> COCO:
    """pycocotools COCO from a dict; fills COCOeval-required 'area'/'iscrowd' if a file lacks them."""
    for a in data["annotations"]:
        if "area" not in a:
            a["area"] = float(a["bbox"][2] * a["bbox"][3])
        a.setdefault("iscrowd", 0)
    data.setdefault("info", {})
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def build_dataset(root: str | Path, split: str, cfg: DataConfig, train: bool) -> CocoDetectionDETR:
    """Validated COCO split under ``root`` with the train/val transforms of ``cfg`` (its annotation
    file is read once: the dataset is built from the validated dict)."""
    data = validate_coco_folder(root, split)
    return CocoDetectionDETR(
        Path(root) / split,
        data,
        transforms=build_transforms(cfg, train),
        ann_file=str(annotation_path(root, split)),
    )


def build_datasets(cfg: DataConfig) -> tuple[CocoDetectionDETR, CocoDetectionDETR]:
    """The training and validation splits of ``cfg.root`` (train and val transforms)."""
    return build_dataset(cfg.root, cfg.train_split, cfg, train=True), build_dataset(cfg.root, cfg.val_split, cfg, train=False)


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------
def collate_fn(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Pad images to the batch's max H and W (zeros, bottom/right); mask is True on padding.

    Returns ``(images [B,3,Hm,Wm], mask [B,Hm,Wm] bool, targets)``. CPU tensors are padded with
    NumPy (single-threaded): with ``num_workers=0`` this runs in the training process, where
    torch's thread pool makes these small copies several times slower on a busy machine.
    """
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    if not images:
        raise ValueError("collate_fn: received an empty batch")
    c = images[0].shape[0]
    hm = max(im.shape[1] for im in images)
    wm = max(im.shape[2] for im in images)
    if all(im.device.type == "cpu" and not im.requires_grad for im in images):
        out = np.zeros((len(images), c, hm, wm), dtype=images[0].numpy().dtype)
        mask = np.ones((len(images), hm, wm), dtype=bool)
        for i, im in enumerate(images):
            out[i, :, : im.shape[1], : im.shape[2]] = im.numpy()
            mask[i, : im.shape[1], : im.shape[2]] = False
        return torch.from_numpy(out), torch.from_numpy(mask), targets
    out = images[0].new_zeros((len(images), c, hm, wm))
    mask = torch.ones((len(images), hm, wm), dtype=torch.bool, device=images[0].device)
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]] = im
        mask[i, : im.shape[1], : im.shape[2]] = False
    return out, mask, targets
