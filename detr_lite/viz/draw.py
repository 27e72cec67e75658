"""Plotting: images, boxes, masks, positional encodings, attention overlays, matching, loss curves.

Nothing here runs a model: every function draws the tensors it is given and returns the ``Axes`` or
``Figure`` it drew on, so a notebook can add to it and a test can inspect what was drawn.
"""

from __future__ import annotations

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
FIGSIZE_PER_PANEL = 2.2  # inches per image panel (square)
FIG_WIDTH = 9.0  # inches: the width of every multi-panel figure, so figures line up in a notebook
DPI = 100
ATTENTION_CMAP = "inferno"
# A fixed colour cycle, so box colours and attention-map titles agree across figures.
COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324")


def use_style() -> None:
    """The notebooks' figure defaults: ``DPI`` inline, small fonts, tight titles."""
    plt.rcParams.update(
        {
            "figure.dpi": DPI,
            "savefig.dpi": DPI,
            "font.size": 8,
            "axes.titlesize": 8,
            "axes.labelsize": 8,
            "xtick.labelsize": 7,
            "ytick.labelsize": 7,
            "legend.fontsize": 7,
        }
    )


def subplots(rows: int = 1, cols: int = 1, row_height: float | None = None, width: float | None = None):
    """``plt.subplots`` at the notebooks' sizes: ``FIG_WIDTH`` wide (narrower for one or two panels)
    and ``row_height`` inches per row (default: square panels, at most ``FIGSIZE_PER_PANEL``), with
    constrained layout so that titles and colour bars get their room (no ``tight_layout`` needed)."""
    width = width or min(FIG_WIDTH, FIGSIZE_PER_PANEL * 1.4 * cols)
    height = row_height or min(FIGSIZE_PER_PANEL, width / cols)
    return plt.subplots(
        rows, cols, figsize=(width, height * rows), dpi=DPI, squeeze=False, layout="constrained"
    )


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
    fig, axes = subplots(1, n, row_height=FIGSIZE_PER_PANEL * 0.8)
    for k, (ax, c) in enumerate(zip(axes[0], channels)):
        im = ax.imshow(pos[c].detach().cpu().numpy(), cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(titles[k] if titles else f"channel {c}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes[0]), fraction=0.02, pad=0.01, label="code value")
    return fig


# ----------------------------------------------------------------------------------------------------
# attention maps
# ----------------------------------------------------------------------------------------------------
def _upsample(attn_map: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a feature-grid map ``[h, w]`` to image size ``(H, W)`` for overlaying."""
    m = attn_map.detach().float().cpu()[None, None]
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def _overlay(ax: Axes, attn_map: torch.Tensor, hw: tuple[int, int], stride: int | None, alpha: float):
    """Blend a feature-grid map over the image already drawn on ``ax``; returns the map's image.

    With ``stride`` each cell covers its own ``stride x stride`` pixels (the grid may run past the
    image's bottom and right edges, as the backbone's does); without, the map is stretched to the image.
    """
    H, W = hw
    if stride is None:
        return ax.imshow(_upsample(attn_map, hw), cmap=ATTENTION_CMAP, alpha=alpha)
    h, w = attn_map.shape
    im = ax.imshow(
        attn_map.detach().float().cpu().numpy(),
        cmap=ATTENTION_CMAP,
        alpha=alpha,
        extent=(0, w * stride, h * stride, 0),
        interpolation="bilinear",
    )
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    return im


def show_attention(
    image,
    attn_map: torch.Tensor,
    ax: Axes | None = None,
    point: tuple[float, float] | None = None,
    title: str | None = None,
    alpha: float = 0.6,
    box=None,
    stride: int | None = None,
    colorbar: bool = False,
) -> Axes:
    """Blend a feature-grid attention map ``[h, w]`` over the image (bright = more weight).

    ``point`` (x, y) marks the query location (e.g. the encoder cell that attends), ``box`` (absolute
    xyxy) the query's box; ``stride`` places each cell on its pixels instead of stretching the map;
    ``colorbar`` adds a colour scale in attention weight per cell.
    """
    if attn_map.dim() != 2:
        raise ValueError(f"show_attention: attn_map must be [h, w], got {tuple(attn_map.shape)}")
    rgb = to_rgb(image)
    ax = show_image(rgb, ax=ax, title=title)
    im = _overlay(ax, attn_map, rgb.shape[:2], stride, alpha)
    if box is not None:
        draw_boxes(ax, torch.as_tensor(box).reshape(1, 4), colors=["cyan"])
    if point is not None:
        ax.plot([point[0]], [point[1]], marker="o", color="cyan", markersize=5, markeredgecolor="black")
    if colorbar:
        cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        cb.solids.set_alpha(1.0)  # the scale itself opaque, whatever the blend
        cb.ax.tick_params(labelsize=6)
    return ax


def show_attention_maps(
    image,
    maps: torch.Tensor,
    boxes=None,
    titles: Sequence[str] | None = None,
    points: Sequence[tuple[float, float]] | None = None,
    max_cols: int = 6,
    overlay: bool = True,
    stride: int | None = None,
    alpha: float = 0.55,
    suptitle: str | None = None,
) -> Figure:
    """One panel per attention map ``[n, h, w]``, blended over the image, each with a colour scale.

    ``boxes`` ``[n, 4]`` absolute xyxy (e.g. each query's predicted box) and ``points`` (x, y) (e.g.
    the cell that attends) are drawn in the map's colour; ``stride`` places the cells on their pixels.
    ``overlay=False`` draws the DETR-colab picture instead: the raw map on top, the image below.
    At most ``max_cols`` maps are drawn.
    """
    if maps.dim() != 3:
        raise ValueError(f"show_attention_maps: maps must be [n, h, w], got {tuple(maps.shape)}")
    if maps.shape[0] == 0:
        raise ValueError("show_attention_maps: got 0 maps (n = 0); pass at least one [h, w] map")
    n = min(maps.shape[0], max_cols)
    rows = 1 if overlay else 2
    rgb = to_rgb(image)
    aspect = rgb.shape[0] / rgb.shape[1]
    width = min(FIG_WIDTH, 1.9 * n + 0.4)
    fig, axes = subplots(rows, n, row_height=max(1.2, (width / n) * aspect) + 0.3, width=width)
    for i in range(n):
        color = COLORS[i % len(COLORS)]
        title = titles[i] if titles else f"map {i}"
        if overlay:
            shown = axes[0, i]
            show_attention(rgb, maps[i], ax=shown, stride=stride, alpha=alpha, colorbar=True)
        else:
            top, shown = axes[0, i], axes[1, i]
            im = top.imshow(
                maps[i].detach().float().cpu().numpy(), cmap=ATTENTION_CMAP, interpolation="nearest"
            )
            top.axis("off")
            fig.colorbar(im, ax=top, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
            show_image(rgb, ax=shown)
        axes[0, i].set_title(title, fontsize=8, color=color)
        if boxes is not None:
            draw_boxes(shown, torch.as_tensor(boxes)[i : i + 1], colors=[color])
        if points is not None:
            x, y = points[i]
            shown.plot([x], [y], marker="o", color=color, markersize=5, markeredgecolor="black")
    fig.suptitle(suptitle or "attention weight per feature cell (colour scale beside each panel)", fontsize=8)
    return fig


# ----------------------------------------------------------------------------------------------------
# matching and training
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
    ax = _new_axes(ax, (min(0.32 * q + 1.5, FIG_WIDTH), 0.32 * n + 1.0))
    im = ax.imshow(cost.T.numpy(), cmap="viridis", aspect="auto", interpolation="nearest")
    ax.figure.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label="cost")
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
    ylabel: str | None = None,
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
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=8)
    return ax
