"""Drawing helpers shared by the notebooks: images, boxes, masks, positional encodings, attention.

Two halves: ``draw`` and ``sampling`` plot tensors they are given (``sampling`` for deformable
attention's sampling points); ``attention`` runs a model to get what it plots (encoder
self-attention, the interactive explorer). Import everything from here: ``from detr_lite import viz``.

Every helper draws at the notebooks' fixed sizes (``FIG_WIDTH``, ``FIGSIZE_PER_PANEL`` inches,
``DPI`` dots per inch; ``use_style()`` sets the same defaults for a notebook's own figures) and returns
the ``Figure`` or ``Axes`` it drew on. Images come in two forms and every helper accepts both:

* a ``torch.Tensor`` ``[3, H, W]`` normalised with the ImageNet mean/std -- what the model sees; it is
  de-normalised (``denormalize``) before drawing;
* a ``numpy`` array ``[H, W, 3]`` (uint8 0..255 or float 0..1) -- what ``skimage.data`` returns.

Conventions match the package: masks are ``True`` where a pixel is padding; boxes handed to
``draw_boxes`` are absolute ``xyxy`` pixels (convert model ``cxcywh`` outputs with
``torchvision.ops.box_convert`` and scale by the image size first).
"""

# ``from X import _name as _name`` re-exports a private helper that tests reach as ``viz._name``
from detr_lite.viz.attention import _feature_grid as _feature_grid
from detr_lite.viz.attention import _model_strides as _model_strides
from detr_lite.viz.attention import (
    attention_explorer,
    attention_mass_in_boxes,
    encoder_attention,
)
from detr_lite.viz.draw import (
    ATTENTION_CMAP,
    COLORS,
    DPI,
    FIG_WIDTH,
    FIGSIZE_PER_PANEL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    denormalize,
    draw_boxes,
    normalize,
    plot_loss_curves,
    plot_pe_channels,
    show_attention,
    show_attention_maps,
    show_boxes,
    show_cost_matrix,
    show_image,
    show_mask,
    show_matching,
    subplots,
    to_rgb,
    use_style,
)
from detr_lite.viz.draw import _new_axes as _new_axes
from detr_lite.viz.draw import _upsample as _upsample
from detr_lite.viz.sampling import (
    LEVEL_MARKERS,
    draw_sampling_points,
    plot_offset_pattern,
    sampling_points_grid,
    show_sampling_points,
    show_unit_image,
)
from detr_lite.viz.sampling import _as_mlp as _as_mlp

__all__ = [
    "ATTENTION_CMAP", "COLORS", "DPI", "FIG_WIDTH", "FIGSIZE_PER_PANEL", "IMAGENET_MEAN", "IMAGENET_STD",
    "LEVEL_MARKERS", "attention_explorer", "attention_mass_in_boxes", "denormalize", "draw_boxes",
    "draw_sampling_points", "encoder_attention", "normalize", "plot_loss_curves", "plot_offset_pattern",
    "plot_pe_channels", "sampling_points_grid", "show_attention", "show_attention_maps", "show_boxes",
    "show_cost_matrix", "show_image", "show_mask", "show_matching", "show_sampling_points",
    "show_unit_image", "subplots", "to_rgb", "use_style",
]  # fmt: skip
