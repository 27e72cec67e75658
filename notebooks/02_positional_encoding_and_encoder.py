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
# # 02 · Positional encoding and the transformer encoder
#
# **Learning goal.** The encoder stage of the process notes ([notebook 01](01_backbone_and_flatten.ipynb)):
#
# > Input: Img_Feature (d×HW) + PE (d×HW). 1 Multi-head self-attention with Q = K = Img_Feature + PE,
# > V = Img_Feature → 2 Add + LayerNorm → 3 FFN → 4 Add + LayerNorm. Output d×HW. Repeated 6 times.
#
# Attention treats its inputs as a *set*: shuffle the HW tokens and the outputs shuffle with them. The
# image's 2-D layout therefore has to be written into the tokens, by adding a **positional encoding
# (PE)**. We build DETR's sine encoding by hand and check it against
# `detr_lite.position_encoding.PositionEmbeddingSine`; then we build one encoder layer from matrix
# multiplies, softmax and layer norm, and check it against `detr_lite.transformer.TransformerEncoderLayer`
# with the same weights, in both of the official arrangements (post-norm and pre-norm). Finally we
# *look* at encoder self-attention on a real image, first with an untrained model, then with the toy
# DETR trained on the bundled shapes data, and measure how much of it falls on the objects.

# %%
# %matplotlib inline
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert

from detr_lite import viz
from detr_lite.checkpoint import load_checkpoint
from detr_lite.config import get_config
from detr_lite.data.coco import build_dataset
from detr_lite.data.shapes import SHAPE_CLASSES
from detr_lite.models import build_model
from detr_lite.position_encoding import PositionEmbeddingSine
from detr_lite.transformer import TransformerEncoderLayer, capture_attention

torch.manual_seed(0)
torch.set_grad_enabled(False)  # these notebooks only run forward passes
viz.use_style()  # the notebooks' figure dpi and font sizes

# %% [markdown]
# ## 1. The sine positional encoding, by hand
#
# We start from the padding mask of notebook 01, at feature-grid resolution: a batch of two images
# on a 6×8 grid, the second one only 4×5 real cells (`True` = padded).

# %%
# NBVAL_CHECK_OUTPUT
B, h, w = 2, 6, 8
mask = torch.zeros(B, h, w, dtype=torch.bool)
mask[1, 4:, :] = True  # image 1 is 4 rows ...
mask[1, :, 5:] = True  # ... by 5 columns
print("mask:", tuple(mask.shape), " real cells per image:", (~mask).flatten(1).sum(1).tolist())
assert (~mask).flatten(1).sum(1).tolist() == [48, 20]

# %% [markdown]
# **Step 1: coordinates.** A running count of *real* cells down each column gives the row coordinate
# `y = 1, 2, …`; along each row it gives `x`. Padding does not advance the count.

# %%
# NBVAL_CHECK_OUTPUT
not_mask = ~mask
y_embed = not_mask.cumsum(dim=1, dtype=torch.float32)  # [B, h, w]
x_embed = not_mask.cumsum(dim=2, dtype=torch.float32)
print("y of image 1:\n", y_embed[1].int())
print("x of image 1:\n", x_embed[1].int())

# %% [markdown]
# **Step 2: normalise** each coordinate by the image's own extent (the last row's / column's count)
# and scale to (0, 2π]. A small image and a large image now both span the same range, so the
# encoding describes *relative* position in the image.

# %%
eps, scale = 1e-6, 2 * math.pi
y_norm = y_embed / (y_embed[:, -1:, :] + eps) * scale
x_norm = x_embed / (x_embed[:, :, -1:] + eps) * scale
assert torch.allclose(y_norm[1, 3, 0], torch.tensor(scale)) and torch.allclose(
    x_norm[1, 0, 4], torch.tensor(scale)
)

# %% [markdown]
# **Step 3: frequencies.** With `F = 128` features per axis and temperature `T = 10000`, feature `i`
# divides the coordinate by `T^(2·⌊i/2⌋ / F)`: pairs of features share a frequency, from 1 (fast) down
# to almost 1/T (slow). Even features take the sine, odd features the cosine of their angle.

# %%
num_pos_feats, temperature = 128, 10000
i = torch.arange(num_pos_feats, dtype=torch.float32)
dim_t = temperature ** (2 * (i // 2) / num_pos_feats)  # [128]: 1, 1, T^(2/128), T^(2/128), ...


def sine_code(coord):
    """[B, h, w] coordinates -> [B, h, w, 128]: sin on even features, cos on odd, interleaved."""
    angles = coord[..., None] / dim_t
    code = torch.empty_like(angles)
    code[..., 0::2] = angles[..., 0::2].sin()
    code[..., 1::2] = angles[..., 1::2].cos()
    return code


# %% [markdown]
# **Step 4: concatenate** the row code and the column code, `cat(pos_y, pos_x)`, and move the
# feature axis in front like a feature map: `[B, 256, h, w]`, the same shape as the projected
# features it will be added to.

# %%
# NBVAL_CHECK_OUTPUT
pos = torch.cat([sine_code(y_norm), sine_code(x_norm)], dim=-1).permute(0, 3, 1, 2)
print("pos:", tuple(pos.shape), " [B, 2F = 256, h, w]")
assert pos.shape == (2, 256, 6, 8)

# %% [markdown]
# The package's `PositionEmbeddingSine` must produce exactly this.

# %%
pe = PositionEmbeddingSine(num_pos_feats=128, temperature=10000, normalize=True, scale=2 * math.pi)
assert torch.allclose(pe(mask), pos, atol=1e-6)

# %% [markdown]
# Because the coordinates count only real cells and are normalised by the real extent, the padded
# 4×5 image gets **the same code** as the same image on its own, unpadded: padding never shifts
# positions.

# %%
alone = pe(torch.zeros(1, 4, 5, dtype=torch.bool))
assert torch.allclose(pos[1, :, :4, :5], alone[0], atol=1e-6)

# %% [markdown]
# What the channels look like on a larger 20×30 grid: channels 0–127 encode the row (they vary down
# the image), 128–255 the column; low channel indices oscillate quickly, high ones slowly.

# %%
big = pe(torch.zeros(1, 20, 30, dtype=torch.bool))[0]  # [256, 20, 30]
channels = [0, 1, 20, 128, 129, 148]
names = ["y sin f0", "y cos f0", "y sin f10", "x sin f0", "x cos f0", "x sin f10"]
fig = viz.plot_pe_channels(big, channels, titles=names)
# %% [markdown]
# What matters to attention is the *dot product* between codes. The dot product of one position's
# 256-d code with every other position's peaks at the position itself and falls off with distance,
# in both directions: exactly the "where am I relative to you" signal attention needs.

# %%
flat = big.flatten(1).T  # [600, 256]
points = [(3, 4), (10, 15), (17, 27)]
sims = [(flat @ flat[r * 30 + c]).view(20, 30) for r, c in points]  # one shared colour scale
lo, hi = min(float(m.min()) for m in sims), max(float(m.max()) for m in sims)
fig, axes = viz.subplots(1, 3)
for ax, (r, c), sim in zip(axes[0], points, sims):
    im = ax.imshow(sim, cmap="viridis", vmin=lo, vmax=hi)
    ax.plot([c], [r], "r+", markersize=8)
    ax.set_title(f"position ({r}, {c}) (red +)")
    ax.axis("off")
fig.colorbar(im, ax=list(axes[0]), fraction=0.02, pad=0.01, label="dot product")
fig.suptitle("dot product of one position's code with every position's code, 20x30 grid")

# %% [markdown]
# ### The temperature on a small grid
#
# The wavelengths run from 2π up to 2π·T (T = 10000 officially). On COCO's ~25×38 grids that is fine,
# but the toy model's images give grids of only about 6×9 to 10×15 cells at stride 16: with
# T = 10000 most of the 64 frequencies per axis barely change across the whole grid, so they carry
# almost no position. The `detr-shapes` preset sets `pe_temperature = 20` (as Conditional and
# DAB-DETR do), which keeps every channel informative. Count the channels whose value moves by more
# than 0.1 across a 7×10 grid (a typical training image) and across the 10×15 grid of a validation
# image:

# %%
# NBVAL_CHECK_OUTPUT
moving = {}
for gh, gw in [(7, 10), (10, 15)]:
    small_grid = torch.zeros(1, gh, gw, dtype=torch.bool)
    for temperature in (10000, 20):
        code = PositionEmbeddingSine(64, temperature=temperature)(small_grid)[0]  # d = 128, the toy's
        moving[gh, gw, temperature] = n = int(((code.amax((1, 2)) - code.amin((1, 2))) > 0.1).sum())
        print(f"T = {temperature:5d}: {n:3d} of {code.shape[0]} channels vary by > 0.1 over a {gh}x{gw} grid")
    assert moving[gh, gw, 20] > 2 * moving[gh, gw, 10000]

# %% [markdown]
# ## 2. One encoder layer, from primitives
#
# The layer has four steps (post-norm, as in DETR): multi-head self-attention with `q = k = src + pos`
# and `v = src`; add & LayerNorm; a two-layer ReLU FFN (256 → 2048 → 256); add & LayerNorm. We use the
# batch-first token layout of the package: `src`, `pos` `[B, HW, d]` and the flattened padding mask
# `[B, HW]`.

# %%
# NBVAL_CHECK_OUTPUT
d, nhead, dim_ff = 256, 8, 2048
HW = h * w
src = torch.randn(B, HW, d)  # stand-in for projected, flattened features
pos_tokens = pos.flatten(2).transpose(1, 2)  # [B, 256, h, w] -> [B, HW, 256]
key_padding_mask = mask.flatten(1)  # [B, HW]
print(
    "src:",
    tuple(src.shape),
    " pos:",
    tuple(pos_tokens.shape),
    " key_padding_mask:",
    tuple(key_padding_mask.shape),
)
assert src.shape == pos_tokens.shape == (2, 48, 256) and key_padding_mask.shape == (2, 48)

# %% [markdown]
# The weights, named as in the official checkpoints (and in `torch.nn.MultiheadAttention`): one
# stacked `in_proj_weight` `[3d, d]` holds W_q, W_k, W_v; `out_proj` mixes the heads back together.
# We draw them at random, including the LayerNorm scales, so that the comparison below is not trivial.


# %%
def rand(*shape, s=0.05):
    return torch.randn(*shape) * s


W = {
    "self_attn.in_proj_weight": rand(3 * d, d), "self_attn.in_proj_bias": rand(3 * d),
    "self_attn.out_proj.weight": rand(d, d), "self_attn.out_proj.bias": rand(d),
    "linear1.weight": rand(dim_ff, d), "linear1.bias": rand(dim_ff),
    "linear2.weight": rand(d, dim_ff), "linear2.bias": rand(d),
    "norm1.weight": 1 + rand(d), "norm1.bias": rand(d),
    "norm2.weight": 1 + rand(d), "norm2.bias": rand(d),
}  # fmt: skip

# %% [markdown]
# **Multi-head attention.** Project to q, k, v; split d = 256 into 8 heads of 32; in every head,
# `softmax(q kᵀ / √32)` over the keys (padded keys set to −∞ first, so they get weight exactly 0);
# weight the values; concatenate the heads; project with `out_proj`.


# %%
def multi_head_attention(query, key, value, W, prefix, nhead, key_padding_mask=None):
    """Returns (output [B, Lq, d], attention weights [B, nhead, Lq, Lk])."""
    Wq, Wk, Wv = W[prefix + "in_proj_weight"].chunk(3)
    bq, bk, bv = W[prefix + "in_proj_bias"].chunk(3)
    Bn, Lq, dm = query.shape
    Lk, dh = key.shape[1], dm // nhead
    q = (query @ Wq.T + bq).view(Bn, Lq, nhead, dh).transpose(1, 2)  # [B, heads, Lq, dh]
    k = (key @ Wk.T + bk).view(Bn, Lk, nhead, dh).transpose(1, 2)
    v = (value @ Wv.T + bv).view(Bn, Lk, nhead, dh).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(dh)  # [B, heads, Lq, Lk]
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    weights = scores.softmax(dim=-1)
    heads = (weights @ v).transpose(1, 2).reshape(Bn, Lq, dm)  # concatenate the heads
    return heads @ W[prefix + "out_proj.weight"].T + W[prefix + "out_proj.bias"], weights


# %%
# NBVAL_CHECK_OUTPUT
q = k = src + pos_tokens
attn_out, attn_w = multi_head_attention(q, k, src, W, "self_attn.", nhead, key_padding_mask)
print("attention output:", tuple(attn_out.shape), " weights:", tuple(attn_w.shape), " [B, heads, HW, HW]")
assert attn_out.shape == (2, 48, 256) and attn_w.shape == (2, 8, 48, 48)
assert torch.allclose(attn_w.sum(-1), torch.ones(2, 8, 48))  # each query's weights sum to 1

# %% [markdown]
# The padding mask at work: in image 1, every query gives the 28 padded keys weight **exactly 0**,
# so whatever sits in padded tokens cannot leak into real ones.

# %%
# NBVAL_CHECK_OUTPUT
pad = key_padding_mask[1]
print("padded keys in image 1:", int(pad.sum()), " largest weight on them:", attn_w[1][..., pad].max().item())
assert (attn_w[1][..., pad] == 0).all()
garbage = src.clone()
garbage[1, pad] = 1e3 * torch.randn(int(pad.sum()), d)  # scribble over the padded tokens
out2, _ = multi_head_attention(
    garbage + pos_tokens, garbage + pos_tokens, garbage, W, "self_attn.", nhead, key_padding_mask
)
assert torch.allclose(out2[1, ~pad], attn_out[1, ~pad], atol=1e-5)

# %% [markdown]
# **Add & norm, FFN, add & norm.** LayerNorm normalises each token over its 256 features (mean 0,
# variance 1, biased variance, eps 1e-5) and then scales and shifts them.


# %%
def layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


assert torch.allclose(
    layer_norm(src, W["norm1.weight"], W["norm1.bias"]),
    F.layer_norm(src, (d,), W["norm1.weight"], W["norm1.bias"]),
    atol=1e-5,
)


def encoder_layer(src, pos, key_padding_mask, W, nhead):
    q = k = src + pos
    attn, _ = multi_head_attention(q, k, src, W, "self_attn.", nhead, key_padding_mask)
    src = layer_norm(src + attn, W["norm1.weight"], W["norm1.bias"])  # add & norm
    hidden = torch.relu(src @ W["linear1.weight"].T + W["linear1.bias"])  # FFN: 256 -> 2048 -> 256
    ffn = hidden @ W["linear2.weight"].T + W["linear2.bias"]
    return layer_norm(src + ffn, W["norm2.weight"], W["norm2.bias"])  # add & norm


# %%
# NBVAL_CHECK_OUTPUT
memory = encoder_layer(src, pos_tokens, key_padding_mask, W, nhead)
print("encoder layer output:", tuple(memory.shape), " (same shape as its input: d x HW per image)")
assert memory.shape == src.shape

# %% [markdown]
# ### The package's layer, same weights
#
# `TransformerEncoderLayer` uses the official parameter names, so our dictionary loads into it
# strictly. (Dropout is 0.1 in training; `eval()` switches it off.)

# %%
layer = TransformerEncoderLayer(d_model=d, nhead=nhead, dim_feedforward=dim_ff, dropout=0.1).eval()
layer.load_state_dict(W)  # strict: every name matches
assert torch.allclose(layer(src, pos_tokens, key_padding_mask), memory, atol=1e-5)

# %% [markdown]
# **Pre-norm.** The official code has a second arrangement, `--pre_norm`: normalise *before* each
# sub-layer and add its output to the untouched input, `x + f(norm(x))`, so the residual stream is
# never normalised (the encoder then ends with one final LayerNorm). It trains more stably from
# scratch; the toy preset uses it. Same weights, by hand and in the package:


# %%
def encoder_layer_pre_norm(src, pos, key_padding_mask, W, nhead):
    x = layer_norm(src, W["norm1.weight"], W["norm1.bias"])
    attn, _ = multi_head_attention(x + pos, x + pos, x, W, "self_attn.", nhead, key_padding_mask)
    src = src + attn  # the residual stream itself is never normalised
    x = layer_norm(src, W["norm2.weight"], W["norm2.bias"])
    return (
        src
        + torch.relu(x @ W["linear1.weight"].T + W["linear1.bias"]) @ W["linear2.weight"].T
        + W["linear2.bias"]
    )


pre_layer = TransformerEncoderLayer(d, nhead, dim_ff, dropout=0.1, pre_norm=True).eval()
pre_layer.load_state_dict(W)
assert torch.allclose(
    pre_layer(src, pos_tokens, key_padding_mask),
    encoder_layer_pre_norm(src, pos_tokens, key_padding_mask, W, nhead),
    atol=1e-5,
)
print("pre-norm layer by hand == TransformerEncoderLayer(pre_norm=True)")

# %% [markdown]
# The official DETR code calls PyTorch's `nn.MultiheadAttention` in the **sequence-first** layout,
# `[HW, B, 256]`. Same weights, transposed inputs, transposed-back output, same numbers:

# %%
# NBVAL_CHECK_OUTPUT
torch_mha = torch.nn.MultiheadAttention(d, nhead).eval()  # batch_first=False: [L, B, d]
torch_mha.load_state_dict(
    {k.removeprefix("self_attn."): v for k, v in W.items() if k.startswith("self_attn.")}
)
q_seq = q.transpose(0, 1)  # [B, HW, d] -> [HW, B, d]
out_seq, _ = torch_mha(q_seq, q_seq, src.transpose(0, 1), key_padding_mask=key_padding_mask)
print("seq-first q:", tuple(q_seq.shape), " [HW, B, 256];  output:", tuple(out_seq.shape))
assert torch.allclose(out_seq.transpose(0, 1), attn_out, atol=1e-5)

# %% [markdown]
# ## 3. Looking at encoder self-attention on an image
#
# `detr_lite.transformer.capture_attention(model)` is a context manager: inside it, every attention
# layer also records its weights `[B, heads, Lq, Lk]` under its module name. We use the toy DETR
# configuration of the bundled data (`detr-shapes`: ResNet-18 cut after `layer3`, so stride 16 and
# 256 channels; d = 128; 3 + 3 layers; 10 queries) and a validation image at the validation size,
# short side 160 px, so this 160×240 image becomes a 10×15 grid of 150 tokens.

# %%
cfg = get_config("detr-shapes")
val = build_dataset("../data/shapes", "val2017", cfg.data, train=False)
image, target = val[3]
model = build_model(cfg.model).eval()  # UNTRAINED: random weights

# %%
# NBVAL_CHECK_OUTPUT
with capture_attention(model) as attn:
    model(image[None])
H_img, W_img = image.shape[-2:]
stride = model.backbone.strides[-1]  # 16 for the toy model
grid = (math.ceil(H_img / stride), math.ceil(W_img / stride))
for name, weights in attn.items():
    if "encoder" in name:
        print(f"{name:40s} {tuple(weights.shape)}")
print("image", (H_img, W_img), f"-> feature grid {grid} at stride {stride}")
assert attn["transformer.encoder.layers.2.self_attn"].shape == (1, 8, grid[0] * grid[1], grid[0] * grid[1])

# %% [markdown]
# We pick the feature cells under the centres of the image's objects and show, for each, the
# last encoder layer's attention (heads averaged), upsampled and laid over the image (bright = high
# weight; the dot marks the asking cell): `viz.encoder_attention` reshapes the captured `[HW, HW]`
# weights into `[h, w, h, w]`. So that we do not only eyeball, `viz.attention_mass_in_boxes` measures
# how much of each map falls on the object's own box, next to what uniform attention would put there
# (the fraction of grid cells inside the box). A table then divides each cell's share on *every*
# object's box by that box's uniform share: 1 = uniform, the diagonal = the cell's own object.

# %%
boxes = target["boxes"] * torch.tensor([W_img, H_img, W_img, H_img])  # normalised cxcywh -> pixels
centres = [(float(cx), float(cy)) for cx, cy, _, _ in boxes]
names = [SHAPE_CLASSES[int(lab) - 1] for lab in target["labels"]]
boxes_xyxy = box_convert(boxes, "cxcywh", "xyxy")


def cells_at_points(attn, points, stride):
    """The maps [n, h, w] of the feature cells under the given (x, y) pixels, from attn [h, w, h, w]."""
    gh, gw = attn.shape[:2]
    return torch.stack(
        [attn[min(int(y) // stride, gh - 1), min(int(x) // stride, gw - 1)] for x, y in points]
    )


def attention_at_points(model, image, points):
    """Last-layer encoder attention [n, h, w] of the feature cells under the given (x, y) pixels."""
    return cells_at_points(viz.encoder_attention(model, image), points, model.backbone.strides[-1])


def show_encoder_attention(model, label):
    """Draw the chosen cells' encoder attention and print the share of it on each object's box."""
    maps = attention_at_points(model, image, centres)
    s = model.backbone.strides[-1]
    fig = viz.show_attention_maps(
        image, maps, points=centres, titles=[f"{label}: cell on the {n}" for n in names], stride=s,
        suptitle=f"{label} encoder, last layer: what the cell under each dot attends to",
    )  # fmt: skip
    on_box, uniform = viz.attention_mass_in_boxes(maps, boxes_xyxy, s)
    print(
        f"{label + ':':10} attention on own box",
        [round(v, 2) for v in on_box.tolist()],
        "| uniform would give",
        [round(v, 2) for v in uniform.tolist()],
    )
    # on_every[i, j]: share of the map of the cell on object i that falls on object j's box
    on_every = torch.stack(
        [viz.attention_mass_in_boxes(maps, b.expand(len(maps), 4), s)[0] for b in boxes_xyxy], 1
    )
    cols = [f"{j}:{n}" for j, n in enumerate(names)]
    print(f"{'':10} share on each box / uniform share (row: the cell on object i, column: box j)")
    print(f"{'':10} {'':>9} " + " ".join(f"{c:>9}" for c in cols))
    for c, row in zip(cols, on_every / uniform):
        print(f"{'':10} {c:>9} " + " ".join(f"{v:9.1f}" for v in row.tolist()))
    return fig


fig = show_encoder_attention(model, "untrained")

# %% [markdown]
# Untrained, the maps have nothing to do with the objects, they hardly depend on which cell is
# asking, and the share of attention on each object's box is what uniform attention would give (every
# entry of the table is about 1).
#
# Now the **trained** toy DETR, `data/checkpoints/detr_shapes.pt` ([notebook 06](06_training_detr.ipynb)
# shows how it is trained and how well it detects). Its encoder is the **pre-norm** variant with sine
# temperature **T = 20**, not the post-norm layer with T = 10000 we built above (both are options of
# the same code: `pre_norm`, `pe_temperature`).

# %%
trained, trained_cfg, ckpt = load_checkpoint("../data/checkpoints/detr_shapes.pt")
fig = show_encoder_attention(trained, "trained")

# %% [markdown]
# Training has changed the maps, and they now depend on which cell asks. The cells on the two small
# objects put about 5–6× the uniform share on their own box (the diagonal of the table: 5.8 on the
# circle, 4.8 on the small square), yet most of their attention still lies elsewhere, and each puts
# almost as much on the *other* small object's box (4.7× and 4.9×): on this image the strongest
# weights mark "the small shapes" for cells on small objects and "the large square" for cells on
# large ones, more than "my own object". For the two large objects the measure cannot tell much: the
# cross's box covers about two thirds of the grid, so even uniform attention puts most weight inside.
#
# One image is an anecdote. The same measure over the objects of the first 40 validation images,
# split by how much of the grid an object's box covers, untrained versus trained. To separate
# "attends to its own object" from "every cell attends to the objects", we also put the map averaged
# over *all* cells of the image (any cell) on each box:


# %%
def mass_on_boxes(model, images):
    """For every object: the share on its box of its centre cell's attention, of the map averaged
    over all cells of the image, and of uniform attention."""
    own, any_cell, uniform = [], [], []
    s = model.backbone.strides[-1]
    for img, tgt in images:
        if len(tgt["boxes"]) == 0:
            continue
        H, W = img.shape[-2:]
        bxs = tgt["boxes"] * torch.tensor([W, H, W, H])
        attn = viz.encoder_attention(model, img)  # [h, w, h, w]
        maps = cells_at_points(attn, [(float(cx), float(cy)) for cx, cy, _, _ in bxs], s)
        mean_map = attn.flatten(0, 1).mean(0).expand_as(maps)  # what an average cell looks at
        on, uni = viz.attention_mass_in_boxes(maps, box_convert(bxs, "cxcywh", "xyxy"), s)
        own.append(on)
        any_cell.append(viz.attention_mass_in_boxes(mean_map, box_convert(bxs, "cxcywh", "xyxy"), s)[0])
        uniform.append(uni)
    return torch.cat(own), torch.cat(any_cell), torch.cat(uniform)


images40 = [val[i] for i in range(40)]
ratio = {}
for label, m in [("untrained", model), ("trained", trained)]:
    own, any_cell, uniform = mass_on_boxes(m, images40)
    for group, sel in [
        ("box < 20% of grid", (uniform > 0) & (uniform < 0.2)),
        ("box >= 20% of grid", uniform >= 0.2),
    ]:
        o, a, u = own[sel].mean(), any_cell[sel].mean(), uniform[sel].mean()
        ratio[label, group] = float(o / u)
        ratio[label, group, "any"] = float(o / a)
        print(
            f"{label:9} {group:18} ({int(sel.sum()):2d} objects): own cell {o:.3f}  any cell {a:.3f}"
            f"  uniform {u:.3f} | own/uniform {o / u:.2f}  own/any {o / a:.2f}"
        )
assert ratio["trained", "box < 20% of grid"] > 1.3  # measured 2.42: clearly more than uniform
assert ratio["trained", "box < 20% of grid", "any"] > 1.3  # measured 2.06: more than an average cell
assert ratio["untrained", "box < 20% of grid"] < 1.2  # measured 1.01: about uniform

# %% [markdown]
# For the smaller objects, the trained encoder's cell at an object's centre puts about 2.4× the
# uniform share of its attention on that object's box (0.166 against 0.068), while an average cell
# of the same image puts only about 1.2× the uniform share there (0.081): over many images the extra
# attention comes mostly from the object's own cell. The untrained encoder shows neither (1.01 and
# 1.00). For the large objects the own-cell share stays close to uniform (1.17×). So the encoder has
# learned some *per-object* grouping, but far less than a converged DETR, where a cell on an object
# attends to that object's own extent (Fig. 3 of the DETR paper). Dense attention, spread over all
# HW keys at the start, needs very long training to focus (DETR trains 500 epochs on COCO); that slow
# convergence is what Deformable DETR (notebooks 07 and 08) attacks by attending to a few sampled
# points only.

# %% [markdown]
# ## Summary
#
# * Attention is order-blind, so DETR **adds a positional encoding** to queries and keys (not values).
#   The sine encoding counts real cells (`cumsum(~mask)`), normalises by the image's own extent to
#   (0, 2π], divides by 64 frequencies `T^(2⌊i/2⌋/128)`, takes interleaved sin/cos and concatenates
#   row and column codes: `[B, 256, h, w]`. Padding never shifts it.
# * The **temperature** T sets the slowest wavelength: on 7×10 to 10×15 grids about 50 of 128
#   channels vary with T = 10000, 122 with T = 20.
# * An **encoder layer** = self-attention (`q = k = src + pos`, `v = src`) → add & norm → FFN → add &
#   norm, `[B, HW, 256]` in and out; **pre-norm** `x + f(norm(x))` is the official alternative. The
#   official sequence-first `[HW, B, 256]` is the same computation transposed.
# * The **key padding mask** gives padded keys weight exactly 0.
# * Our versions from primitives equal `PositionEmbeddingSine` and `TransformerEncoderLayer`.
# * `capture_attention` records every attention map without hooks. In the trained toy DETR, cells on
#   small objects put about 2.4× the uniform share of their attention on their own box, measured with
#   `viz.attention_mass_in_boxes`: a start, far from the per-object maps of a converged DETR.
#
# ## Exercises
#
# 1. Set `normalize=False` in `PositionEmbeddingSine`. Does the padded 4×5 image still get the same
#    code as the unpadded one? Why does DETR normalise?
# 2. Shuffle the tokens of `src` and `pos_tokens` with the same permutation: show that the encoder
#    layer's output is shuffled the same way. What happens if you shuffle only `src`?
# 3. Compute the similarity map of section 1 with only the first 16 channels of each axis, then with
#    only the last 16. Which ones carry coarse and which fine position?
# 4. Show each of the 8 heads of the trained model's last encoder layer separately for one point.
#    Do different heads look at different things? Which heads put the weight on the image borders?
# 5. Repeat the 40-image measurement for the first and second encoder layers (pass `layer=0` or
#    `layer=1` to `viz.encoder_attention` in `mass_on_boxes`). Does the grouping on the smaller
#    objects grow from layer to layer?
# 6. In Jupyter, run `viz.attention_explorer(trained, image)` and move the point over the image. How
#    much does the map change? Try the same with `model` (untrained).
