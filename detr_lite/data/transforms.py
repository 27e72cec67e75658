"""Box-aware augmentation for DETR, built from ``torchvision.transforms.v2``.

The official DETR recipe (``datasets/coco.py::make_coco_transforms``), expressed with v2 pieces:

train::

    RandomHorizontalFlip
    RandomChoice(
        RandomShortestSize(train_scales, max_size),                    # plain multi-scale
        Compose(RandomShortestSize(crop_resize_scales),                # or: resize,
                RandomSizeCrop(*crop_size),                            #     random crop,
                RandomShortestSize(train_scales, max_size)),           #     multi-scale again
    )

val: resize the short side to ``val_size`` (long side at most ``val_max_size``).

Both then run ``ClampBoundingBoxes`` + ``SanitizeBoundingBoxes`` (drop boxes that a crop
squeezed below 1 px), ``ToNormalizedTensor`` (float32, ImageNet mean/std) and ``ToDetrTarget``
(absolute xyxy pixels -> normalised cxcywh plain tensors, plus ``size``).

Every transform takes and returns ``(image, target)`` where ``image`` is a PIL image (as in the
official code: PIL resizes, with antialiasing) or a ``tv_tensors.Image``, and
``target['boxes']`` a ``tv_tensors.BoundingBoxes``; v2 moves the boxes with the pixels.

The val pipeline also runs on an image alone (inference): ``build_transforms(cfg, train=False)(image)``
returns the normalised ``[3, H, W]`` tensor, the box steps are skipped (also for ``(image, None)``,
which returns ``(tensor, None)``). :func:`to_pil_rgb` turns any image a user may hold (PIL of any
mode, numpy array, tensor; grey, RGBA, 16-bit, float) into the 8-bit RGB PIL image the pipeline takes.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from detr_lite.config import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
_STD = np.array(IMAGENET_STD, dtype=np.float32)
_NO_TARGET = object()  # "called with the image alone" (v2.Compose then passes one argument)


def _image_hw(flat_inputs: list[Any]) -> tuple[int, int]:
    for x in flat_inputs:
        if isinstance(x, (PIL.Image.Image, tv_tensors.Image, tv_tensors.Video)) or (
            isinstance(x, torch.Tensor) and not isinstance(x, tv_tensors.TVTensor) and x.ndim >= 3
        ):
            h, w = F.get_size(x)
            return h, w
    raise ValueError("RandomSizeCrop: expected an image among the inputs, received none")


class RandomSizeCrop(v2.Transform):
    """Crop a random (h, w) window; h, w uniform in ``[min_size, min(image side, max_size)]``.

    Same sampling as the official ``RandomSizeCrop`` (the crop side is drawn per axis, then a
    random position); images smaller than ``min_size`` are cropped to their own size on that
    axis instead of raising. Boxes are translated and clipped by ``F.crop``; those left empty are
    removed later by ``SanitizeBoundingBoxes``.
    """

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(
                f"RandomSizeCrop: expected 0 < min_size <= max_size, received ({min_size}, {max_size})"
            )
        self.min_size, self.max_size = int(min_size), int(max_size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image_hw(flat_inputs)
        ch = random.randint(min(self.min_size, h), min(h, self.max_size))
        cw = random.randint(min(self.min_size, w), min(w, self.max_size))
        top = random.randint(0, h - ch)
        left = random.randint(0, w - cw)
        return dict(top=top, left=left, height=ch, width=cw)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.crop(inpt, **params)


class ToNormalizedTensor(v2.Transform):
    """PIL (or uint8 tensor) image -> float32 ``[3, H, W]``, ImageNet-normalised.

    The same numbers as ``ToImage + ToDtype(float32, scale=True) + Normalize(mean, std)``, but
    computed with NumPy, single-threaded: for images this small, torch's intra-op thread pool
    costs far more than it saves when the machine is busy (``benchmarks/bench_data.py``).
    """

    def forward(self, image: Any, target: dict | None = _NO_TARGET):
        if isinstance(image, PIL.Image.Image):
            arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # [H, W, 3]
        else:
            t = image.as_subclass(torch.Tensor)
            arr = t.permute(1, 2, 0).numpy().astype(np.float32)
            if not t.is_floating_point():
                arr /= 255.0
        arr = (arr - _MEAN) / _STD
        tensor = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        return tensor if target is _NO_TARGET else (tensor, target)


class ToDetrTarget(v2.Transform):
    """Last step: boxes -> normalised cxcywh plain tensor; ``area`` = box area in pixels; ``size``.

    Runs on the final (resized, cropped) image, so ``size`` is its (h, w) and the box
    normalisation divides by that same size — the convention the model's sigmoid boxes use.
    """

    def forward(self, image: torch.Tensor, target: dict | None = _NO_TARGET):
        if target is _NO_TARGET or target is None:  # inference: the image alone
            plain = image.as_subclass(torch.Tensor)
            return plain if target is _NO_TARGET else (plain, None)
        h, w = F.get_size(image)
        boxes = target["boxes"]
        xyxy = boxes.as_subclass(torch.Tensor).float()
        out = dict(target)
        out["area"] = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        out["boxes"] = box_convert(xyxy, "xyxy", "cxcywh") / scale
        out["size"] = torch.tensor([h, w], dtype=torch.int64)
        return image.as_subclass(torch.Tensor), out


class _IfTarget(v2.Transform):
    """Run ``inner`` on ``(image, target)``; pass an image given alone (or with target None) through."""

    def __init__(self, inner: v2.Transform):
        super().__init__()
        self.inner = inner

    def forward(self, *inputs: Any) -> Any:
        if len(inputs) == 1:
            return inputs[0]
        if inputs[1] is None:
            return inputs
        return self.inner(*inputs)


def _sanitize() -> v2.Compose:
    """Clamp boxes to the image, then drop those under 1 px (with their labels and iscrowd).

    The clamp matters: resizing can leave a coordinate a float rounding error outside the
    image (x1 = W + 4e-6), and ``SanitizeBoundingBoxes`` drops any box outside the canvas.
    """
    return v2.Compose(
        [
            v2.ClampBoundingBoxes(clamping_mode="hard"),
            v2.SanitizeBoundingBoxes(
                labels_getter=lambda inputs: (inputs[1]["labels"], inputs[1]["iscrowd"])
            ),
        ]
    )


def scaled_sizes(cfg: DataConfig, scale: float = 1.0) -> dict[str, Any]:
    """The training sizes of ``cfg`` multiplied by ``scale`` (rounded; ``data.late_scale``)."""
    if not scale > 0:
        raise ValueError(f"data.late_scale: expected a positive factor, received {scale}")

    def s(v: int) -> int:
        return max(1, int(round(v * scale)))

    return {
        "train_scales": [s(v) for v in cfg.train_scales],
        "train_max_size": s(cfg.train_max_size),
        "crop_resize_scales": [s(v) for v in cfg.crop_resize_scales],
        "crop_size": tuple(s(v) for v in cfg.crop_size),
    }


def build_transforms(cfg: DataConfig, train: bool, scale: float = 1.0) -> v2.Compose:
    """The official DETR augmentation (train) or deterministic resize (val) for ``cfg``'s sizes.

    ``scale`` multiplies every training size (progressive resizing, ``data.late_scale``); the
    validation resize ignores it.
    """
    tail = [
        _IfTarget(_sanitize()),
        ToNormalizedTensor(),
        ToDetrTarget(),
    ]
    if not train:
        return v2.Compose([v2.Resize(cfg.val_size, max_size=cfg.val_max_size, antialias=True), *tail])
    sizes = scaled_sizes(cfg, scale)
    scales, max_size = sizes["train_scales"], sizes["train_max_size"]
    multi_scale = v2.RandomShortestSize(scales, max_size=max_size, antialias=True)
    crop_branch = v2.Compose(
        [
            v2.RandomShortestSize(sizes["crop_resize_scales"], antialias=True),
            RandomSizeCrop(*sizes["crop_size"]),
            # a crop can leave boxes empty; drop them before the next resize
            _sanitize(),
            v2.RandomShortestSize(scales, max_size=max_size, antialias=True),
        ]
    )
    head = [v2.RandomHorizontalFlip(p=0.5)] if cfg.hflip else []
    return v2.Compose([*head, v2.RandomChoice([multi_scale, crop_branch]), *tail])


def to_pil_rgb(image: Any) -> PIL.Image.Image:
    """Any image -> 8-bit RGB ``PIL.Image`` (what the val pipeline and the model expect).

    * ``PIL.Image`` of any mode: as :func:`detr_lite.data.coco.load_rgb` reads files (16-bit and
      32-bit grey rescaled by their depth, palette / RGBA / LA / CMYK converted, alpha dropped);
    * ``numpy`` array ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]`` (channels last);
    * ``torch.Tensor`` ``[H, W]`` or ``[C, H, W]`` with C in 1, 3, 4 (channels first, torchvision's layout).

    Array dtypes: ``uint8`` as is, ``uint16`` / ``int32`` scaled by /257 when above 255, ``bool``
    as 0/255, floating point read as 0..1 (values above 1.5 as 0..255). Raises ValueError otherwise.
    """
    if isinstance(image, PIL.Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 3 and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)
        elif t.dim() != 2:
            raise ValueError(f"image: a tensor must be [H, W] or [C, H, W] with C in 1, 3, 4, got {tuple(t.shape)}")
        arr = t.numpy()
    elif isinstance(image, np.ndarray):
        arr = image
    else:
        raise ValueError(
            f"image: expected a file path, PIL image, numpy array or tensor, got {type(image).__name__}"
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ValueError(f"image: an array must be [H, W] or [H, W, C] with C in 1, 3, 4, got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"image: empty image of shape {arr.shape}")
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]  # drop alpha, as PIL's RGBA -> RGB does
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        a = np.nan_to_num(arr.astype(np.float64))
        arr = np.clip(np.round(a * 255.0 if a.max(initial=0) <= 1.5 else a), 0, 255).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.uint8:
        a = arr.astype(np.float64)
        if arr.dtype in (np.uint16, np.int32, np.uint32, np.int64, np.uint64) and a.max(initial=0) > 255:
            a = a / 257.0  # 16-bit range -> 8-bit range
        arr = np.clip(np.round(a), 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ValueError(f"image: unsupported array dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr)
    return PIL.Image.fromarray(arr, mode="L" if arr.ndim == 2 else "RGB").convert("RGB")


def _pil_to_rgb(im: PIL.Image.Image) -> PIL.Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0
        elif im.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        return PIL.Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if im.mode == "P":
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")
