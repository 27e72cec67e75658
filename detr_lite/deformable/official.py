"""Official Deformable DETR checkpoints (fundamentalvision/Deformable-DETR) -> ``DeformableDETR``.

``detr_lite.official.load_official_checkpoint(path, arch=...)`` loads these (``OFFICIAL_ARCHS`` lists
them, from ``DEFORMABLE_CONFIGS`` below):

=====================================  ==============================================================
arch                                   official checkpoint (COCO val AP)
=====================================  ==============================================================
``deformable_detr_r50_single_scale``   ``r50_deformable_detr_single_scale`` (39.4): C5 only, 1 level
``deformable_detr_r50``                ``r50_deformable_detr`` (44.5): C3-C5 + 1 extra level
``deformable_detr_r50_refine``         ``..._plus_iterative_bbox_refinement`` (46.2)
``deformable_detr_r50_two_stage``      ``..._plus_iterative_bbox_refinement_plus_plus_two_stage`` (46.9)
=====================================  ==============================================================

"Two-stage" here is the official "++ two-stage" model, i.e. refinement + two-stage, the only
two-stage checkpoint the authors published (and the 46.9 AP entry of the paper).

Key mapping (everything else is identical: ``input_proj``, ``query_embed``, ``transformer.*``,
``class_embed.N``, ``bbox_embed.N.layers.M``):

* ``backbone.0.body.*`` -> ``backbone.body.*`` (the sine position encoding has no weights);
* ``transformer.decoder.bbox_embed.*`` / ``transformer.decoder.class_embed.*`` are dropped: the
  official decoder holds a second reference to the model's heads (its "hack implementation" of
  refinement / two-stage); we pass the heads to the decoder instead. The converter checks they
  really are copies of ``bbox_embed.*`` / ``class_embed.*``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import Tensor

from detr_lite.checkpoint import rename_prefixes
from detr_lite.config import ModelConfig, get_config

_DECODER_HEAD_PREFIXES = ("transformer.decoder.bbox_embed.", "transformer.decoder.class_embed.")


def convert_deformable_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official Deformable DETR keys -> detr_lite keys (see module docstring)."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith(_DECODER_HEAD_PREFIXES):
            twin = key[len("transformer.decoder.") :]
            if twin in state_dict and not torch.equal(state_dict[twin], value):
                raise ValueError(
                    f"checkpoint: {key} differs from {twin}; expected the decoder to share the heads"
                )
            continue
        out[key] = value
    return rename_prefixes(out, {"backbone.0.": "backbone."})


def _deformable_config(levels: int = 4, refine: bool = False, two_stage: bool = False):
    def config_fn() -> ModelConfig:
        # the ``deformable-detr-r50-*-coco`` presets (91 raw class ids, sigmoid/focal so no
        # "no-object" logit, 300 queries, 6+6 layers, FFN 1024); every backbone weight comes from
        # the checkpoint, so no ImageNet download
        preset = {
            (False, False): "deformable-detr-r50-coco",
            (True, False): "deformable-detr-r50-refine-coco",
            (True, True): "deformable-detr-r50-two-stage-coco",
        }[(refine, two_stage)]
        return replace(get_config(preset).model, pretrained_backbone=False, num_feature_levels=levels)

    return config_fn


# arch -> the ModelConfig its checkpoint was trained with (the converter is the same for all)
DEFORMABLE_CONFIGS = {
    "deformable_detr_r50_single_scale": _deformable_config(levels=1),
    "deformable_detr_r50": _deformable_config(),
    "deformable_detr_r50_refine": _deformable_config(refine=True),
    "deformable_detr_r50_two_stage": _deformable_config(refine=True, two_stage=True),
}
