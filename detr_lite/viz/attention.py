"""Attention that needs a model run: encoder self-attention maps, the explorer, attention-on-box shares.

``encoder_attention`` runs a DETR once and returns its encoder self-attention on the feature grid;
``attention_explorer`` wraps that in a widget (with a static picture of a grid of query points for
renderings without a kernel); ``attention_mass_in_boxes`` measures how much of a map falls on a box.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from detr_lite.viz.draw import COLORS, FIG_WIDTH, FIGSIZE_PER_PANEL, show_attention, subplots, to_rgb

DEFAULT_STRIDES = (32, 16, 8, 64)


def _feature_grid(
    image_hw: tuple[int, int], num_tokens: int, strides: Sequence[int] = DEFAULT_STRIDES
) -> tuple[int, int, int]:
    """Recover the feature grid ``(h, w, stride)`` of a backbone from the image size and token count.

    The first stride in ``strides`` whose grid ``ceil(H/s) x ceil(W/s)`` has ``num_tokens`` cells wins.
    """
    H, W = image_hw
    for stride in strides:
        h, w = math.ceil(H / stride), math.ceil(W / stride)
        if h * w == num_tokens:
            return h, w, stride
    raise ValueError(
        f"cannot match {num_tokens} attention tokens to image {H}x{W} at strides {tuple(strides)}"
    )


def _model_strides(model: torch.nn.Module) -> tuple[int, ...]:
    """The model's own output stride first (``model.backbone.strides[-1]``), then the usual ones."""
    own = getattr(getattr(model, "backbone", None), "strides", None)
    return (int(own[-1]),) + DEFAULT_STRIDES if own else DEFAULT_STRIDES


def attention_mass_in_boxes(
    maps: torch.Tensor, boxes_xyxy: torch.Tensor, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """How much of each attention map falls on "its" box, and what uniform attention would give.

    ``maps`` ``[n, h, w]`` (each summing to 1) live on a feature grid of the given ``stride``;
    ``boxes_xyxy`` ``[n, 4]`` are absolute pixels. A cell counts as inside when its centre
    ``((j + 0.5) * stride, (i + 0.5) * stride)`` lies in the box. Returns ``(mass [n], share [n])``:
    the attention on inside cells and the fraction of cells inside (the uniform baseline).
    """
    if maps.dim() != 3 or boxes_xyxy.shape != (maps.shape[0], 4):
        raise ValueError(
            f"attention_mass_in_boxes: expected maps [n, h, w] and boxes [n, 4], "
            f"got {tuple(maps.shape)} and {tuple(boxes_xyxy.shape)}"
        )
    h, w = maps.shape[-2:]
    ys = ((torch.arange(h, dtype=torch.float32) + 0.5) * stride)[None, :, None]
    xs = ((torch.arange(w, dtype=torch.float32) + 0.5) * stride)[None, None, :]
    x0, y0, x1, y1 = (c.float()[:, None, None] for c in boxes_xyxy.unbind(-1))
    inside = (ys >= y0) & (ys <= y1) & (xs >= x0) & (xs <= x1)  # [n, h, w]
    return (maps * inside).sum((1, 2)), inside.float().mean((1, 2))


@torch.no_grad()
def encoder_attention(
    model: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor | None = None, layer: int = -1
) -> torch.Tensor:
    """Self-attention of one DETR encoder layer (heads averaged) as ``[h, w, h, w]``.

    ``out[i, j]`` is the map over the feature grid that feature cell ``(i, j)`` attends to. The
    weights come from ``detr_lite.transformer.capture_attention`` (no forward hooks needed).
    """
    from detr_lite.transformer import capture_attention

    if image.dim() != 3:
        raise ValueError(
            f"encoder_attention: image must be one normalised [3, H, W], got {tuple(image.shape)}"
        )
    model.eval()
    with capture_attention(model) as attn:
        model(image[None], None if mask is None else mask[None])
    enc = [v for k, v in attn.items() if "encoder" in k]
    if not enc:
        raise ValueError(f"encoder_attention: no encoder attention captured; got keys {list(attn)[:4]}...")
    weights = enc[layer][0].mean(0)  # [heads, HW, HW] -> [HW, HW]
    h, w, _ = _feature_grid(tuple(image.shape[-2:]), weights.shape[-1], _model_strides(model))
    return weights.reshape(h, w, h, w)


def _grid_points(H: int, W: int, rows: int, cols: int) -> list[tuple[int, int]]:
    """``rows x cols`` pixels spread evenly over an ``H x W`` image (centres of a coarse grid)."""
    return [(int((c + 0.5) * W / cols), int((r + 0.5) * H / rows)) for r in range(rows) for c in range(cols)]


def _explorer_class():
    """The widget class, built on first use so that the package imports without ipywidgets."""
    import ipywidgets as widgets

    class AttentionExplorer(widgets.VBox):
        """Sliders + live figure; renders as a static grid of query points where no kernel runs."""

        def _repr_mimebundle_(self, **kwargs):
            bundle = super()._repr_mimebundle_(**kwargs)
            fig = self.draw_grid()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", bbox_inches="tight")
            plt.close(fig)
            bundle["image/png"] = base64.b64encode(buf.getvalue()).decode("ascii")
            bundle["text/plain"] = "encoder-attention explorer (interactive with a running kernel)"
            return bundle

    return AttentionExplorer


def attention_explorer(
    model: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor | None = None, layer: int = -1
):
    """Interactive encoder-attention explorer: move a point over the image, see what it attends to.

    Runs the model once (``encoder_attention``); two ``ipywidgets`` sliders pick a pixel (x, y) and
    the figure shows the attention of the feature cell under it, blended over the image. Returns an
    ``ipywidgets.VBox`` with ``.draw(x, y)`` (the figure for one point) and ``.draw_grid(points)``
    (one panel per point; by default a 2 x 3 grid over the image). Displayed without a running
    kernel (a static rendering, an untrusted notebook), it shows that grid as a picture.
    """
    import ipywidgets as widgets
    from IPython.display import display

    attn = encoder_attention(model, image, mask, layer)
    h, w = attn.shape[:2]
    H, W = image.shape[-2:]
    stride = _feature_grid((H, W), h * w, _model_strides(model))[2]
    rgb = to_rgb(image)

    def cell(x: float, y: float) -> tuple[int, int]:
        return min(int(y) // stride, h - 1), min(int(x) // stride, w - 1)

    def draw(x: int, y: int) -> Figure:
        i, j = cell(x, y)
        fig, ax = subplots(1, 1, width=FIGSIZE_PER_PANEL * 1.8)
        show_attention(
            rgb, attn[i, j], ax=ax[0, 0], point=(x, y), stride=stride, colorbar=True,
            title=f"encoder attention of the cell at ({int(x)}, {int(y)}), cell ({i}, {j})",
        )  # fmt: skip
        return fig

    def draw_grid(points: Sequence[tuple[float, float]] | None = None, cols: int = 3) -> Figure:
        points = list(points) if points is not None else _grid_points(H, W, 2, 3)
        rows = math.ceil(len(points) / cols)
        fig, axes = subplots(rows, cols, width=FIG_WIDTH, row_height=FIG_WIDTH / cols * H / W + 0.3)
        for k, ax in enumerate(axes.flat):
            if k >= len(points):
                ax.axis("off")
                continue
            x, y = points[k]
            i, j = cell(x, y)
            show_attention(
                rgb,
                attn[i, j],
                ax=ax,
                stride=stride,
                colorbar=True,
                title=f"query point ({int(x)}, {int(y)})",
            )
            ax.plot(
                [x], [y], marker="o", color=COLORS[k % len(COLORS)], markersize=6, markeredgecolor="white"
            )
        fig.suptitle(
            "encoder self-attention (last layer, heads averaged) of the cell under each point", fontsize=8
        )
        return fig

    out = widgets.Output()
    xs = widgets.IntSlider(value=W // 2, min=0, max=W - 1, description="x")
    ys = widgets.IntSlider(value=H // 2, min=0, max=H - 1, description="y")

    def update(change=None):
        with out:
            out.clear_output(wait=True)
            fig = draw(xs.value, ys.value)
            display(fig)
            plt.close(fig)

    xs.observe(update, names="value")
    ys.observe(update, names="value")
    update()
    box = _explorer_class()([widgets.HBox([xs, ys]), out])
    box.draw = draw
    box.draw_grid = draw_grid
    box.attention = attn
    box.stride = stride
    return box
