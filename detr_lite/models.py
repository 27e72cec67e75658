"""One entry point per object the training loop needs, dispatched on ``ModelConfig.arch``."""

from __future__ import annotations

from torch import nn

from detr_lite.config import ModelConfig


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "detr":
        from detr_lite.detr import DETR

        return DETR(cfg)
    if cfg.arch == "deformable_detr":
        from detr_lite.deformable.model import DeformableDETR

        return DeformableDETR(cfg)
    raise ValueError(f"ModelConfig.arch: unknown architecture {cfg.arch!r} (expected 'detr' or 'deformable_detr')")


def build_criterion(cfg: ModelConfig) -> nn.Module:
    from detr_lite.criterion import build_criterion as _build

    return _build(cfg)


def build_postprocessor(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "detr":
        from detr_lite.detr import PostProcess

        return PostProcess()
    from detr_lite.deformable.model import PostProcess as DeformablePostProcess

    return DeformablePostProcess()
