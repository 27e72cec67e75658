"""Load the official model-zoo checkpoints into detr_lite models.

``load_official_checkpoint("detr-r50-e632da11.pth", arch="detr_r50")`` returns our ``DETR`` in eval mode
with the official weights. ``OFFICIAL_ARCHS`` maps each arch to two functions:

* ``config_fn() -> ModelConfig``: the architecture the checkpoint was trained with;
* ``convert_fn(state_dict) -> state_dict``: official key names -> ours (a plain rename, documented below).

DETR (facebookresearch/detr) -> detr_lite, the only renames:

=====================  =====================
official               ours
=====================  =====================
``backbone.0.body.*``  ``backbone.body.*``
``backbone.1.*``       ``position_embedding.*`` (learned encoding only; the sine one has no weights)
=====================  =====================

Every other key (``input_proj``, ``query_embed``, ``transformer.encoder/decoder.*``, ``class_embed``,
``bbox_embed.layers.N``) is identical. The Deformable DETR archs come from ``detr_lite.deformable.official``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from detr_lite.checkpoint import load_state_dict_checked, rename_prefixes
from detr_lite.config import Config, ModelConfig, TrainConfig, get_config
from detr_lite.deformable.official import DEFORMABLE_CONFIGS, convert_deformable_state_dict


@dataclass(frozen=True)
class OfficialArch:
    config_fn: Callable[[], ModelConfig]
    convert_fn: Callable[[Mapping[str, Tensor]], dict[str, Tensor]]


# ----------------------------------------------------------------------------------------------- DETR
_DETR_RENAMES = {"backbone.0.": "backbone.", "backbone.1.": "position_embedding."}


def convert_detr_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official DETR keys -> detr_lite keys (``backbone.0.`` -> ``backbone.``, ``backbone.1.`` ->
    ``position_embedding.``); ``num_batches_tracked`` entries, if any, are dropped."""
    sd = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    return rename_prefixes(sd, _DETR_RENAMES)


def _detr_config(backbone: str, dilation: bool) -> Callable[[], ModelConfig]:
    def config_fn() -> ModelConfig:
        # the ``detr-r50-coco`` preset (91 raw class ids + no-object, 100 queries, 6+6 layers, frozen
        # BN) with the zoo's backbone; every backbone weight comes from the checkpoint, so no ImageNet
        # download
        preset = get_config("detr-r50-coco").model
        return replace(preset, backbone=backbone, dilation=dilation, pretrained_backbone=False)

    return config_fn


OFFICIAL_ARCHS: dict[str, OfficialArch] = {
    "detr_r50": OfficialArch(_detr_config("resnet50", False), convert_detr_state_dict),
    "detr_r50_dc5": OfficialArch(_detr_config("resnet50", True), convert_detr_state_dict),
    "detr_r101": OfficialArch(_detr_config("resnet101", False), convert_detr_state_dict),
    "detr_r101_dc5": OfficialArch(_detr_config("resnet101", True), convert_detr_state_dict),
    **{arch: OfficialArch(fn, convert_deformable_state_dict) for arch, fn in DEFORMABLE_CONFIGS.items()},
}


def available_archs() -> list[str]:
    return sorted(OFFICIAL_ARCHS)


def _lookup(arch: str) -> OfficialArch:
    if arch not in OFFICIAL_ARCHS:
        raise ValueError(f"arch: unknown official architecture {arch!r}; choose one of {available_archs()}")
    return OFFICIAL_ARCHS[arch]


def official_config(arch: str) -> ModelConfig:
    """The ``ModelConfig`` of an official checkpoint (e.g. ``"detr_r50_dc5"``)."""
    return _lookup(arch).config_fn()


# ------------------------------------------------------------------------------------------- loading
def _read_state_dict(path_or_state_dict) -> Mapping[str, Tensor]:
    obj = path_or_state_dict
    if isinstance(obj, (str, os.PathLike)):
        if not os.path.isfile(obj):
            raise ValueError(f"checkpoint: file not found: {os.fspath(obj)}")
        # model-zoo files hold {'model': state_dict} (older ones also an argparse Namespace of args)
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(obj, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"checkpoint: expected a path, {{'model': state_dict}} or a state dict of tensors, got {type(obj).__name__}"
        )
    return obj


def _build_uninitialised(cfg: ModelConfig) -> nn.Module:
    """Build on the meta device and allocate empty CPU storage: skips the random initialisation, which
    the checkpoint overwrites anyway (seconds for a ResNet-101). Falls back to a normal build when the
    model has non-persistent buffers, whose values a state dict cannot restore."""
    from detr_lite.models import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    persistent = model.state_dict().keys()
    if any(name not in persistent for name, _ in model.named_buffers()):
        return build_model(cfg)
    return model.to_empty(device="cpu")


def load_official_checkpoint(path_or_state_dict, arch: str = "detr_r50") -> nn.Module:
    """Build the detr_lite model for ``arch`` and load an official checkpoint into it (eval mode).

    ``path_or_state_dict``: a model-zoo file path (``{'model': state_dict}``, read with
    ``torch.load(weights_only=True)``), such a dict, or a bare official state dict.
    """
    entry = _lookup(arch)
    state_dict = entry.convert_fn(_read_state_dict(path_or_state_dict))
    model = _build_uninitialised(entry.config_fn())
    source = os.fspath(path_or_state_dict) if isinstance(path_or_state_dict, (str, os.PathLike)) else "dict"
    load_state_dict_checked(model, state_dict, source=f"{source} (official {arch})")
    return model.eval()


# ------------------------------------------------------------------ the published models and recipes
# COCO val2017 box AP (%) published for the official models.
PAPER_AP: dict[str, float] = {
    "detr_r50": 42.0,
    "detr_r50_dc5": 43.3,
    "detr_r101": 43.5,
    "detr_r101_dc5": 44.9,
    "deformable_detr_r50_single_scale": 39.4,
    "deformable_detr_r50": 44.5,
    "deformable_detr_r50_refine": 46.2,
    "deformable_detr_r50_two_stage": 46.9,
}

# Where the official weights are published (model columns of the official READMEs).
OFFICIAL_CHECKPOINTS: dict[str, str] = {
    "detr_r50": "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth",
    "detr_r50_dc5": "https://dl.fbaipublicfiles.com/detr/detr-r50-dc5-f0fb7ef5.pth",
    "detr_r101": "https://dl.fbaipublicfiles.com/detr/detr-r101-2c7b67e5.pth",
    "detr_r101_dc5": "https://dl.fbaipublicfiles.com/detr/detr-r101-dc5-a2e86def.pth",
    "deformable_detr_r50_single_scale": "https://drive.google.com/file/d/1WEjQ9_FgfI5sw5OZZ4ix-OKk-IJ_-SDU/view",
    "deformable_detr_r50": "https://drive.google.com/file/d/1nDWZWHuRwtwGden77NLM9JoWe-YisJnA/view",
    "deformable_detr_r50_refine": "https://drive.google.com/file/d/1JYKyRYzUH7uo9eVfDaVCiaIGZb5YTCuI/view",
    "deformable_detr_r50_two_stage": "https://drive.google.com/file/d/15I03A7hNTpwuLNdfuEmW9_taZMNVssEp/view",
}

# ARCH -> (the COCO preset that trains it, the small CPU preset of the same variant for smoke runs)
RUN_PRESETS: dict[str, tuple[str, str]] = {
    "detr_r50": ("detr-r50-coco", "detr-shapes"),
    "deformable_detr_r50": ("deformable-detr-r50-coco", "deformable-shapes"),
    "deformable_detr_r50_refine": ("deformable-detr-r50-refine-coco", "deformable-shapes-refine"),
    "deformable_detr_r50_two_stage": ("deformable-detr-r50-two-stage-coco", "deformable-shapes-refine-two-stage"),
}


@dataclass(frozen=True)
class Recipe:
    """The official optimisation recipe of a model family: its COCO preset's ``TrainConfig`` (lr,
    backbone lr, epochs, lr drop) plus what no preset holds, the papers' total batch (images per
    step over all GPUs) and training time (V100 hours, Deformable DETR paper, Table 1)."""

    preset: str
    total_batch: int
    v100_hours: int

    @property
    def train(self) -> TrainConfig:
        return get_config(self.preset).train

    lr = property(lambda self: self.train.lr)
    lr_backbone = property(lambda self: self.train.lr_backbone)
    epochs = property(lambda self: self.train.epochs)
    lr_drop = property(lambda self: self.train.lr_drop)


RECIPES: dict[str, Recipe] = {
    "detr": Recipe("detr-r50-coco", total_batch=64, v100_hours=2000),
    "deformable_detr": Recipe("deformable-detr-r50-coco", total_batch=32, v100_hours=325),
}


def family(arch: str) -> str:
    """``'detr'`` or ``'deformable_detr'`` for an ARCH name such as ``deformable_detr_r50_refine``."""
    return "deformable_detr" if arch.startswith("deformable") else "detr"


def scaled_lrs(arch: str, total_batch: int) -> tuple[float, float]:
    """(lr, lr_backbone) scaled linearly from the recipe's total batch to ``total_batch``.

    The linear scaling rule (Goyal et al., 2017): the gradient of a k-times larger batch is an
    average over k times more images, so k-times larger steps keep the per-epoch progress about
    the same. It is a starting point, not a law: the recipes were tuned at their own batch
    size, and at very different batches a short warm-up or the gentler square-root rule can be
    more stable for AdamW.
    """
    if total_batch < 1:
        raise ValueError(f"total_batch: expected >= 1, received {total_batch}")
    r = RECIPES[family(arch)]
    k = total_batch / r.total_batch
    return r.lr * k, r.lr_backbone * k


def run_config(arch: str, smoke: bool = False) -> Config:
    """The config to train ``arch`` with: its COCO preset, or with ``smoke`` the small CPU preset of
    the same variant, adapted to a run without a pretraining step (its backbone trains whole) and too
    short for a moving average of the weights (the COCO recipes keep none anyway)."""
    if arch not in RUN_PRESETS:
        raise ValueError(f"ARCH: expected one of {sorted(RUN_PRESETS)}, received {arch!r}")
    cfg = get_config(RUN_PRESETS[arch][1 if smoke else 0])
    if smoke:
        cfg.model.train_backbone, cfg.model.frozen_bn = True, False
        cfg.train.lr_backbone = cfg.train.lr
        cfg.train.ema_decay = 0.0
    cfg.name = arch + ("-smoke" if smoke else "")
    return cfg


def write_run_config(arch: str, path: str | os.PathLike, smoke: bool = False, **train_overrides) -> Path:
    """Write :func:`run_config` (plus ``TrainConfig`` overrides such as ``lr=...``) as JSON, for
    ``python -m detr_lite.train --config FILE.json``."""
    cfg = run_config(arch, smoke=smoke)
    for k, v in train_overrides.items():
        if not hasattr(cfg.train, k):
            raise ValueError(f"write_run_config: TrainConfig has no field {k!r}")
        setattr(cfg.train, k, v)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return path
