"""Configuration dataclasses and named presets.

Nothing in detr_lite passes an argparse namespace around: every builder takes one of these
dataclasses. ``get_config(name)`` returns a fresh copy of a named preset, ``load_config`` a preset
or a ``.json``; ``Config.to_dict`` / ``Config.from_dict`` round-trip through the checkpoint's
``'config'`` entry. A run sets its command-line options with ``apply_overrides`` (a resumed run:
only the ``RESUMABLE`` ones) and checks the result once with ``validate``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class ModelConfig:
    arch: str = "detr"  # "detr" | "deformable_detr"
    num_classes: int = 91  # COCO ids used raw: max id + 1 (softmax models add one no-object logit)
    # backbone
    backbone: str = "resnet50"
    dilation: bool = False  # DC5: replace the stride of the last backbone stage used (layer4) by a dilation
    pretrained_backbone: bool = False  # ImageNet weights via torchvision's weights API
    frozen_bn: bool = True  # FrozenBatchNorm2d (pretrained); False -> trainable BatchNorm2d
    train_backbone: bool = True  # if False, the whole backbone is frozen
    # transformer
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 100
    position_embedding: str = "sine"  # "sine" | "learned"
    pe_temperature: float = 10000.0  # sine code: wavelengths up to T (official 10000)
    pre_norm: bool = False  # official DETR --pre_norm: x + f(norm(x)) layers, final encoder norm
    aux_loss: bool = True
    # deformable only
    num_feature_levels: int = 4
    enc_n_points: int = 4
    dec_n_points: int = 4
    with_box_refine: bool = False
    two_stage: bool = False
    # backbone stages feeding the pyramid (official: C3-C5); the last num_feature_levels of them are used
    backbone_layers: tuple[str, ...] = ("layer2", "layer3", "layer4")
    # matcher costs
    set_cost_class: float = 1.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    # loss weights
    cls_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    eos_coef: float = 0.1  # softmax models: weight of the no-object class
    focal_alpha: float = 0.25  # focal models (Deformable DETR)

    @property
    def uses_focal(self) -> bool:
        return self.arch == "deformable_detr"


@dataclass
class DataConfig:
    root: str = "data/shapes"  # COCO layout: {train,val}2017/ + annotations/instances_{train,val}2017.json
    train_split: str = "train2017"
    val_split: str = "val2017"
    # official multi-scale augmentation (short side choices, max long side); crop branch sizes
    train_scales: tuple[int, ...] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    train_max_size: int = 1333
    crop_resize_scales: tuple[int, ...] = (400, 500, 600)
    crop_size: tuple[int, int] = (384, 600)
    val_size: int = 800
    val_max_size: int = 1333
    hflip: bool = True
    num_workers: int = 2
    # Progressive resizing: once ``late_scale_after`` epochs are done, every training size above
    # (train_scales, train_max_size, crop_resize_scales, crop_size) is multiplied by ``late_scale``
    # (1.0: off). Cheap small images for most of the run, the evaluation size for its end.
    late_scale: float = 1.0
    late_scale_after: int = 0

    def scale_at(self, epoch: int) -> float:
        """Multiplier of the training sizes in 0-based ``epoch`` (``late_scale`` from epoch ``late_scale_after``)."""
        return float(self.late_scale) if epoch >= self.late_scale_after else 1.0


@dataclass
class TrainConfig:
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    lr_linear_proj_mult: float = 0.1  # deformable: sampling_offsets / reference_points
    weight_decay: float = 1e-4
    epochs: int = 500
    lr_drop: int = 400
    batch_size: int = 2  # per process
    clip_max_norm: float = 0.1
    seed: int = 42
    amp: bool = False  # CUDA only
    eval_every: int = 1
    # images per validation batch (0: batch_size); batching pads images, which changes what a
    # model sees near the padding
    eval_batch_size: int = 0
    # 0: off (official DETR). d in (0, 1): also keep an exponential moving average of the weights,
    # ema = d * ema + (1 - d) * weights after every optimiser step (horizon ~1 / (1 - d) steps);
    # validation, the checkpoint's "model" and everything that loads it use the average, and the
    # raw training weights ride along as "model_train" for --resume (not part of the official recipe)
    ema_decay: float = 0.0
    # 0: a checkpoint after every epoch only. N > 0: also after every N iterations of an epoch, so
    # a killed run loses at most N steps (--resume continues mid-epoch with the same batches)
    checkpoint_every: int = 0

    @property
    def val_batch_size(self) -> int:
        """Images per validation batch: ``eval_batch_size``, or ``batch_size`` if that is 0."""
        return self.eval_batch_size or self.batch_size


@dataclass
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """The inverse of :meth:`to_dict`; configs written by earlier versions load too (``RETIRED``)."""

        def build(dc, section, values):
            values = dict(values)
            for (where, key), (inert, instead) in RETIRED.items():
                if where == section and key in values:
                    value = values.pop(key)
                    if inert is not None and value != inert:
                        raise ValueError(f"config: {section}.{key} {value!r} was removed; {instead}")
            known = {f.name for f in fields(dc)}
            unknown = set(values) - known
            if unknown:
                raise ValueError(f"config for {dc.__name__}: unknown keys {sorted(unknown)}")
            kw = {}
            for f in fields(dc):
                if f.name in values:
                    v = values[f.name]
                    kw[f.name] = tuple(v) if isinstance(v, list) else v
            return dc(**kw)

        return cls(
            name=d.get("name", "custom"),
            model=build(ModelConfig, "model", d.get("model", {})),
            data=build(DataConfig, "data", d.get("data", {})),
            train=build(TrainConfig, "train", d.get("train", {})),
        )


# Keys that configs of earlier versions (and the checkpoints holding them) carry: (section, key) ->
# (the value that did nothing, or None if no value did anything; what to do instead). Such a key
# is dropped when it holds that value; any other value is a one-line error.
RETIRED: dict[tuple[str, str], tuple[Any, str]] = {
    ("train", "cached_views"): (0, "train without it (cached backbone features served no preset)"),
    ("train", "log_every"): (None, "every iteration is logged"),
}


def _detr_r50_coco() -> Config:
    return Config(
        name="detr-r50-coco",
        model=ModelConfig(pretrained_backbone=True),
        data=DataConfig(root="coco"),
        train=TrainConfig(batch_size=4, epochs=500, lr_drop=400),
    )


def _deformable_r50_coco() -> Config:
    """Official Deformable DETR (R50, multi-scale, 4 levels x 4 points): 44.5 AP after 50 epochs.

    Official total batch 32 = 8 GPUs x 4 images; with fewer GPUs keep 4 per process and expect
    slightly different numbers. ``with_box_refine=True`` (+ ``two_stage=True``) gives the 46.2 (46.9)
    variants; see ``deformable-detr-r50-refine-coco`` / ``deformable-detr-r50-two-stage-coco``.
    """
    return Config(
        name="deformable-detr-r50-coco",
        model=ModelConfig(
            arch="deformable_detr",
            pretrained_backbone=True,
            hidden_dim=256,
            nheads=8,
            enc_layers=6,
            dec_layers=6,
            dim_feedforward=1024,
            dropout=0.1,
            num_queries=300,
            num_feature_levels=4,
            enc_n_points=4,
            dec_n_points=4,
            set_cost_class=2.0,
            set_cost_bbox=5.0,
            set_cost_giou=2.0,
            cls_loss_coef=2.0,
            bbox_loss_coef=5.0,
            giou_loss_coef=2.0,
            focal_alpha=0.25,
        ),
        data=DataConfig(root="coco"),
        train=TrainConfig(
            lr=2e-4,
            lr_backbone=2e-5,
            lr_linear_proj_mult=0.1,
            weight_decay=1e-4,
            batch_size=4,
            epochs=50,
            lr_drop=40,
            clip_max_norm=0.1,
        ),
    )


def _deformable_r50_refine_coco() -> Config:
    cfg = _deformable_r50_coco()
    cfg.name = "deformable-detr-r50-refine-coco"
    cfg.model.with_box_refine = True
    return cfg


def _deformable_r50_two_stage_coco() -> Config:
    # official "two-stage Deformable DETR" (46.9 AP) is refinement + two-stage
    cfg = _deformable_r50_refine_coco()
    cfg.name = "deformable-detr-r50-two-stage-coco"
    cfg.model.two_stage = True
    return cfg


# The bundled synthetic data at ~0.75x its size (short side 96-128), cheap enough for a 2-core CPU.
_SHAPES_SMALL_IMAGES = DataConfig(
    root="data/shapes",
    train_scales=(96, 104, 112, 120, 128),
    train_max_size=192,
    crop_resize_scales=(96, 112, 128),
    crop_size=(80, 128),
    val_size=112,
    val_max_size=192,
    num_workers=0,
)


def _detr_shapes() -> Config:
    return Config(
        name="detr-shapes",
        model=ModelConfig(
            num_classes=6,
            backbone="resnet18",
            # a pretrained backbone (python -m detr_lite.pretrain, the toy stand-in for ImageNet
            # weights) with frozen BatchNorm, conv1 and layer1 as in official DETR; layer2-3 fine-tune,
            # which learns faster per epoch than a frozen backbone (the card's table of recipe choices:
            # data/checkpoints/detr_shapes.md)
            frozen_bn=True,
            train_backbone=True,
            hidden_dim=128,
            nheads=8,
            enc_layers=3,
            dec_layers=3,
            dim_feedforward=512,
            dropout=0.0,
            # 10 slots for at most 6 objects per image: each query is matched to an object (and so
            # trained on one) twice as often as with 20 (the card's table)
            num_queries=10,
            # official DETR's --pre_norm variant, and sine wavelengths up to 20, not 10000 (on a 7 x 10
            # grid most 10000-temperature channels are nearly constant): both shorten the plateau of
            # constant predictions (the card's table)
            pre_norm=True,
            pe_temperature=20.0,
            # ResNet-18 up to layer3 (C4: 256 channels, stride 16): finer cells for the small images,
            # and without layer4 (8.4 M of 11.2 M parameters) the fp16 checkpoint fits in 12 MB
            backbone_layers=("layer3",),
        ),
        # progressive resizing: small images (cheaper per epoch) for 70 epochs, then x1.25 (120-160 px,
        # they show small shapes better) for the last 20; evaluated at the largest training scale,
        # as the official recipe evaluates at 800 (the card's table)
        data=dataclasses.replace(
            _SHAPES_SMALL_IMAGES, val_size=160, val_max_size=240, late_scale=1.25, late_scale_after=70
        ),
        # backbone lr = lr / 2, not the official lr / 10: pretext features need more reshaping for
        # detection than ImageNet ones; no lr drop (lr_drop = epochs) but a moving average of the
        # weights (~500-step window), which is what is evaluated and saved (the card's table)
        train=TrainConfig(
            lr=2e-4, lr_backbone=1e-4, epochs=90, lr_drop=90, batch_size=4, eval_every=5, ema_decay=0.998
        ),
    )


def _deformable_shapes() -> Config:
    """Toy Deformable DETR for the bundled data: the ``detr-shapes`` recipe, made deformable.

    It shares everything with ``detr-shapes`` that is not Deformable DETR itself: the pretrained toy
    backbone (``python -m detr_lite.pretrain``) with frozen BatchNorm and layer2-3 fine-tuned, the
    width (d=128), depth (3+3), data, batch, learning rates and moving average, and the evaluation
    size (short side 160). What makes it Deformable DETR: a 4-level pyramid read by multi-scale
    deformable attention, focal loss (class cost / weight 2), 30 queries with top-100
    post-processing, and a 30-epoch schedule (a third of the DETR's 90), evaluated every epoch.
    The pyramid is ResNet-18 C3, C4 (strides 8, 16) + two stride-2 convolutions (strides 32, 64)
    instead of the official C3-C5: the toy images are ~112-160 px, where C5 is only 4-5 cells
    across anyway, and without ``layer4`` the model is small and fast.
    """
    detr = _detr_shapes()
    return Config(
        name="deformable-shapes",
        model=ModelConfig(
            arch="deformable_detr",
            num_classes=detr.model.num_classes,
            backbone="resnet18",
            frozen_bn=True,
            train_backbone=True,
            hidden_dim=128,
            nheads=8,
            enc_layers=3,
            dec_layers=3,
            dim_feedforward=512,
            dropout=0.0,
            num_queries=30,
            num_feature_levels=4,
            backbone_layers=("layer2", "layer3"),
            enc_n_points=4,
            dec_n_points=4,
            set_cost_class=2.0,
            cls_loss_coef=2.0,
        ),
        # the DETR's data, training sizes (short side 96-128) and evaluation size (160); no
        # progressive resizing, so its epochs match the first 30 of the DETR's 90 (notebook 08)
        data=dataclasses.replace(detr.data, late_scale=1.0, late_scale_after=0),
        train=TrainConfig(
            lr=2e-4,
            lr_backbone=1e-4,
            epochs=30,
            lr_drop=30,
            batch_size=4,
            eval_every=1,
            ema_decay=0.998,
            lr_linear_proj_mult=0.1,
        ),
    )


def _deformable_shapes_refine() -> Config:
    """``deformable-shapes`` + iterative bounding-box refinement (one box head per decoder layer)."""
    cfg = _deformable_shapes()
    cfg.name = "deformable-shapes-refine"
    cfg.model.with_box_refine = True
    return cfg


def _deformable_shapes_refine_two_stage() -> Config:
    """``deformable-shapes-refine`` + two-stage: the decoder's queries are the encoder's top proposals."""
    cfg = _deformable_shapes_refine()
    cfg.name = "deformable-shapes-refine-two-stage"
    cfg.model.two_stage = True
    return cfg


PRESETS = {
    "detr-shapes": _detr_shapes,
    "detr-r50-coco": _detr_r50_coco,
    "deformable-shapes": _deformable_shapes,
    "deformable-shapes-refine": _deformable_shapes_refine,
    "deformable-shapes-refine-two-stage": _deformable_shapes_refine_two_stage,
    "deformable-detr-r50-coco": _deformable_r50_coco,
    "deformable-detr-r50-refine-coco": _deformable_r50_refine_coco,
    "deformable-detr-r50-two-stage-coco": _deformable_r50_two_stage_coco,
}


def get_config(name: str) -> Config:
    """A fresh copy of the named preset (see ``PRESETS``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def load_config(name: str) -> Config:
    """A preset by name, or a config written as JSON (``Config.to_dict``) by its ``.json`` path."""
    if not name.endswith(".json"):
        return get_config(name)
    if not Path(name).is_file():
        raise ValueError(f"--config {name}: file not found")
    return Config.from_dict(json.loads(Path(name).read_text()))


# What a resumed run may change: how long it runs and how it is watched, never how it has learned
# so far (the lr drop only while neither the old nor the new one has happened: then the resumed run
# equals a fresh run with the new drop).
RESUMABLE = ("train.epochs", "train.lr_drop", "train.eval_every", "train.checkpoint_every", "data.num_workers",
             "data.root")  # fmt: skip


def _flag(key: str) -> str:
    """The command-line option of a config field (``train.lr_drop`` -> ``--lr-drop``)."""
    return "--data" if key == "data.root" else "--" + key.split(".")[1].replace("_", "-")


def apply_overrides(cfg: Config, overrides: dict[str, Any], epochs_done: int | None = None) -> Config:
    """Set ``{"train.lr": 2e-4, ...}`` on ``cfg`` (``None`` values: not given, skipped).

    ``epochs_done``: ``cfg`` is a resumed run's, which has finished that many epochs; it keeps every
    setting outside ``RESUMABLE`` (passing one with its current value is fine).
    """
    for key, value in overrides.items():
        if value is None:
            continue
        section, name = key.split(".")
        obj = getattr(cfg, section)
        old = getattr(obj, name)
        if epochs_done is not None and value != old:
            if key not in RESUMABLE:
                raise ValueError(
                    f"{_flag(key)} {value} with --resume: the run was trained with {key} {old}; a resumed run "
                    f"may change only {', '.join(_flag(k) for k in RESUMABLE)}"
                )
            if key == "train.lr_drop" and min(value, old) <= epochs_done:
                raise ValueError(
                    f"--lr-drop {value} with --resume: the run has finished {epochs_done} epochs with lr_drop "
                    f"{old}; both drops must come after epoch {epochs_done}"
                )
        setattr(obj, name, value)
    return cfg


def validate(cfg: Config) -> None:
    """One-line ``ValueError`` for a setting no run can use, before anything heavy is built."""
    t, d = cfg.train, cfg.data

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for name in ("epochs", "batch_size", "eval_every"):
        if not is_int(getattr(t, name)) or getattr(t, name) < 1:
            raise ValueError(f"config {cfg.name}: train.{name} must be a positive integer, got {getattr(t, name)!r}")
    if not is_int(t.checkpoint_every) or t.checkpoint_every < 0:
        raise ValueError(f"config {cfg.name}: train.checkpoint_every must be an integer >= 0, got {t.checkpoint_every!r}")
    if isinstance(d.late_scale, bool) or not isinstance(d.late_scale, (int, float)) or not d.late_scale > 0:
        raise ValueError(f"config {cfg.name}: data.late_scale must be a positive number, got {d.late_scale!r}")
    if not is_int(d.late_scale_after) or d.late_scale_after < 0:
        raise ValueError(f"config {cfg.name}: data.late_scale_after must be an integer >= 0, got {d.late_scale_after!r}")
    e = t.ema_decay
    if isinstance(e, bool) or not isinstance(e, (int, float)) or not (e == 0 or 0 < e < 1):
        raise ValueError(f"config {cfg.name}: train.ema_decay must be 0 (off) or in (0, 1), got {e!r}")
