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
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from detr_lite.checkpoint import load_state_dict_checked, rename_prefixes
from detr_lite.config import ModelConfig, get_config
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
