"""Load the official model-zoo checkpoints into detr_lite models.

``load_official_checkpoint("detr-r50-e632da11.pth", arch="detr_r50")`` returns our ``DETR`` in eval mode
with the official weights. Each arch is registered with two functions:

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
``bbox_embed.layers.N``) is identical. Other families add themselves with ``register_converter``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from detr_lite.config import ModelConfig, get_config


@dataclass(frozen=True)
class OfficialArch:
    config_fn: Callable[[], ModelConfig]
    convert_fn: Callable[[Mapping[str, Tensor]], dict[str, Tensor]]
    build_fn: Callable[[ModelConfig], nn.Module] | None = None  # default: detr_lite.models.build_model


_REGISTRY: dict[str, OfficialArch] = {}


def register_converter(
    arch: str,
    config_fn: Callable[[], ModelConfig],
    convert_fn: Callable[[Mapping[str, Tensor]], dict[str, Tensor]],
    build_fn: Callable[[ModelConfig], nn.Module] | None = None,
) -> None:
    """Make ``arch`` loadable by ``load_official_checkpoint`` (re-registering replaces the entry)."""
    _REGISTRY[arch] = OfficialArch(config_fn, convert_fn, build_fn)


def available_archs() -> list[str]:
    return sorted(_REGISTRY)


def _lookup(arch: str) -> OfficialArch:
    if arch not in _REGISTRY:
        raise ValueError(f"arch: unknown official architecture {arch!r}; choose one of {available_archs()}")
    return _REGISTRY[arch]


def official_config(arch: str) -> ModelConfig:
    """The ``ModelConfig`` of an official checkpoint (e.g. ``"detr_r50_dc5"``)."""
    return _lookup(arch).config_fn()


def rename_prefixes(state_dict: Mapping[str, Tensor], renames: Mapping[str, str]) -> dict[str, Tensor]:
    """Replace the first matching prefix of every key (``renames`` maps old prefix -> new prefix)."""
    out = {}
    for key, value in state_dict.items():
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------- DETR
_DETR_RENAMES = {"backbone.0.": "backbone.", "backbone.1.": "position_embedding."}


def convert_detr_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official DETR keys -> detr_lite keys (``backbone.0.`` -> ``backbone.``, ``backbone.1.`` ->
    ``position_embedding.``); ``num_batches_tracked`` entries, if any, are dropped."""
    sd = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    return rename_prefixes(sd, _DETR_RENAMES)


def _detr_config(backbone: str, dilation: bool) -> Callable[[], ModelConfig]:
    def config_fn() -> ModelConfig:
        # The official COCO models are the ``detr-r50-coco`` preset (91 raw class ids + no-object,
        # 100 queries, 6+6 layers, frozen BN) with the zoo's backbone; every backbone weight comes
        # from the checkpoint, so no ImageNet download.
        preset = get_config("detr-r50-coco").model
        return replace(preset, backbone=backbone, dilation=dilation, pretrained_backbone=False)

    return config_fn


for _arch, _backbone, _dilation in [
    ("detr_r50", "resnet50", False),
    ("detr_r50_dc5", "resnet50", True),
    ("detr_r101", "resnet101", False),
    ("detr_r101_dc5", "resnet101", True),
]:
    register_converter(_arch, _detr_config(_backbone, _dilation), convert_detr_state_dict)


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


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], what: str = "checkpoint") -> None:
    """Raise one ``ValueError`` line listing the first missing / unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            problems.append(f"{len(items)} {label} (first: {items[:4]})")
    if problems:
        raise ValueError(f"{what}: does not match the model: " + "; ".join(problems))


def _build_uninitialised(build_fn: Callable[[ModelConfig], nn.Module], cfg: ModelConfig) -> nn.Module:
    """Build on the meta device and allocate empty CPU storage: skips the random initialisation, which
    the checkpoint overwrites anyway (seconds for a ResNet-101). Falls back to a normal build when the
    model has non-persistent buffers, whose values a state dict cannot restore."""
    with torch.device("meta"):
        model = build_fn(cfg)
    persistent = model.state_dict().keys()
    if any(name not in persistent for name, _ in model.named_buffers()):
        return build_fn(cfg)
    return model.to_empty(device="cpu")


def load_official_checkpoint(path_or_state_dict, arch: str = "detr_r50") -> nn.Module:
    """Build the detr_lite model for ``arch`` and load an official checkpoint into it (eval mode).

    ``path_or_state_dict``: a model-zoo file path (``{'model': state_dict}``, read with
    ``torch.load(weights_only=True)``), such a dict, or a bare official state dict.
    """
    entry = _lookup(arch)
    state_dict = entry.convert_fn(_read_state_dict(path_or_state_dict))
    cfg = entry.config_fn()
    if entry.build_fn is None:
        from detr_lite.models import build_model

        model = _build_uninitialised(build_model, cfg)
    else:
        model = _build_uninitialised(entry.build_fn, cfg)
    check_state_dict(model, state_dict, what=f"official {arch} checkpoint")
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


# ------------------------------------------------------------------------------- Deformable DETR
# deformable_detr_r50{,_single_scale,_refine,_two_stage}: registered by detr_lite/deformable/official.py
import detr_lite.deformable.official  # noqa: E402,F401
