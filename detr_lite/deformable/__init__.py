"""Deformable DETR: multi-scale deformable attention (msda), its transformer and the model."""

from detr_lite.deformable.msda import MSDeformAttn, ms_deform_attn, ms_deform_attn_reference

__all__ = ["MSDeformAttn", "ms_deform_attn", "ms_deform_attn_reference"]
