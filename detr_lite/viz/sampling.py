"""Plotting for deformable attention: one query's sampling points, per level or per head, and offsets.

Deformable attention works in *normalised* coordinates: (0, 0) is the top-left corner of the
(padded) feature map and (1, 1) its bottom-right corner, identically at every pyramid level. So
these helpers draw every image into the unit square (``extent=(0, 1, 1, 0)``) and plot sampling
locations straight from the model's tensors, whatever the level's resolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from detr_lite.viz.draw import COLORS, DPI, FIGSIZE_PER_PANEL, _new_axes, to_rgb

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
