"""Deformable DETR: multi-scale deformable attention (``msda``), its transformer and the model.

``DeformableDETR`` / ``DeformableTransformer`` / ``PostProcess`` are imported lazily (they pull in
the backbone), so ``from detr_lite.deformable import ms_deform_attn`` stays light.
"""

from importlib import import_module

from detr_lite.deformable.msda import MSDeformAttn, ms_deform_attn, ms_deform_attn_reference

_LAZY = {
    "DeformableDETR": "detr_lite.deformable.model",
    "PostProcess": "detr_lite.deformable.model",
    "DeformableTransformer": "detr_lite.deformable.transformer",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'detr_lite.deformable' has no attribute {name!r}")


__all__ = ["MSDeformAttn", "ms_deform_attn", "ms_deform_attn_reference", *_LAZY]
