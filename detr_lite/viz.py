"""Drawing helpers shared by the notebooks: images, boxes, masks, positional encodings, attention.

Every helper draws with matplotlib at a small fixed size (``FIGSIZE_PER_PANEL`` inches per panel,
``DPI`` dots per inch) so executed notebooks stay small, and every helper returns the ``Figure`` or
``Axes`` it drew on, so a notebook can add to it and a test can inspect what was drawn.

Images come in two forms and every helper accepts both:

* a ``torch.Tensor`` ``[3, H, W]`` normalised with the ImageNet mean/std -- what the model sees; it is
  de-normalised (``denormalize``) before drawing;
* a ``numpy`` array ``[H, W, 3]`` (uint8 0..255 or float 0..1) -- what ``skimage.data`` returns.

Conventions match the package: masks are ``True`` where a pixel is padding; boxes handed to
``draw_boxes`` are absolute ``xyxy`` pixels (convert model ``cxcywh`` outputs with
``torchvision.ops.box_convert`` and scale by the image size first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FIGSIZE_PER_PANEL = 2.2  # inches per panel (square)
DPI = 80
# A fixed colour cycle, so box colours and attention-map titles agree across figures.
COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324")


# ----------------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------------
def normalize(image: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalise a float image ``[3, H, W]`` (or ``[B, 3, H, W]``) with values in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image - mean) / std


def denormalize(image: torch.Tensor) -> np.ndarray:
    """Undo ``normalize``: ``[3, H, W]`` normalised tensor -> ``[H, W, 3]`` float array in [0, 1]."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"denormalize: image must be [3, H, W], got {tuple(image.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    rgb = (image.detach() * std + mean).clamp(0, 1)
    return rgb.permute(1, 2, 0).cpu().float().numpy()


def to_rgb(image) -> np.ndarray:
    """Any supported image (normalised tensor or HWC array) -> ``[H, W, 3]`` float array in [0, 1]."""
    if isinstance(image, torch.Tensor):
        return denormalize(image)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"to_rgb: numpy image must be [H, W, 3], got {arr.shape}")
    return arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)


def _new_axes(ax: Axes | None, size: tuple[float, float] | None = None) -> Axes:
    if ax is not None:
        return ax
    w, h = size or (FIGSIZE_PER_PANEL * 1.4, FIGSIZE_PER_PANEL)
    _, ax = plt.subplots(figsize=(w, h), dpi=DPI)
    return ax


def show_image(image, ax: Axes | None = None, title: str | None = None) -> Axes:
    """Draw an image (a normalised ``[3, H, W]`` tensor is de-normalised first); returns the Axes."""
    ax = _new_axes(ax)
    ax.imshow(to_rgb(image))
    if title:
        ax.set_title(title, fontsize=8)
    ax.axis("off")
    return ax


def draw_boxes(
    ax: Axes,
    boxes_xyxy,
    labels: Sequence[int] | torch.Tensor | None = None,
    scores: Sequence[float] | torch.Tensor | None = None,
    class_names: Sequence[str] | dict[int, str] | None = None,
    colors: Sequence[str] | None = None,
    linewidth: float = 1.5,
) -> list[Rectangle]:
    """Add one rectangle per absolute ``xyxy`` box to ``ax``, captioned "name score" when given.

    ``class_names`` maps a label id to its name (a list indexed by id or a dict). Colours follow
    the label (same class, same colour) when labels are given, else the box index.
    Returns the ``Rectangle`` patches that were added.
    """
    boxes = torch.as_tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4)
    colors = colors or COLORS
    patches = []
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        label = None if labels is None else int(labels[i])
        color = colors[(label if label is not None else i) % len(colors)]
        rect = Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=linewidth)
        ax.add_patch(rect)
        patches.append(rect)
        caption = []
        if label is not None:
            caption.append(str(class_names[label]) if class_names is not None else str(label))
        if scores is not None:
            caption.append(f"{float(scores[i]):.2f}")
        if caption:
            ax.text(
                x0,
                y0,
                " ".join(caption),
                fontsize=6,
                color="white",
                va="bottom",
                bbox=dict(facecolor=color, alpha=0.7, pad=1, linewidth=0),
            )
    return patches


def show_boxes(
    image,
    boxes_xyxy,
    labels=None,
    scores=None,
    class_names=None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """``show_image`` followed by ``draw_boxes``: an image with its (absolute xyxy) boxes."""
    ax = show_image(image, ax=ax, title=title)
    draw_boxes(ax, boxes_xyxy, labels=labels, scores=scores, class_names=class_names)
    return ax


def show_mask(mask: torch.Tensor, ax: Axes | None = None, title: str | None = None) -> Axes:
    """Draw a padding mask ``[H, W]`` (True = padded) as black = real pixel, white = padding."""
    if mask.dim() != 2:
        raise ValueError(f"show_mask: mask must be [H, W], got {tuple(mask.shape)}")
    ax = _new_axes(ax)
    ax.imshow(mask.detach().cpu().float().numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title or f"mask {tuple(mask.shape)}  (white = pad)", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


# ----------------------------------------------------------------------------------------------------
# positional encodings
# ----------------------------------------------------------------------------------------------------
def plot_pe_channels(
    pos: torch.Tensor, channels: Sequence[int], titles: Sequence[str] | None = None
) -> Figure:
    """One panel per channel of a positional encoding ``[C, h, w]`` (or ``[1, C, h, w]``), range [-1, 1]."""
    if pos.dim() == 4:
        pos = pos[0]
    if pos.dim() != 3:
        raise ValueError(f"plot_pe_channels: pos must be [C, h, w], got {tuple(pos.shape)}")
    n = len(channels)
    fig, axes = plt.subplots(
        1, n, figsize=(FIGSIZE_PER_PANEL * n * 0.8, FIGSIZE_PER_PANEL * 0.8), dpi=DPI, squeeze=False
    )
    for k, (ax, c) in enumerate(zip(axes[0], channels)):
        ax.imshow(pos[c].detach().cpu().numpy(), cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(titles[k] if titles else f"channel {c}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------
# attention maps
# ----------------------------------------------------------------------------------------------------
def _upsample(attn_map: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a feature-grid map ``[h, w]`` to image size ``(H, W)`` for overlaying."""
    m = attn_map.detach().float().cpu()[None, None]
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def show_attention(
    image,
    attn_map: torch.Tensor,
    ax: Axes | None = None,
    point: tuple[float, float] | None = None,
    title: str | None = None,
    alpha: float = 0.6,
) -> Axes:
    """Overlay a feature-grid attention map ``[h, w]`` on the image (upsampled to its size).

    ``point`` = (x, y) in image pixels marks the query location (e.g. the encoder pixel that attends).
    """
    if attn_map.dim() != 2:
        raise ValueError(f"show_attention: attn_map must be [h, w], got {tuple(attn_map.shape)}")
    rgb = to_rgb(image)
    ax = show_image(rgb, ax=ax, title=title)
    ax.imshow(_upsample(attn_map, rgb.shape[:2]), cmap="inferno", alpha=alpha)
    if point is not None:
        ax.plot([point[0]], [point[1]], marker="o", color="cyan", markersize=5, markeredgecolor="black")
    return ax


def show_attention_maps(
    image,
    maps: torch.Tensor,
    boxes=None,
    titles: Sequence[str] | None = None,
    points: Sequence[tuple[float, float]] | None = None,
    max_cols: int = 6,
    overlay: bool = False,
) -> Figure:
    """The DETR-colab picture: for each map, the raw attention ``[h, w]`` on top and the image below.

    ``maps`` ``[n, h, w]``; ``boxes`` ``[n, 4]`` absolute xyxy (one per map, e.g. the query's
    predicted box) and/or ``points`` (x, y) are drawn on the image panel in the map's colour.
    ``overlay=True`` draws one row instead: each map upsampled and laid over the image.
    At most ``max_cols`` maps are drawn.
    """
    if maps.dim() != 3:
        raise ValueError(f"show_attention_maps: maps must be [n, h, w], got {tuple(maps.shape)}")
    if maps.shape[0] == 0:
        raise ValueError("show_attention_maps: got 0 maps (n = 0); pass at least one [h, w] map")
    n = min(maps.shape[0], max_cols)
    rows = 1 if overlay else 2
    fig, axes = plt.subplots(
        rows, n, figsize=(FIGSIZE_PER_PANEL * n * 0.9, FIGSIZE_PER_PANEL * 0.8 * rows), dpi=DPI, squeeze=False
    )
    rgb = to_rgb(image)
    for i in range(n):
        color = COLORS[i % len(COLORS)]
        title = titles[i] if titles else f"map {i}"
        if overlay:
            bottom = axes[0, i]
            show_attention(rgb, maps[i], ax=bottom)
        else:
            top, bottom = axes[0, i], axes[1, i]
            top.imshow(maps[i].detach().float().cpu().numpy(), cmap="inferno", interpolation="nearest")
            top.axis("off")
            show_image(rgb, ax=bottom)
        axes[0, i].set_title(title, fontsize=8, color=color)
        if boxes is not None:
            draw_boxes(bottom, torch.as_tensor(boxes)[i : i + 1], colors=[color])
        if points is not None:
            x, y = points[i]
            bottom.plot([x], [y], marker="o", color=color, markersize=5, markeredgecolor="black")
    fig.tight_layout()
    return fig


def _feature_grid(
    image_hw: tuple[int, int], num_tokens: int, strides: Sequence[int] = (32, 16, 8, 64)
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
    return (int(own[-1]),) + (32, 16, 8, 64) if own else (32, 16, 8, 64)


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


def attention_explorer(
    model: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor | None = None, layer: int = -1
):
    """Interactive encoder-attention explorer: move a point over the image, see what it attends to.

    Runs the model once (``encoder_attention``), then two ``ipywidgets`` sliders pick a pixel
    (x, y); the panel on the right shows the attention of the feature cell under that pixel.
    Returns an ``ipywidgets.VBox``; its ``.draw(x, y)`` method redraws for a point and returns the
    Figure (handy for static notebooks and tests).
    """
    import ipywidgets as widgets
    from IPython.display import display

    attn = encoder_attention(model, image, mask, layer)
    h, w = attn.shape[:2]
    H, W = image.shape[-2:]
    stride = _feature_grid((H, W), h * w, _model_strides(model))[2]
    rgb = to_rgb(image)

    def draw(x: int, y: int) -> Figure:
        i, j = min(int(y) // stride, h - 1), min(int(x) // stride, w - 1)
        fig, (left, right) = plt.subplots(1, 2, figsize=(FIGSIZE_PER_PANEL * 2.4, FIGSIZE_PER_PANEL), dpi=DPI)
        show_image(rgb, ax=left, title=f"query pixel ({int(x)}, {int(y)})")
        left.plot([x], [y], marker="o", color="cyan", markersize=6, markeredgecolor="black")
        show_attention(rgb, attn[i, j], ax=right, point=(x, y), title=f"encoder attention, cell ({i}, {j})")
        fig.tight_layout()
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
    box = widgets.VBox([widgets.HBox([xs, ys]), out])
    box.draw = draw
    box.attention = attn
    return box


# ----------------------------------------------------------------------------------------------------
# matching and training helpers (H7: notebooks 05 and 06)
# ----------------------------------------------------------------------------------------------------
def show_cost_matrix(
    cost: torch.Tensor,
    pred_idx=None,
    tgt_idx=None,
    ax: Axes | None = None,
    title: str | None = None,
    tgt_names: Sequence[str] | None = None,
) -> Axes:
    """Heatmap of a matching cost matrix ``[num_queries, num_targets]``, drawn targets x queries.

    Low cost (a good pair) is dark. The cells picked by an assignment (``pred_idx[k]`` matched to
    ``tgt_idx[k]``) are outlined, so the picture shows which query won each ground-truth box.
    """
    cost = torch.as_tensor(cost).detach().float().cpu()
    if cost.dim() != 2:
        raise ValueError(
            f"show_cost_matrix: cost must be [num_queries, num_targets], got {tuple(cost.shape)}"
        )
    q, n = cost.shape
    ax = _new_axes(ax, (min(0.32 * q + 1.5, 9.0), 0.32 * n + 1.0))
    im = ax.imshow(cost.T.numpy(), cmap="viridis", aspect="auto", interpolation="nearest")
    ax.figure.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    if pred_idx is not None and tgt_idx is not None:
        for k, (i, j) in enumerate(zip(list(map(int, pred_idx)), list(map(int, tgt_idx)))):
            color = COLORS[k % len(COLORS)]
            ax.add_patch(Rectangle((i - 0.5, j - 0.5), 1, 1, fill=False, edgecolor=color, linewidth=2))
    ax.set_xlabel("query (prediction) index", fontsize=8)
    ax.set_ylabel("ground-truth box", fontsize=8)
    ax.set_xticks(range(q))
    ax.set_yticks(range(n))
    if tgt_names is not None:
        ax.set_yticklabels(list(tgt_names))
    ax.tick_params(labelsize=6)
    if title:
        ax.set_title(title, fontsize=8)
    return ax


def show_matching(
    image,
    pred_boxes_xyxy,
    gt_boxes_xyxy,
    pred_idx,
    tgt_idx,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """An image with its ground truth (solid) and the predictions matched to it (dashed).

    Pair ``k`` (prediction ``pred_idx[k]`` <-> ground truth ``tgt_idx[k]``) shares one colour and is
    joined by a line between the two box centres, labelled with the query index. Boxes are absolute
    ``xyxy`` pixels; unmatched predictions are not drawn.
    """
    ax = show_image(image, ax=ax, title=title)
    preds = torch.as_tensor(pred_boxes_xyxy, dtype=torch.float32).reshape(-1, 4)
    gts = torch.as_tensor(gt_boxes_xyxy, dtype=torch.float32).reshape(-1, 4)
    for k, (i, j) in enumerate(zip(list(map(int, pred_idx)), list(map(int, tgt_idx)))):
        color = COLORS[k % len(COLORS)]
        g, p = gts[j].tolist(), preds[i].tolist()
        ax.add_patch(Rectangle((g[0], g[1]), g[2] - g[0], g[3] - g[1], fill=False, edgecolor=color, lw=2))
        ax.add_patch(
            Rectangle((p[0], p[1]), p[2] - p[0], p[3] - p[1], fill=False, edgecolor=color, lw=1.2, ls="--")
        )
        gc, pc = ((g[0] + g[2]) / 2, (g[1] + g[3]) / 2), ((p[0] + p[2]) / 2, (p[1] + p[3]) / 2)
        ax.plot([gc[0], pc[0]], [gc[1], pc[1]], color=color, lw=1.2, marker="o", markersize=3)
        ax.text(
            pc[0],
            pc[1],
            f"q{i}",
            fontsize=6,
            color="white",
            bbox=dict(facecolor=color, alpha=0.7, pad=1, lw=0),
        )
    return ax


def plot_loss_curves(
    curves: dict[str, Sequence[float]],
    x: Sequence[float] | None = None,
    ax: Axes | None = None,
    xlabel: str = "iteration",
    title: str | None = None,
    logy: bool = False,
) -> Axes:
    """One line per named curve (e.g. ``{'loss': [...], 'loss_ce': [...]}``) on shared axes.

    ``x`` gives the x values shared by every curve (default 0, 1, 2, ...).
    """
    ax = _new_axes(ax, (FIGSIZE_PER_PANEL * 2.0, FIGSIZE_PER_PANEL * 1.1))
    for k, (name, ys) in enumerate(curves.items()):
        xs = list(x) if x is not None else list(range(len(ys)))
        ax.plot(xs[: len(ys)], list(ys), label=name, color=COLORS[k % len(COLORS)], lw=1.2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=8)
    return ax


# ----------------------------------------------------------------------------------------------------
# deformable-attention helpers (H5) go below this line
# ----------------------------------------------------------------------------------------------------
# Deformable attention works in *normalised* coordinates: (0, 0) is the top-left corner of the
# (padded) feature map and (1, 1) its bottom-right corner, identically at every pyramid level. So
# these helpers draw every image into the unit square (``extent=(0, 1, 1, 0)``) and plot sampling
# locations straight from the model's tensors, whatever the level's resolution.
LEVEL_MARKERS = ("o", "s", "^", "D", "v", "P")


def show_unit_image(image, ax: Axes | None = None, title: str | None = None, pixelated: bool = False) -> Axes:
    """Draw ``image`` over the unit square (normalised coordinates), keeping its aspect ratio."""
    ax = _new_axes(ax)
    rgb = to_rgb(image)
    ax.imshow(rgb, extent=(0, 1, 1, 0), interpolation="nearest" if pixelated else "antialiased")
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)
    ax.set_aspect(rgb.shape[0] / rgb.shape[1])
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)
    return ax


def _as_mlp(locations, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling tensors of ONE query -> ``([M, L, P, 2], [M, L, P])``; ``[M, P, 2]`` means one level."""
    loc = torch.as_tensor(locations).detach().float().cpu()
    if loc.dim() == 3:
        loc = loc[:, None]
    if loc.dim() != 4 or loc.shape[-1] != 2:
        raise ValueError(f"sampling locations must be [M, L, P, 2] or [M, P, 2], got {tuple(loc.shape)}")
    if weights is None:
        w = torch.full(loc.shape[:-1], 1.0)
    else:
        w = torch.as_tensor(weights).detach().float().cpu().reshape(loc.shape[:-1])
    return loc, w


def draw_sampling_points(
    ax: Axes,
    locations,
    weights=None,
    reference=None,
    heads: Sequence[int] | None = None,
    levels: Sequence[int] | None = None,
    max_marker: float = 90.0,
    weight_max: float | None = None,
) -> None:
    """Scatter one query's sampling locations on unit-square axes (see ``show_sampling_points``).

    Colour = head (``COLORS[m]``), marker = level (``LEVEL_MARKERS[l]``), marker area proportional
    to the attention weight (the largest weight, or ``weight_max``, gets ``max_marker``).
    ``reference`` (x, y) normalised is drawn as a white star.
    """
    loc, w = _as_mlp(locations, weights)
    n_heads, n_levels = loc.shape[:2]
    scale = max_marker / float(weight_max if weight_max is not None else w.max().clamp_min(1e-12))
    for m in heads if heads is not None else range(n_heads):
        for lvl in levels if levels is not None else range(n_levels):
            ax.scatter(
                loc[m, lvl, :, 0].numpy(),
                loc[m, lvl, :, 1].numpy(),
                s=(w[m, lvl] * scale).clamp_min(4.0).numpy(),
                c=COLORS[m % len(COLORS)],
                marker=LEVEL_MARKERS[lvl % len(LEVEL_MARKERS)],
                edgecolors="black",
                linewidths=0.4,
                alpha=0.9,
                zorder=3,
            )
    if reference is not None:
        rx, ry = [float(v) for v in torch.as_tensor(reference).reshape(-1)[:2]]
        ax.scatter([rx], [ry], s=110, marker="*", c="white", edgecolors="black", linewidths=0.8, zorder=4)


def show_sampling_points(
    image,
    locations,
    weights=None,
    reference=None,
    ax: Axes | None = None,
    title: str | None = None,
    heads: Sequence[int] | None = None,
    levels: Sequence[int] | None = None,
    pixelated: bool = False,
) -> Axes:
    """One query's deformable-attention sampling points over an image.

    ``locations`` ``[M, L, P, 2]`` (or ``[M, P, 2]``) normalised (x, y), as in
    ``sampling_locations[b, q]``; ``weights`` ``[M, L, P]`` the softmax attention weights
    (``attention_weights[b, q]``); ``reference`` the query's reference point (x, y).
    ``heads`` / ``levels`` restrict what is drawn. Returns the Axes.
    """
    ax = show_unit_image(image, _new_axes(ax), title=title, pixelated=pixelated)
    draw_sampling_points(ax, locations, weights, reference=reference, heads=heads, levels=levels)
    return ax


def sampling_points_grid(
    image,
    locations,
    weights=None,
    reference=None,
    by: str = "level",
    level_images: Sequence | None = None,
    level_names: Sequence[str] | None = None,
) -> Figure:
    """One panel per level (``by="level"``, every head in its colour) or per head (``by="head"``,
    every level with its marker) for one query's sampling points.

    ``level_images`` (one image per level, e.g. the coarse pyramid the level samples from) replaces
    ``image`` in the per-level panels and is drawn pixelated, so you see the resolution each level has.
    Marker sizes share one scale across panels, so they compare between panels.
    """
    if by not in ("level", "head"):
        raise ValueError(f"sampling_points_grid: by must be 'level' or 'head', got {by!r}")
    loc, w = _as_mlp(locations, weights)
    n_heads, n_levels = loc.shape[:2]
    n = n_levels if by == "level" else n_heads
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(FIGSIZE_PER_PANEL * cols, FIGSIZE_PER_PANEL * rows * 0.85),
        dpi=DPI,
        squeeze=False,
    )
    wmax = float(w.max())
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        if by == "level":
            img = level_images[i] if level_images is not None else image
            name = level_names[i] if level_names is not None else f"level {i}"
            show_unit_image(img, ax, title=f"{name}: all heads", pixelated=level_images is not None)
            draw_sampling_points(ax, loc, w, reference, levels=[i], weight_max=wmax)
        else:
            show_unit_image(image, ax, title=f"head {i}: all levels")
            ax.title.set_color(COLORS[i % len(COLORS)])
            draw_sampling_points(ax, loc, w, reference, heads=[i], weight_max=wmax)
    fig.tight_layout()
    return fig


def plot_offset_pattern(offsets, ax: Axes | None = None, title: str | None = None) -> Axes:
    """Sampling offsets ``[M, P, 2]`` of one level, in pixels of that level, around the reference (0, 0).

    Head ``m`` is drawn in ``COLORS[m]`` with a line from the reference through its points; every
    point is numbered ``k + 1``. This is how the official initialisation looks (``MSDeformAttn``'s
    ``sampling_offsets.bias``): 8 heads = 8 compass directions, point k at k + 1 pixels.
    """
    off = torch.as_tensor(offsets).detach().float().cpu()
    if off.dim() != 3 or off.shape[-1] != 2:
        raise ValueError(f"plot_offset_pattern: offsets must be [M, P, 2], got {tuple(off.shape)}")
    ax = _new_axes(ax, size=(FIGSIZE_PER_PANEL * 1.5, FIGSIZE_PER_PANEL * 1.5))
    lim = float(off.abs().max()) + 0.8
    for m in range(off.shape[0]):
        color = COLORS[m % len(COLORS)]
        xs = [0.0] + off[m, :, 0].tolist()
        ys = [0.0] + off[m, :, 1].tolist()
        ax.plot(xs, ys, color=color, linewidth=0.8, alpha=0.6)
        ax.scatter(
            xs[1:], ys[1:], color=color, s=22, edgecolors="black", linewidths=0.3, zorder=3, label=f"head {m}"
        )
        for k, (x, y) in enumerate(zip(xs[1:], ys[1:])):
            ax.annotate(str(k + 1), (x, y), fontsize=5, ha="center", va="center", color="white", zorder=4)
    ax.scatter([0], [0], s=90, marker="*", c="white", edgecolors="black", zorder=4)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(lim, -lim)  # image convention: y grows downwards
    ax.set_aspect("equal")
    ax.set_xticks(range(-int(lim), int(lim) + 1))
    ax.set_yticks(range(-int(lim), int(lim) + 1))
    ax.grid(True, linewidth=0.4, alpha=0.5)
    ax.tick_params(labelsize=6)
    ax.set_xlabel("Δx (pixels of the level)", fontsize=7)
    ax.set_ylabel("Δy", fontsize=7)
    ax.legend(fontsize=5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title or "sampling offsets at init", fontsize=8)
    return ax
