"""detr_lite.viz: the drawing helpers draw what they are asked to, and de-normalisation is exact."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from detr_lite import viz  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_denormalize_inverts_normalize():
    torch.manual_seed(0)
    rgb = torch.rand(3, 7, 5)
    out = viz.denormalize(viz.normalize(rgb))
    assert out.shape == (7, 5, 3)
    np.testing.assert_allclose(out, rgb.permute(1, 2, 0).numpy(), atol=1e-6)


def test_normalize_matches_torchvision():
    from torchvision.transforms import v2

    rgb = torch.rand(3, 4, 6)
    ref = v2.Normalize(viz.IMAGENET_MEAN, viz.IMAGENET_STD)(rgb)
    assert torch.allclose(viz.normalize(rgb), ref, atol=1e-6)


def test_to_rgb_accepts_uint8_and_rejects_bad_shape():
    arr = np.full((4, 4, 3), 255, dtype=np.uint8)
    assert viz.to_rgb(arr).max() == 1.0
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        viz.denormalize(torch.zeros(4, 4))


def test_draw_boxes_adds_one_rectangle_per_box_with_captions():
    ax = viz.show_image(viz.normalize(torch.rand(3, 40, 60)))
    boxes = torch.tensor([[1.0, 2.0, 11.0, 22.0], [5.0, 5.0, 30.0, 35.0]])
    patches = viz.draw_boxes(
        ax, boxes, labels=[1, 2], scores=[0.9, 0.5], class_names=["bg", "circle", "square"]
    )
    assert len(patches) == 2 and all(isinstance(p, Rectangle) for p in patches)
    assert patches[0].get_xy() == (1.0, 2.0)
    assert (patches[0].get_width(), patches[0].get_height()) == (10.0, 20.0)
    captions = [t.get_text() for t in ax.texts]
    assert captions == ["circle 0.90", "square 0.50"]


def test_show_mask_draws_padding_white():
    mask = torch.zeros(6, 8, dtype=torch.bool)
    mask[:, 5:] = True
    ax = viz.show_mask(mask)
    data = ax.images[0].get_array()
    assert data[0, 7] == 1.0 and data[0, 0] == 0.0


def test_plot_pe_channels_one_panel_per_channel_and_a_colour_scale():
    fig = viz.plot_pe_channels(torch.zeros(1, 16, 5, 7), channels=[0, 3, 8])
    assert isinstance(fig, Figure) and len(fig.axes) == 3 + 1  # three panels, one colorbar
    assert fig.axes[1].get_title() == "channel 3"
    assert fig.axes[-1].get_ylabel() == "code value"


def test_figures_use_the_notebook_dpi_and_width():
    assert viz.DPI >= 100
    fig, axes = viz.subplots(1, 5)
    assert axes.shape == (1, 5) and fig.dpi == viz.DPI and fig.get_figwidth() == viz.FIG_WIDTH
    viz.use_style()
    assert plt.rcParams["figure.dpi"] == viz.DPI


def _colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_show_attention_maps_blends_each_map_over_the_image_with_its_box_and_a_colorbar():
    image = viz.normalize(torch.rand(3, 64, 96))
    maps = torch.rand(3, 2, 3)
    fig = viz.show_attention_maps(
        image, maps, boxes=torch.tensor([[0, 0, 10, 10]] * 3), titles=["a", "b", "c"]
    )
    panels = [ax for ax in fig.axes if ax not in _colorbars(fig)]
    assert len(panels) == 3 and len(_colorbars(fig)) == 3  # one row, a colour scale per map
    assert [ax.get_title() for ax in panels] == ["a", "b", "c"]
    # the image first, then the map on top of it, semi-transparent, stretched to the image size
    assert [im.get_array().shape[:2] for im in panels[0].images] == [(64, 96), (64, 96)]
    assert 0 < panels[0].images[1].get_alpha() < 1
    assert sum(isinstance(p, Rectangle) for p in panels[1].patches) == 1
    assert fig.get_suptitle()


def test_show_attention_maps_with_stride_puts_each_cell_on_its_pixels():
    image = viz.normalize(torch.rand(3, 40, 56))  # a 3 x 4 grid at stride 16 runs past the image
    fig = viz.show_attention_maps(image, torch.rand(2, 3, 4), stride=16, points=[(1, 1), (2, 2)])
    ax = fig.axes[0]
    assert ax.images[1].get_extent() == [0, 64, 48, 0]
    assert ax.get_xlim() == (0.0, 56.0) and ax.get_ylim() == (40.0, 0.0)  # clipped to the image


def test_show_attention_maps_colab_layout_and_errors():
    image = viz.normalize(torch.rand(3, 64, 96))
    fig = viz.show_attention_maps(image, torch.rand(2, 2, 3), overlay=False)
    assert len(fig.axes) - len(_colorbars(fig)) == 4  # raw map above, image below
    with pytest.raises(ValueError, match="0 maps"):
        viz.show_attention_maps(image, torch.rand(0, 2, 3))


def test_show_attention_upsamples_to_image_size():
    ax = viz.show_attention(
        np.zeros((64, 96, 3), dtype=np.uint8), torch.rand(2, 3), point=(5, 5), box=[1, 1, 9, 9], colorbar=True
    )
    assert ax.images[-1].get_array().shape == (64, 96)
    assert len(ax.patches) == 1 and len(_colorbars(ax.figure)) == 1


def test_feature_grid_recovers_stride():
    assert viz._feature_grid((300, 451), 10 * 15) == (10, 15, 32)
    assert viz._feature_grid((300, 451), 19 * 29) == (19, 29, 16)
    assert viz._feature_grid((64, 64), 4, strides=(32,)) == (2, 2, 32)
    with pytest.raises(ValueError, match="cannot match"):
        viz._feature_grid((300, 451), 7)


def _tiny_detr(**overrides):
    from detr_lite.config import ModelConfig
    from detr_lite.detr import DETR

    torch.manual_seed(0)
    cfg = ModelConfig(
        num_classes=3, backbone="resnet18", frozen_bn=False, hidden_dim=32, nheads=4,
        enc_layers=2, dec_layers=1, dim_feedforward=64, dropout=0.0, num_queries=5, **overrides,
    )  # fmt: skip
    return DETR(cfg).eval()


def test_encoder_attention_is_the_captured_last_layer_on_the_feature_grid():
    from detr_lite.transformer import capture_attention

    model = _tiny_detr()
    image = viz.normalize(torch.rand(3, 64, 96))
    attn = viz.encoder_attention(model, image)
    assert model.backbone.strides == [32]
    assert attn.shape == (2, 3, 2, 3)  # 64x96 at stride 32
    assert torch.allclose(attn.sum(dim=(2, 3)), torch.ones(2, 3), atol=1e-5)
    with torch.no_grad(), capture_attention(model) as rec:
        model(image[None])
    last = rec["transformer.encoder.layers.1.self_attn"][0].mean(0)
    assert torch.allclose(attn.reshape(6, 6), last)
    first = viz.encoder_attention(model, image, layer=0)
    assert torch.allclose(first.reshape(6, 6), rec["transformer.encoder.layers.0.self_attn"][0].mean(0))


def test_encoder_attention_uses_the_model_stride():
    model = _tiny_detr(backbone_layers=("layer3",))  # the toy preset's choice: stride 16
    attn = viz.encoder_attention(model, viz.normalize(torch.rand(3, 64, 96)))
    assert model.backbone.strides == [16] and attn.shape == (4, 6, 4, 6)


def test_attention_explorer_draws_the_cell_under_the_point():
    import ipywidgets

    model = _tiny_detr()
    image = viz.normalize(torch.rand(3, 64, 96))
    box = viz.attention_explorer(model, image)
    assert isinstance(box, ipywidgets.VBox) and box.stride == 32
    fig = box.draw(70, 40)  # pixel (x=70, y=40) lies in feature cell (1, 2)
    panels = [ax for ax in fig.axes if ax not in _colorbars(fig)]
    assert isinstance(fig, Figure) and len(panels) == 1 and len(_colorbars(fig)) == 1
    assert "cell (1, 2)" in panels[0].get_title()
    shown = panels[0].images[-1]
    np.testing.assert_allclose(np.asarray(shown.get_array()), box.attention[1, 2].numpy(), atol=1e-6)
    assert shown.get_extent() == [0, 96, 64, 0]  # 2 x 3 cells of 32 pixels


def test_attention_explorer_has_a_static_grid_of_query_points():
    import base64

    box = viz.attention_explorer(_tiny_detr(), viz.normalize(torch.rand(3, 64, 96)))
    fig = box.draw_grid()
    assert len([ax for ax in fig.axes if ax not in _colorbars(fig)]) == 6  # 2 x 3 query points
    fig = box.draw_grid(points=[(5, 5), (90, 60)], cols=2)
    assert [ax.get_title() for ax in fig.axes if ax not in _colorbars(fig)] == [
        "query point (5, 5)", "query point (90, 60)",
    ]  # fmt: skip
    bundle = box._repr_mimebundle_()  # what a notebook stores: the widget and the picture beside it
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert base64.b64decode(bundle["image/png"]).startswith(b"\x89PNG")


def test_attention_mass_in_boxes_counts_cell_centres():
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 0] = 1.0  # all attention on the top-left cell (centre (8, 8) at stride 16)
    maps[1] = 1 / 16  # uniform
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 32.0, 64.0]])
    mass, share = viz.attention_mass_in_boxes(maps, boxes, stride=16)
    assert mass.tolist() == [1.0, 0.5] and share.tolist() == [1 / 16, 0.5]
    with pytest.raises(ValueError, match="boxes"):
        viz.attention_mass_in_boxes(maps, boxes[:1], stride=16)
