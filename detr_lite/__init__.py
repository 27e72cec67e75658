"""detr_lite: DETR and Deformable DETR, one stage per file.

Top-level names are imported lazily so that ``import detr_lite`` stays cheap.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "Config": "detr_lite.config",
    "ModelConfig": "detr_lite.config",
    "DataConfig": "detr_lite.config",
    "TrainConfig": "detr_lite.config",
    "get_config": "detr_lite.config",
    "build_model": "detr_lite.models",
    "build_criterion": "detr_lite.models",
    "build_postprocessor": "detr_lite.models",
    "load_official_checkpoint": "detr_lite.official",
    "save_checkpoint": "detr_lite.checkpoint",
    "load_checkpoint": "detr_lite.checkpoint",
    "capture_attention": "detr_lite.transformer",
    "Detector": "detr_lite.api",
    "Detections": "detr_lite.api",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'detr_lite' has no attribute {name!r}")


__all__ = sorted(_LAZY)
