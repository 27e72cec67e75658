"""The deformable-attention drawing helpers in ``detr_lite.viz`` draw what they are given, where it belongs."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from detr_lite import viz  # noqa: E402
from detr_lite.deformable.msda import MSDeformAttn  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _image(h=40, w=60):
    return np.random.default_rng(0).random((h, w, 3)).astype(np.float32)


def test_show_unit_image_maps_the_image_onto_the_unit_square():
    ax = viz.show_unit_image(_image(40, 60))
    assert ax.get_xlim() == (0.0, 1.0) and ax.get_ylim() == (1.0, 0.0)  # y grows downwards
    assert ax.get_images()[0].get_extent() == [0, 1, 1, 0]
    assert ax.get_aspect() == pytest.approx(40 / 60)


def test_sampling_points_drawn_at_their_locations_with_weight_sized_markers():
    m, n_levels, p = 3, 2, 4
    loc = torch.rand(m, n_levels, p, 2)
    w = torch.rand(m, n_levels, p)
    ax = viz.show_sampling_points(_image(), loc, w, reference=(0.5, 0.5))
    collections = ax.collections
    assert len(collections) == m * n_levels + 1  # one scatter per (head, level) + the reference star
    for i, coll in enumerate(collections[:-1]):
        head, lvl = divmod(i, n_levels)
        np.testing.assert_allclose(coll.get_offsets(), loc[head, lvl].numpy(), rtol=1e-6)
        sizes = coll.get_sizes()
        order = np.argsort(w[head, lvl].numpy())
        assert np.all(np.diff(sizes[order]) >= -1e-6)  # bigger weight -> bigger (or clamped-equal) marker
    np.testing.assert_allclose(collections[-1].get_offsets(), [[0.5, 0.5]])


def test_sampling_points_restricted_to_heads_and_levels_and_single_level_input():
    loc = torch.rand(8, 4, 4, 2)
    ax = viz.show_sampling_points(_image(), loc, heads=[1, 5], levels=[2])
    assert len(ax.collections) == 2
    ax2 = viz.show_sampling_points(_image(), torch.rand(8, 4, 2))  # [M, P, 2]: one level
    assert len(ax2.collections) == 8


def test_sampling_points_grid_panels_by_level_and_by_head():
    loc, w = torch.rand(8, 4, 4, 2), torch.rand(8, 4, 4)
    by_level = viz.sampling_points_grid(_image(), loc, w, by="level", level_images=[_image(5, 8)] * 4)
    assert sum(ax.has_data() for ax in by_level.axes) == 4
    by_head = viz.sampling_points_grid(_image(), loc, w, by="head")
    assert sum(ax.has_data() for ax in by_head.axes) == 8
    with pytest.raises(ValueError, match="by must be"):
        viz.sampling_points_grid(_image(), loc, w, by="query")


def test_bad_shapes_raise_one_line_value_errors():
    with pytest.raises(ValueError, match=r"\[M, L, P, 2\]"):
        viz.show_sampling_points(_image(), torch.rand(4, 2))
    with pytest.raises(ValueError, match=r"\[M, P, 2\]"):
        viz.plot_offset_pattern(torch.rand(8, 4, 3))


def test_offset_pattern_of_the_official_init():
    attn = MSDeformAttn(d_model=32, n_levels=1, n_heads=8, n_points=4)
    offsets = attn.sampling_offsets.bias.detach().view(8, 1, 4, 2)[:, 0]
    ax = viz.plot_offset_pattern(offsets)
    points = [c for c in ax.collections if len(c.get_offsets()) == 4]
    assert len(points) == 8
    np.testing.assert_allclose(
        points[0].get_offsets(), [[1, 0], [2, 0], [3, 0], [4, 0]], atol=1e-6
    )  # head 0: right
    np.testing.assert_allclose(
        points[1].get_offsets(), [[1, 1], [2, 2], [3, 3], [4, 4]], atol=1e-6
    )  # head 1: diagonal
