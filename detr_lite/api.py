"""One-call inference: ``Detector.from_checkpoint(...)``, ``.predict(images)``, ``.explain(image)``.

::

    from detr_lite import Detector

    det = Detector.from_checkpoint("data/checkpoints/detr_shapes.pt")   # or "detr_shapes"
    result = det.predict("data/shapes/val2017/000001.png")             # one image -> one Detections
    result.boxes, result.scores, result.labels, result.names           # absolute xyxy pixels
    results = det.predict([path, pil_image, numpy_array, tensor])      # a list -> a list
    why = det.explain(path)   # per detection: DETR's cross-attention map / Deformable's sampling points

``from_checkpoint`` takes a detr_lite checkpoint (the shipped ``data/checkpoints/*.pt``, a training run's
``checkpoint.pt``; its config rebuilds the model and gives the val transform), the short names of the
shipped ones (``"detr_shapes"``, ``"deformable_shapes"``), or an official model-zoo file of DETR or
Deformable DETR (``detr-r50-e632da11.pth``, ``r50_deformable_detr-checkpoint.pth``, ...): its arch is
read from the weights' keys (``arch=`` overrides; DC5 is taken from the file name, the weights alone do
not show it) and it is evaluated at the official val size (short side 800, long side at most 1333).

Images may be file paths, PIL images, numpy arrays (``[H, W]`` or ``[H, W, C]``) or tensors (``[C, H, W]``
or ``[H, W]``), any size; grey, RGBA, 16-bit and float images are converted to 8-bit RGB
(:func:`detr_lite.data.transforms.to_pil_rgb`). Each image is resized like the val split (the
checkpoint's ``data.val_size`` / ``val_max_size``) and run without padding; boxes come back in the
pixels of the image as given. Images of the same resized size are batched (``batch_size``).

Post-processing is the evaluation's: DETR keeps one (best) class per query (softmax without the
no-object column); Deformable DETR the top-100 (query, class) pairs of the sigmoid scores. Then
``threshold`` filters and the detections are sorted by score.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {
    "detr_shapes": REPO_ROOT / "data" / "checkpoints" / "detr_shapes.pt",
    "deformable_shapes": REPO_ROOT / "data" / "checkpoints" / "deformable_shapes.pt",
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# COCO 2017 names by category id (ids 1..90 with gaps: "N/A"), as the official DETR colab lists them.
COCO_CLASSES: tuple[str, ...] = (
    "N/A", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A",
    "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "N/A",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


# ------------------------------------------------------------------------------------------ results
@dataclass
class Detections:
    """The detections of one image, best first. ``boxes`` ``[N, 4]`` absolute ``(x0, y0, x1, y1)`` pixels
    of the image as given; ``scores`` ``[N]``; ``labels`` ``[N]`` category ids; ``names`` their class names;
    ``image_size`` ``(h, w)``; ``queries`` ``[N]`` the decoder query of each detection; ``source`` the
    file path when the image came from one."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    names: list[str]
    image_size: tuple[int, int]
    queries: Tensor
    source: str | None = None

    def __len__(self) -> int:
        return int(self.scores.numel())

    def to_coco(self, image_id: int) -> list[dict[str, Any]]:
        """COCO results format: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` per detection."""
        out = []
        for (x0, y0, x1, y1), s, c in zip(self.boxes.tolist(), self.scores.tolist(), self.labels.tolist()):
            xywh = [round(v, 3) for v in (x0, y0, x1 - x0, y1 - y0)]
            out.append({"image_id": int(image_id), "category_id": int(c), "bbox": xywh, "score": round(float(s), 5)})
        return out

    def __repr__(self) -> str:
        shown = ", ".join(f"{n} {float(s):.2f}" for n, s in zip(self.names[:5], self.scores[:5]))
        more = f", ... (+{len(self) - 5})" if len(self) > 5 else ""
        return f"Detections({len(self)} in {self.image_size[1]}x{self.image_size[0]}: [{shown}{more}])"


@dataclass
class Explanation:
    """What each detection of :meth:`Detector.explain` looked at, in pixels of the image as given.

    DETR (``kind == "attention"``): ``attention[i]`` ``[h, w]`` is the last decoder layer's
    cross-attention of detection ``i``'s query over the encoder's feature grid (heads averaged, sums to
    1); cell ``(r, c)`` covers image pixels ``[c * cell[0], (c + 1) * cell[0]) x [r * cell[1], ...)``,
    i.e. the whole grid spans ``extent = (0, w * cell[0], h * cell[1], 0)`` (matplotlib's ``imshow``
    order: left, right, bottom, top; the last cells may run past the image, as the backbone's do).

    Deformable DETR (``kind == "sampling"``): ``locations[i]`` ``[M, L, P, 2]`` are the (x, y) image
    pixels where head ``m`` of the last decoder layer's cross-attention samples level ``l`` (point
    ``p``), ``weights[i]`` ``[M, L, P]`` their attention weights (softmax over ``L * P`` per head), and
    ``references[i]`` the query's reference point (x, y). Deformable attention samples every level
    in normalised coordinates, (0, 0) to (1, 1) spanning the (unpadded) image, the frame its boxes use
    too; a location ``(u, v)`` is drawn at pixel ``(u * W, v * H)`` of the image as given. (A coarse
    level's map may reach a little past the image, as its ``ceil(W / stride)`` cells do.)
    """

    kind: str
    detections: Detections
    attention: list[Tensor] = field(default_factory=list)
    cell: tuple[float, float] | None = None
    extent: tuple[float, float, float, float] | None = None
    locations: list[Tensor] = field(default_factory=list)
    weights: list[Tensor] = field(default_factory=list)
    references: list[tuple[float, float]] = field(default_factory=list)

    def upsampled_attention(self, i: int) -> np.ndarray:
        """Detection ``i``'s attention map resampled to the image's pixels ``[H, W]`` (bilinear over cells)."""
        if self.kind != "attention":
            raise ValueError("upsampled_attention: only DETR explanations (kind 'attention') have maps")
        a = self.attention[i]
        h, w = self.detections.image_size
        gh, gw = a.shape
        full = F.interpolate(a[None, None].float(), size=(round(gh * self.cell[1]), round(gw * self.cell[0])),
                             mode="bilinear", align_corners=False)[0, 0]  # fmt: skip
        return full[:h, :w].numpy()


# ----------------------------------------------------------------------------------- official files
def infer_official_arch(state_dict: dict[str, Tensor], filename: str | None = None) -> str:
    """The ``detr_lite.official`` arch of an official state dict, from its keys (and DC5 from ``filename``).

    Deformable DETR: ``transformer.level_embed`` present; one ``input_proj`` level = single scale;
    ``transformer.enc_output`` = two-stage; the decoder's own box heads = iterative refinement.
    DETR: ResNet-101 when ``layer3`` has 23 blocks; DC5 (same weights as the plain model) only when the
    file name says ``dc5``.
    """
    keys = set(state_dict)
    if "transformer.level_embed" in keys:
        if "transformer.enc_output.weight" in keys:
            return "deformable_detr_r50_two_stage"
        if any(k.startswith("transformer.decoder.bbox_embed.") for k in keys):
            return "deformable_detr_r50_refine"
        levels = {k.split(".")[1] for k in keys if k.startswith("input_proj.")}
        return "deformable_detr_r50_single_scale" if len(levels) == 1 else "deformable_detr_r50"
    if not any(k.startswith("transformer.decoder.") for k in keys) or "query_embed.weight" not in keys:
        raise ValueError(
            "checkpoint: neither a detr_lite checkpoint (no 'config') nor an official DETR / Deformable DETR "
            f"state dict (first keys: {sorted(keys)[:4]})"
        )
    depth = "r101" if any(k.startswith("backbone.0.body.layer3.22.") for k in keys) else "r50"
    dc5 = filename is not None and "dc5" in os.path.basename(filename).lower()
    return f"detr_{depth}{'_dc5' if dc5 else ''}"


def _class_names_from_data(root: str, splits: Sequence[str]) -> dict[int, str] | None:
    for base in (Path(root), REPO_ROOT / root):
        for split in splits:
            path = base / "annotations" / f"instances_{split}.json"
            if path.is_file():
                try:
                    cats = json.loads(path.read_text()).get("categories", [])
                    return {int(c["id"]): str(c["name"]) for c in cats}
                except (OSError, ValueError, KeyError, TypeError):
                    return None
    return None


# ------------------------------------------------------------------------------------------ Detector
class Detector:
    """A DETR or Deformable DETR ready for inference on any image (see the module docstring).

    Build it with :meth:`from_checkpoint`, or directly from a model in eval mode, its ``Config`` (the
    val sizes and arch come from it) and optional ``class_names`` (category id -> name).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg,
        class_names: dict[int, str] | Sequence[str] | None = None,
        device: str | torch.device | None = None,
        source: str | None = None,
    ):
        from detr_lite.data.transforms import build_transforms

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.cfg = cfg
        self.arch = cfg.model.arch
        self.num_classes = cfg.model.num_classes
        self.source = source
        self.transform = build_transforms(cfg.data, train=False)
        if class_names is None:
            names: dict[int, str] = {}
        elif isinstance(class_names, dict):
            names = {int(k): str(v) for k, v in class_names.items()}
        else:
            names = dict(enumerate(map(str, class_names)))
        self.class_names = names

    def __repr__(self) -> str:
        return (
            f"Detector({self.arch}, {self.num_classes} class ids, val size {self.cfg.data.val_size}/"
            f"{self.cfg.data.val_max_size}, {self.device}, from {self.source})"
        )

    # -------------------------------------------------------------------------------- construction
    @classmethod
    def from_checkpoint(
        cls,
        path_or_official_file: str | os.PathLike,
        arch: str | None = None,
        device: str | torch.device | None = None,
        class_names: dict[int, str] | Sequence[str] | None = None,
        val_size: int | None = None,
        val_max_size: int | None = None,
    ) -> Detector:
        """Load a detr_lite checkpoint, a shipped one by name, or an official DETR / Deformable DETR file.

        ``arch`` (official files only): an arch of ``detr_lite.official.available_archs()``; default:
        inferred (:func:`infer_official_arch`). ``class_names``: default from the checkpoint's data
        folder (its ``annotations/instances_*.json`` categories), COCO's for 91-id models, else
        ``"class N"``. ``val_size`` / ``val_max_size`` override the resize.
        """
        from detr_lite.checkpoint import load_state_dict_checked
        from detr_lite.config import Config, DataConfig
        from detr_lite.models import build_model
        from detr_lite.official import _read_state_dict, load_official_checkpoint, official_config

        key = os.fspath(path_or_official_file)
        path = SHIPPED.get(key, Path(key))
        if not Path(path).is_file():
            raise ValueError(
                f"checkpoint {key}: file not found (shipped names: {', '.join(SHIPPED)})"
            )
        obj, official = None, False
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # an official file with an argparse Namespace, or not a torch file at all
            obj = None
        if isinstance(obj, dict) and "config" in obj and "model" in obj:
            if arch is not None:
                raise ValueError(f"checkpoint {key}: a detr_lite checkpoint carries its config; drop arch={arch!r}")
            cfg = Config.from_dict(obj["config"])
            cfg.model.pretrained_backbone = False  # every weight comes from the checkpoint
            model = build_model(cfg.model)
            load_state_dict_checked(model, obj["model"], source=str(path))
        else:
            official = True
            try:
                state = _read_state_dict(obj if obj is not None else str(path))
            except ValueError:
                raise
            except Exception as e:  # truncated file, not a torch file, pickled code...
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ValueError(f"checkpoint {key}: cannot be loaded with weights_only=True ({first})") from None
            arch = arch or infer_official_arch(dict(state), filename=str(path))
            model = load_official_checkpoint(state, arch=arch)
            cfg = Config(name=arch, model=official_config(arch), data=DataConfig())
        if val_size is not None:
            cfg.data.val_size = int(val_size)
        if val_max_size is not None:
            cfg.data.val_max_size = int(val_max_size)
        if class_names is None and not official:
            class_names = _class_names_from_data(cfg.data.root, (cfg.data.val_split, cfg.data.train_split))
            if class_names and max(class_names) >= cfg.model.num_classes:  # another dataset's names
                class_names = None
        if class_names is None and cfg.model.num_classes == len(COCO_CLASSES):
            class_names = dict(enumerate(COCO_CLASSES))
        return cls(model.eval(), cfg, class_names=class_names, device=device, source=str(path))

    def name_of(self, label: int) -> str:
        return self.class_names.get(int(label), f"class {int(label)}")

    # ---------------------------------------------------------------------------------- inputs
    def load_image(self, image: Any):
        """An input image -> ``(8-bit RGB PIL image, source path or None)``; ValueError if unreadable."""
        from detr_lite.data.coco import load_rgb
        from detr_lite.data.transforms import to_pil_rgb

        if isinstance(image, (str, os.PathLike)):
            p = Path(image)
            if not p.is_file():
                raise ValueError(f"{p}: no such file")
            return load_rgb(p), str(p)
        return to_pil_rgb(image), None

    def preprocess(self, image: Any) -> tuple[Tensor, tuple[int, int], str | None]:
        """``(normalised [3, h, w] tensor at the val size, (H, W) of the image as given, source)``."""
        pil, source = self.load_image(image)
        return self.transform(pil), (pil.height, pil.width), source

    # ------------------------------------------------------------------------------- inference
    @torch.inference_mode()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """The raw model outputs (``pred_logits``, ``pred_boxes``) of a batch ``[B, 3, h, w]`` (no padding)."""
        out = self.model(images.to(self.device))
        return {"pred_logits": out["pred_logits"].float(), "pred_boxes": out["pred_boxes"].float()}

    def postprocess(
        self, logits: Tensor, boxes: Tensor, size: tuple[int, int], threshold: float, source: str | None = None
    ) -> Detections:
        """One image's ``pred_logits [Q, K]`` and ``pred_boxes [Q, 4]`` -> :class:`Detections` (see module doc)."""
        logits, boxes = logits.float().cpu(), boxes.float().cpu()
        if self.arch == "detr":
            scores, labels = logits.softmax(-1)[:, :-1].max(-1)
            queries = torch.arange(logits.shape[0])
        else:
            q, k = logits.shape
            prob = logits.sigmoid().reshape(-1)
            scores, flat = prob.topk(min(100, q * k))
            queries, labels = torch.div(flat, k, rounding_mode="floor"), flat % k
        h, w = size
        xyxy = box_convert(boxes[queries], "cxcywh", "xyxy") * torch.tensor([w, h, w, h], dtype=torch.float32)
        keep = scores >= threshold
        order = scores[keep].argsort(descending=True, stable=True)
        scores, labels, xyxy, queries = (t[keep][order] for t in (scores, labels, xyxy, queries))
        return Detections(
            boxes=xyxy,
            scores=scores,
            labels=labels,
            names=[self.name_of(c) for c in labels.tolist()],
            image_size=(int(h), int(w)),
            queries=queries,
            source=source,
        )

    def predict(self, images: Any, threshold: float = 0.5, batch_size: int = 8):
        """Detections of one image (-> :class:`Detections`) or of a list of images (-> list of them).

        Consecutive images whose resized sizes agree run as one batch of up to ``batch_size`` (no
        padding, so a result does not depend on its neighbours beyond float round-off). An unreadable
        image raises ValueError naming it (the CLI reports it and goes on with the others).
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        prepared = [self.preprocess(im) for im in items]
        results: list[Detections] = []
        i = 0
        while i < len(prepared):
            j = i + 1
            while j < len(prepared) and j - i < batch_size and prepared[j][0].shape == prepared[i][0].shape:
                j += 1
            out = self.forward(torch.stack([p[0] for p in prepared[i:j]]))
            for b, (_, size, source) in enumerate(prepared[i:j]):
                results.append(self.postprocess(out["pred_logits"][b], out["pred_boxes"][b], size, threshold, source))
            i = j
        return results[0] if single else results

    @torch.inference_mode()
    def explain(self, image: Any, threshold: float = 0.5) -> Explanation:
        """:meth:`predict` of one image plus, per detection, where its query looked (:class:`Explanation`)."""
        x, size, source = self.preprocess(image)
        x = x[None].to(self.device)
        rh, rw = x.shape[-2:]
        h, w = size
        if self.arch == "detr":
            from detr_lite.transformer import capture_attention

            with capture_attention(self.model, layers=["transformer.decoder"]) as attn:
                out = self.model(x)
            det = self.postprocess(out["pred_logits"][0], out["pred_boxes"][0], size, threshold, source)
            cross = [k for k in attn if k.endswith("multihead_attn")]
            if not cross:
                raise ValueError(f"explain: no decoder cross-attention captured (got {list(attn)[:4]})")
            weights = attn[cross[-1]][0].float().mean(0).cpu()  # [Q, hw], heads averaged
            stride = int(self.model.backbone.strides[-1])
            gh, gw = -(-rh // stride), -(-rw // stride)
            if gh * gw != weights.shape[-1]:
                raise ValueError(f"explain: {weights.shape[-1]} attention keys do not fit a {gh}x{gw} grid")
            cell = (stride * w / rw, stride * h / rh)
            maps = [weights[q].reshape(gh, gw) for q in det.queries.tolist()]
            return Explanation("attention", det, attention=maps, cell=cell, extent=(0.0, gw * cell[0], gh * cell[1], 0.0))

        from detr_lite.deformable.msda import MSDeformAttn

        layer = self.model.transformer.decoder.layers[-1].cross_attn
        assert isinstance(layer, MSDeformAttn)
        seen: dict[str, Any] = {}
        handle = layer.register_forward_hook(
            lambda mod, args, kwargs, output: seen.update(args=args, kwargs=kwargs), with_kwargs=True
        )
        try:
            out = self.model(x)
        finally:
            handle.remove()
        det = self.postprocess(out["pred_logits"][0], out["pred_boxes"][0], size, threshold, source)
        _, (loc, wts) = layer(*seen["args"], **{**seen["kwargs"], "return_sampling": True})
        # normalised (x, y) -> pixels: the unit square is the image, as for the boxes (no padding here)
        scale = torch.tensor([float(w), float(h)])
        loc, wts = loc[0].float().cpu(), wts[0].float().cpu()  # [Q, M, L, P, 2], [Q, M, L, P]
        ref = seen["args"][1][0].float().cpu()  # [Q, L, 2 or 4]: level 0's reference point (x, y)
        qs = det.queries.tolist()
        return Explanation(
            "sampling",
            det,
            locations=[loc[q] * scale for q in qs],
            weights=[wts[q] for q in qs],
            references=[(float(ref[q, 0, 0]) * w, float(ref[q, 0, 1]) * h) for q in qs],
        )


def list_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files given, plus the image files (by extension, sorted) directly inside any folder given."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS))
        else:
            out.append(p)
    return out
