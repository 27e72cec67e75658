# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Backbone and flatten: from an image to a sequence of 256-d tokens
#
# **Learning goal.** Follow one photograph through the first stage of DETR. The DETR process notes
# this walkthrough follows (a one-page outline of the DETR and Deformable DETR pipelines, quoted at the
# top of every notebook as "the process notes") write it as:
#
# > Image (3×H0×W0) → CNN (ResNet) → Feature Map (C×H×W = 2048×H0/32×W0/32) → Conv1×1 → d×H×W
# > (d is smaller than C) → Flatten → d×HW
#
# By the end you can say what shape every tensor has, why DETR needs a *padding mask* when it
# batches images of different sizes, how that mask follows the image down to the feature grid, and
# how the process notes' *sequence-first* `[HW, B, 256]` relates to the package's *batch-first*
# `[B, HW, 256]`. We build each step from torchvision/torch pieces, then check that
# `detr_lite.backbone` computes exactly the same thing with the same weights.

# %%
# %matplotlib inline
import math

import skimage.data
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.transforms import v2

from detr_lite import viz
from detr_lite.backbone import build_backbone
from detr_lite.config import ModelConfig
from detr_lite.data.coco import collate_fn

torch.manual_seed(0)
torch.set_grad_enabled(False)  # this notebook only runs forward passes
viz.use_style()  # the notebooks' figure dpi and font sizes

# %% [markdown]
# ## 1. A real photograph, ImageNet-normalised
#
# The backbone was designed for ImageNet statistics, so every image is turned into a float tensor in
# [0, 1] and then normalised per channel with the ImageNet mean and standard deviation. That is all
# `v2.Normalize` does: `(x - mean) / std`.

# %%
cat_uint8 = skimage.data.chelsea()  # [300, 451, 3] uint8, a photograph bundled with scikit-image
to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
normalize = v2.Normalize(mean=viz.IMAGENET_MEAN, std=viz.IMAGENET_STD)
cat = normalize(to_tensor(cat_uint8))  # [3, H0, W0]

# %%
# NBVAL_CHECK_OUTPUT
H0, W0 = cat.shape[-2:]
print("image:", tuple(cat.shape), " (3 x H0 x W0)")
assert cat.shape == (3, 300, 451)
# normalisation is invertible: viz.denormalize gives back the [0, 1] picture
assert torch.allclose(
    torch.from_numpy(viz.denormalize(cat)).permute(2, 0, 1), to_tensor(cat_uint8), atol=1e-6
)

# %%
ax = viz.show_image(cat, title=f"input 3x{H0}x{W0} (de-normalised for display)")

# %% [markdown]
# ## 2. ResNet-50, layer by layer
#
# DETR uses a plain torchvision ResNet-50 and throws away its classification head (`avgpool`, `fc`).
# Offline we cannot download ImageNet weights, so the network here is **randomly initialised**; the
# shapes are identical. With internet access you would write
# `torchvision.models.resnet50(weights=torchvision.models.ResNet50_Weights.IMAGENET1K_V1)`
# (the package does this when `ModelConfig.pretrained_backbone=True`). DETR also freezes batch-norm
# statistics (`torchvision.ops.FrozenBatchNorm2d`); in `eval()` mode an ordinary `BatchNorm2d`
# computes the same thing, so we just call `eval()`. (The toy model trained on the bundled data
# gets its pretrained weights offline from a pretext task on the training split:
# [notebook 06](06_training_detr.ipynb).)

# %%
resnet = torchvision.models.resnet50(weights=None).eval()
print([name for name, _ in resnet.named_children()])

# %% [markdown]
# The *stem* (7×7 conv stride 2, BN, ReLU, 3×3 max-pool stride 2) divides the resolution by 4;
# `layer1` keeps it, and `layer2`, `layer3`, `layer4` each halve it again: stride 4·2·2·2 = 32.
# Each stride-2 step rounds up, so the final grid is `ceil(H0/32) × ceil(W0/32)`.

# %%
# NBVAL_CHECK_OUTPUT
x = cat[None]  # add the batch dimension: [B=1, 3, H0, W0]
x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
print(f"stem   {tuple(x.shape)}  stride 4")
assert x.shape == (1, 64, math.ceil(H0 / 4), math.ceil(W0 / 4))
stages = {}
for name, channels, stride in [
    ("layer1", 256, 4),
    ("layer2", 512, 8),
    ("layer3", 1024, 16),
    ("layer4", 2048, 32),
]:
    x = getattr(resnet, name)(x)
    stages[name] = x
    print(f"{name} {tuple(x.shape)}  stride {stride}")
    assert x.shape == (1, channels, math.ceil(H0 / stride), math.ceil(W0 / stride))

# %%
# NBVAL_CHECK_OUTPUT
feature_map = stages["layer4"]  # the process notes' "Feature Map": C x H x W = 2048 x H0/32 x W0/32
C, H, W = feature_map.shape[1:]
print("feature map C x H x W =", (C, H, W), " H0/32 =", H0 / 32, " W0/32 =", W0 / 32)
assert (C, H, W) == (2048, math.ceil(H0 / 32), math.ceil(W0 / 32)) == (2048, 10, 15)

# %% [markdown]
# What do 2048 channels of a 10×15 grid look like? Each channel is a coarse map of where one
# (here: random) filter responds. A pretrained network's channels would light up on parts of the cat.

# %%
fig, axes = viz.subplots(1, 5)
viz.show_image(cat, ax=axes[0, 0], title="input image")
for ax, c in zip(axes[0, 1:], [0, 100, 500, 2000]):
    ax.imshow(feature_map[0, c], cmap="viridis")
    ax.set_title(f"channel {c}")
    ax.axis("off")
fig.suptitle("layer4 output (10x15 cells): four of its 2048 channels, each on its own colour scale")

# %% [markdown]
# ## 3. Conv1×1: 2048 → d = 256 channels
#
# The transformer works in a smaller width `d = 256`. A 1×1 convolution is nothing but the same
# linear map `W [d, C]` applied at every pixel; we check that against an explicit `einsum`.

# %%
d = 256
input_proj = torch.nn.Conv2d(C, d, kernel_size=1)
z0 = input_proj(feature_map)  # [1, d, H, W]
by_hand = torch.einsum("dc,bchw->bdhw", input_proj.weight[:, :, 0, 0], feature_map) + input_proj.bias.view(
    1, d, 1, 1
)
assert torch.allclose(z0, by_hand, atol=1e-4)

# %%
# NBVAL_CHECK_OUTPUT
print("z0 = Conv1x1(feature map):", tuple(z0.shape), " (B x d x H x W)")
assert z0.shape == (1, 256, 10, 15)

# %% [markdown]
# ## 4. Flatten: d×H×W → d×HW → a sequence of HW tokens
#
# A transformer consumes a *sequence*. Flattening the two spatial axes turns the grid into HW = 150
# tokens of width 256 (row-major: token `i·W + j` is grid cell `(i, j)`). The official DETR code,
# and the process notes, keep PyTorch's old *sequence-first* layout `[HW, B, d]`; `detr_lite` is
# *batch-first*, `[B, HW, d]`. They hold the same numbers; one `permute` swaps between them.

# %%
# NBVAL_CHECK_OUTPUT
flat = z0.flatten(2)  # [B, d, HW]  -- the process notes' d x HW
seq_first = flat.permute(2, 0, 1)  # [HW, B, d] -- official DETR / process-notes notation
batch_first = flat.transpose(1, 2)  # [B, HW, d] -- detr_lite
print("d x HW     :", tuple(flat.shape))
print("seq-first  :", tuple(seq_first.shape), " [HW, B, 256]")
print("batch-first:", tuple(batch_first.shape), " [B, HW, 256]")
assert flat.shape == (1, 256, 150) and seq_first.shape == (150, 1, 256) and batch_first.shape == (1, 150, 256)
assert torch.equal(seq_first.permute(1, 0, 2), batch_first)
i, j = 3, 7  # grid cell (3, 7) is token 3*W + 7
assert torch.equal(batch_first[0, i * W + j], z0[0, :, i, j])

# %% [markdown]
# ## 5. Batching images of different sizes: padding and the mask
#
# DETR trains on images of many sizes. To stack them into one tensor, every image is copied into the
# top-left corner of a zero canvas as large as the biggest image in the batch; a boolean **mask**
# records which pixels are padding (`True` = padded, the convention of PyTorch's `key_padding_mask`
# and of the whole package). The canvas is zero *after* normalisation, i.e. the ImageNet mean colour:
# that is the grey you see when we de-normalise it for display.

# %%
astronaut = normalize(to_tensor(skimage.data.astronaut()))
astronaut = F.interpolate(astronaut[None], size=(256, 256), mode="bilinear", antialias=True)[0]
images = [cat, astronaut]  # 3x300x451 and 3x256x256


def pad_batch(images):
    """Copy each [3, h, w] image into a zero canvas [B, 3, Hm, Wm]; mask is True on padding."""
    Hm = max(im.shape[1] for im in images)
    Wm = max(im.shape[2] for im in images)
    batch = torch.zeros(len(images), 3, Hm, Wm)
    mask = torch.ones(len(images), Hm, Wm, dtype=torch.bool)
    for b, im in enumerate(images):
        batch[b, :, : im.shape[1], : im.shape[2]] = im
        mask[b, : im.shape[1], : im.shape[2]] = False
    return batch, mask


batch, mask = pad_batch(images)

# %%
# NBVAL_CHECK_OUTPUT
print("batch:", tuple(batch.shape), " mask:", tuple(mask.shape), mask.dtype)
print("padded pixels per image:", mask.flatten(1).sum(1).tolist())
assert batch.shape == (2, 3, 300, 451) and mask.shape == (2, 300, 451)
assert mask[0].sum() == 0 and mask[1].sum() == 300 * 451 - 256 * 256
# the package's data loader batches exactly like this (detr_lite.data.coco.collate_fn)
pkg_batch, pkg_mask, _ = collate_fn([(im, {}) for im in images])
assert torch.equal(pkg_batch, batch) and torch.equal(pkg_mask, mask)

# %%
fig, axes = viz.subplots(1, 4)
for b in range(2):
    viz.show_image(batch[b], ax=axes[0, 2 * b], title=f"padded image {b}")
    viz.show_mask(mask[b], ax=axes[0, 2 * b + 1], title=f"mask {b} (white = pad)")
fig.suptitle("a batch of two images on one 300x451 canvas, and its padding masks")

# %% [markdown]
# The mask has to follow the image to the feature grid, because the transformer must know which
# *tokens* are padding. DETR simply resizes it with nearest-neighbour interpolation to the feature
# map's size.

# %%
# NBVAL_CHECK_OUTPUT
stem = torch.nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
feats = resnet.layer4(resnet.layer3(resnet.layer2(resnet.layer1(stem(batch)))))
feat_mask = F.interpolate(mask[:, None].float(), size=feats.shape[-2:], mode="nearest")[:, 0].bool()
print("features:", tuple(feats.shape), " feature mask:", tuple(feat_mask.shape))
print("padded tokens per image:", feat_mask.flatten(1).sum(1).tolist(), "of", feat_mask[0].numel())
assert feats.shape == (2, 2048, 10, 15) and feat_mask.shape == (2, 10, 15)
# nearest picks source row floor(i * 300/10) and column floor(j * 451/15): rows 0..8 and columns 0..8
# land inside the 256x256 astronaut, so 9 x 9 tokens are real and 150 - 81 = 69 are padding
assert feat_mask.flatten(1).sum(1).tolist() == [0, 150 - 9 * 9]

# %%
fig, axes = viz.subplots(1, 2)
viz.show_mask(mask[1], ax=axes[0, 0], title="image-level mask 300x451")
viz.show_mask(feat_mask[1], ax=axes[0, 1], title="feature-level mask 10x15")
fig.suptitle("image 1's mask, and the same mask on the feature grid (white = pad)")

# %% [markdown]
# The flattened mask `[B, HW]` is what the transformer later receives as `key_padding_mask`.

# %%
# NBVAL_CHECK_OUTPUT
key_padding_mask = feat_mask.flatten(1)
print("key_padding_mask:", tuple(key_padding_mask.shape), " [B, HW]")
assert key_padding_mask.shape == (2, 150)

# %% [markdown]
# ## 6. The DC5 variant: dilation instead of stride in the last stage
#
# DETR-DC5 removes the stride of `layer4` and dilates its convolutions instead, so the receptive
# field stays the same but the feature map is twice as fine (stride 16). That helps small objects,
# and it is expensive: the encoder gets 4× as many tokens, each attending to 4× as many, so encoder
# self-attention costs 16× as much. The paper reports about 2× the compute for the whole model.

# %%
# NBVAL_CHECK_OUTPUT
resnet_dc5 = torchvision.models.resnet50(
    weights=None, replace_stride_with_dilation=[False, False, True]
).eval()
body_dc5 = create_feature_extractor(resnet_dc5, {"layer4": "out"})
feat_dc5 = body_dc5(cat[None])["out"]
print("DC5 feature map:", tuple(feat_dc5.shape), " stride 16")
assert feat_dc5.shape == (1, 2048, math.ceil(H0 / 16), math.ceil(W0 / 16)) == (1, 2048, 19, 29)

# %% [markdown]
# ## 7. The package does the same thing
#
# `detr_lite.backbone.build_backbone` wraps a torchvision ResNet (its submodule `body` keeps the
# torchvision layer names, so official checkpoints load unchanged) and returns, for each requested
# layer, the feature map together with its downsampled mask. We give it our ResNet's weights and
# compare with the hand-built pipeline above, padded batch and mask included.

# %%
cfg = ModelConfig(backbone="resnet50", frozen_bn=True)
backbone = build_backbone(cfg).eval()
weights = {
    k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.") and "num_batches_tracked" not in k
}
backbone.body.load_state_dict(weights)  # strict: every name matches torchvision's

# %%
# NBVAL_CHECK_OUTPUT
[(pkg_feats, pkg_mask)] = backbone(batch, mask)
print("package features:", tuple(pkg_feats.shape), " mask:", tuple(pkg_mask.shape))
print("num_channels:", backbone.num_channels, " strides:", backbone.strides)
# the package runs its convolutions in channels_last memory layout (faster on CPU); the sums are
# accumulated in another order, so we compare up to float rounding relative to the feature scale
assert torch.allclose(pkg_feats, feats, atol=1e-3, rtol=1e-4)
assert torch.equal(pkg_mask, feat_mask)

# %% [markdown]
# `ModelConfig(dilation=True)` gives the DC5 variant: same channels, stride 16.

# %%
# NBVAL_CHECK_OUTPUT
backbone_dc5 = build_backbone(ModelConfig(backbone="resnet50", dilation=True))
print("DC5 num_channels:", backbone_dc5.num_channels, " strides:", backbone_dc5.strides)
assert backbone_dc5.num_channels == [2048] and backbone_dc5.strides == [16]

# %% [markdown]
# ## Summary
#
# * An image is normalised with ImageNet statistics and passed through ResNet-50 without its head:
#   the stem and four stages reduce a 3×H0×W0 image to a **2048 × ⌈H0/32⌉ × ⌈W0/32⌉** feature map
#   (stride 16 with DC5 dilation).
# * A **1×1 convolution** (a per-pixel linear map) reduces 2048 channels to **d = 256**.
# * **Flattening** turns the d×H×W grid into HW tokens: `[B, d, HW]`, i.e. the process notes' d×HW; the
#   official code's sequence-first `[HW, B, 256]` and the package's batch-first `[B, HW, 256]` differ
#   only by `permute(1, 0, 2)`.
# * Batches of different-sized images are **zero-padded** to a common canvas; a boolean **mask**
#   (`True` = pad) is resized with nearest-neighbour interpolation to the feature grid and flattened
#   to the `[B, HW]` `key_padding_mask` the transformer uses.
# * `detr_lite.backbone` computes exactly this (checked with `torch.allclose`).
#
# ## Exercises
#
# 1. Feed an image of size 33×65. Predict the layer4 grid before running it (hint: every stride-2
#    step rounds up).
# 2. Replace `mode="nearest"` in the mask downsampling with `"bilinear"` followed by `> 0.5`. For which
#    image sizes does the padded-token count change?
# 3. Count the parameters of `input_proj` and of ResNet-50 without `fc`. Which one dominates?
# 4. Time `resnet` and `resnet_dc5` on the same image. How much slower is DC5, and how many more
#    tokens does the transformer then have to process?
