# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 · Deformable DETR: multi-scale features, reference points, and faster convergence
#
# **Learning goal.** Put notebook 07's operator into a detector and see what changes compared with
# DETR (notebooks 01–06). The seed notes list the stages:
#
# > **Backbone**: output several intermediate CNN (ResNet) feature maps.
# > **Pre-transformer**: reorganise the multi-level feature maps into one `bs, num_query, num_embed`
# > tensor, `feat_flatten`, the encoder input.
# > **Encoder**: generate reference points (essentially a uniform grid); MSDeformAttn self-attention
# > with Q = feat_flatten + position code, K and V = feat_flatten; repeat 6 times → `memory`.
# > **Decoder**: object-query self-attention, then cross-attention from the queries into `memory`.
#
# We follow one padded batch of two bundled validation images through the **shipped toy model**
# (`data/checkpoints/deformable_shapes.pt`) and rebuild each stage by hand with the model's own weights:
#
# 1. the pyramid: four levels at strides 8–64, each projected to `d` channels;
# 2. position codes + **level embeddings**, flattened into one sequence;
# 3. **valid ratios**: how much of each padded level is real image;
# 4. the encoder's **reference points** (cell centres);
# 5. the decoder's reference points, and how the predicted boxes are expressed relative to them;
# 6. the trained model's detections with each query's **sampling points**;
# 7. the **convergence study**: AP per epoch of the toy DETR and the toy Deformable DETR.

# %%
# %matplotlib inline
import dataclasses
import json
import math
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert

from detr_lite import viz
from detr_lite.checkpoint import load_checkpoint
from detr_lite.data.coco import build_dataset, collate_fn
from detr_lite.deformable.model import PostProcess
from detr_lite.deformable.transformer import get_valid_ratio, inverse_sigmoid
from detr_lite.position_encoding import PositionEmbeddingSine

torch.manual_seed(0)
torch.set_grad_enabled(False)  # inference only
notebook_start = time.perf_counter()

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
DATA = ROOT / "data" / "shapes"
CKPT_DIR = ROOT / "data" / "checkpoints"

# %% [markdown]
# ## 0. The shipped model and a padded batch
#
# The toy preset `deformable-shapes` keeps the official architecture but shrinks it to train on a
# CPU: ResNet-18, `d = 128`, 3 encoder + 3 decoder layers, 4 levels × 8 heads × 4 points, focal loss
# over the 5 shape classes. Its recipe and metrics are in `data/checkpoints/deformable_shapes.md`.

# %%
model, cfg, ckpt = load_checkpoint(CKPT_DIR / "deformable_shapes.pt")
mcfg = cfg.model
d = mcfg.hidden_dim
val = build_dataset(DATA, "val2017", cfg.data, train=False)
class_names = {c["id"]: c["name"] for c in val.coco.dataset["categories"]}
print(
    f"preset {cfg.name}: backbone {mcfg.backbone}, d={d}, levels={mcfg.num_feature_levels}, "
    f"heads={mcfg.nheads}, points={mcfg.enc_n_points}/{mcfg.dec_n_points}, queries={mcfg.num_queries}, "
    f"box refinement={mcfg.with_box_refine}, two-stage={mcfg.two_stage}"
)
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; classes {class_names}")

# %% [markdown]
# Two validation images of different shapes (one wide, one tall) make a batch; `collate_fn` pads them
# bottom/right to a common size and returns the padding mask (True = padded).


# %%
def image_hw(i: int) -> tuple[int, int]:
    info = val.coco.imgs[val.ids[i]]
    return info["height"], info["width"]


wide = next(i for i in range(len(val)) if image_hw(i)[1] > image_hw(i)[0])
tall = next(i for i in range(len(val)) if image_hw(i)[0] > image_hw(i)[1])
images, mask, targets = collate_fn([val[wide], val[tall]])
B, _, H, W = images.shape

# %%
# NBVAL_CHECK_OUTPUT
print("images", tuple(images.shape), " mask", tuple(mask.shape), " (True = padded)")
for b, t in enumerate(targets):
    h, w = t["size"].tolist()
    print(f"image {b}: {h} x {w} inside the padded {H} x {W}")
    assert not mask[b, :h, :w].any() and mask[b].sum() == H * W - h * w
assert images.shape == (2, 3, H, W) and mask.shape == (2, H, W)

# %% [markdown]
# ## 1. The pyramid: backbone maps plus extra stride-2 levels
#
# DETR reads one backbone map. Deformable DETR officially takes the outputs of ResNet stages 2, 3
# and 4 (C3, C4, C5 at strides 8, 16, 32), projects each to `d` channels with a 1×1 convolution +
# GroupNorm(32, d), and adds a fourth, stride-64 level with a 3×3 stride-2 convolution on the raw C5
# map (+ GroupNorm). The toy preset keeps the four strides 8, 16, 32, 64 but builds them from C3, C4
# and **two** stride-2 convolutions (the first on the raw C4 map, the second on the level before):
# on ~112-pixel images C5 has only 4×4 cells, and dropping ResNet-18's `layer4` (8.4 M of its 11.2 M
# parameters) keeps the shipped checkpoint small. Each level's padding mask is the image mask
# resized (nearest) to the level's size.

# %%
stage_names = {"layer2": "C3 (layer2)", "layer3": "C4 (layer3)", "layer4": "C5 (layer4)"}
feats = model.backbone(images, mask)  # one (feature map, mask) per backbone stage
n_backbone = len(feats)
srcs_by_hand, masks_by_hand, sources = [], [], []
for lvl, (feat, m) in enumerate(feats):  # backbone maps: 1x1 conv (C_l -> d) + GroupNorm
    conv, gn = model.input_proj[lvl]
    x = F.conv2d(feat, conv.weight, conv.bias)
    srcs_by_hand.append(F.group_norm(x, 32, gn.weight, gn.bias, gn.eps))
    masks_by_hand.append(m)
    sources.append((stage_names[model.backbone.return_layers[lvl]], feat.shape[1]))
for lvl in range(n_backbone, mcfg.num_feature_levels):  # extra levels: 3x3 stride-2 conv + GroupNorm
    conv, gn = model.input_proj[lvl]
    first_extra = lvl == n_backbone
    x_in = feats[-1][0] if first_extra else srcs_by_hand[-1]  # the first reads the raw last backbone map
    x = F.conv2d(x_in, conv.weight, conv.bias, stride=2, padding=1)
    srcs_by_hand.append(F.group_norm(x, 32, gn.weight, gn.bias, gn.eps))
    masks_by_hand.append(F.interpolate(mask[None].float(), size=x.shape[-2:]).bool()[0])
    source = f"3x3/2 on {sources[n_backbone - 1][0][:2]}" if first_extra else f"3x3/2 on level {lvl - 1}"
    sources.append((source, x_in.shape[1]))
n_levels = len(srcs_by_hand)

# %%
# NBVAL_CHECK_OUTPUT
strides = model.backbone.strides + [
    model.backbone.strides[-1] * 2 ** (k + 1) for k in range(n_levels - n_backbone)
]
print("level  source            stride   C_in ->  d   H_l x W_l")
for lvl, (source, c_in) in enumerate(sources):
    h, w = srcs_by_hand[lvl].shape[-2:]
    print(f"{lvl:5d}  {source:16s} {strides[lvl]:6d}  {c_in:5d} -> {d:3d}   {h:3d} x {w:3d}")
    assert srcs_by_hand[lvl].shape == (B, d, -(-H // strides[lvl]), -(-W // strides[lvl]))
    assert masks_by_hand[lvl].shape == (B, h, w)
assert strides == [8, 16, 32, 64] and n_levels == mcfg.num_feature_levels == 4

# %% [markdown]
# The package's `DeformableDETR.build_pyramid` does the same (it also returns the position codes):

# %%
srcs, masks, pos = model.build_pyramid(images, mask)
assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(srcs, srcs_by_hand))
assert all(torch.equal(a, b) for a, b in zip(masks, masks_by_hand))

# %%
fig, axes = plt.subplots(2, n_levels + 1, figsize=(10, 4), dpi=80)
for b in range(B):
    viz.show_image(images[b], ax=axes[b, 0], title=f"image {b} (padded)")
    axes[b, 0].imshow(mask[b].numpy(), cmap="gray", alpha=0.35 * mask[b].numpy().astype(float))
    for lvl in range(n_levels):
        viz.show_mask(
            masks[lvl][b], ax=axes[b, lvl + 1], title=f"level {lvl} mask {tuple(masks[lvl][b].shape)}"
        )
fig.tight_layout()

# %% [markdown]
# ## 2. Position codes, level embeddings, one flat sequence
#
# Every level gets the sine position code of notebook 02, with one change: Deformable DETR
# normalises cell *centres* (`offset=-0.5`: $(i + 0.5) / H$ instead of $(i + 1) / H$). Because the code
# is normalised, cell (0, 0) of level 0 and cell (0, 0) of level 3 get the same code, so a learned
# **level embedding** (one `d`-vector per level) is added to tell the scales apart. Then, exactly as
# in notebook 07, the levels are flattened and concatenated.

# %%
pe = PositionEmbeddingSine(d // 2, normalize=True, offset=-0.5)
pos_by_hand = [pe(m) for m in masks]
assert all(torch.allclose(a, b) for a, b in zip(pos, pos_by_hand))
level_embed = model.transformer.level_embed  # [L, d]

src_flatten = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # [B, S, d]
mask_flatten = torch.cat([m.flatten(1) for m in masks], 1)  # [B, S]
lvl_pos_flatten = torch.cat([p.flatten(2).transpose(1, 2) + level_embed[lvl] for lvl, p in enumerate(pos)], 1)
spatial_shapes = torch.tensor([s.shape[-2:] for s in srcs])
level_start_index = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
S = int(spatial_shapes.prod(1).sum())

# %%
# NBVAL_CHECK_OUTPUT
print("level_embed           ", tuple(level_embed.shape), " [L, d]")
print("src_flatten           ", tuple(src_flatten.shape), " [B, S, d]")
print("mask_flatten          ", tuple(mask_flatten.shape), " [B, S]")
print("lvl_pos_embed_flatten ", tuple(lvl_pos_flatten.shape), " [B, S, d]")
print("spatial_shapes        ", spatial_shapes.tolist())
print("level_start_index     ", level_start_index.tolist())
assert src_flatten.shape == (B, S, d) and lvl_pos_flatten.shape == (B, S, d) and mask_flatten.shape == (B, S)
assert torch.allclose(lvl_pos_flatten[:, level_start_index[2]], pos[2][:, :, 0, 0] + level_embed[2])

# %% [markdown]
# Why the level embedding is needed: the sine code depends only on the **normalised** position of a
# cell centre, $x = (j + 0.5) / \text{valid}W_l$, never on the level. Below, one $x$-channel of the code
# along the first row of every level of image 0: all levels lie on the same curve
# $\sin(2\pi x / T^{2/64})$, so without `level_embed` a token could not tell which scale it comes from.

# %%
channel = d // 2 + 2  # the x half starts at d/2; even channels are sines, here with period T^(2/(d/2))
period = 10000 ** (2 / (d // 2))
fig, ax = plt.subplots(figsize=(4.5, 2.4), dpi=80)
xs_dense = np.linspace(0, 1, 200)
ax.plot(
    xs_dense,
    np.sin(2 * np.pi * xs_dense / period),
    color="lightgray",
    linewidth=3,
    label="sin(2πx / T^(2/64))",
)
for lvl in range(n_levels):
    valid_w = int((~masks[lvl][0, 0]).sum())
    x_norm = (torch.arange(valid_w) + 0.5) / valid_w
    code = pos[lvl][0, channel, 0, :valid_w]
    assert torch.allclose(code, torch.sin(2 * torch.pi * x_norm / period), atol=1e-4)
    ax.plot(x_norm, code, viz.LEVEL_MARKERS[lvl], markersize=4, label=f"level {lvl} ({valid_w} cells)")
ax.set_xlabel("normalised x of the cell centre", fontsize=8)
ax.set_ylabel(f"code channel {channel}", fontsize=8)
ax.tick_params(labelsize=7)
ax.legend(fontsize=6)
fig.tight_layout()

# %% [markdown]
# The sequence is far longer than the single stride-32 map official DETR reads, which is why full
# attention is out of the
# question here (notebook 07, section 8):

# %%
# NBVAL_CHECK_OUTPUT
c5_tokens = int(spatial_shapes[2].prod())
print(f"tokens: one stride-32 map (official DETR) {c5_tokens}, all four levels {S} ({S / c5_tokens:.1f}x)")
print(
    "at 800 x 1333 (COCO): stride 32 only", 25 * 42, " four levels", 100 * 167 + 50 * 84 + 25 * 42 + 13 * 21
)

# %% [markdown]
# ## 3. Valid ratios on a padded batch
#
# Sampling locations live in the **padded** map ((1, 1) is the bottom-right corner of the padding),
# but a reference point should mean "this place in the image", whatever the padding. The valid ratio
# of an image at a level is `(valid width / W_l, valid height / H_l)`, counted on the mask's first row
# and column. It differs from level to level because each level rounds its size up and its mask is
# a nearest-neighbour resize of the image mask (which can even lose a thin padded strip entirely).

# %%
valid_ratios_by_hand = []
for m in masks:
    valid_h = (~m[:, :, 0]).sum(1).float() / m.shape[1]
    valid_w = (~m[:, 0, :]).sum(1).float() / m.shape[2]
    valid_ratios_by_hand.append(torch.stack([valid_w, valid_h], -1))
valid_ratios = torch.stack(valid_ratios_by_hand, 1)  # [B, L, 2] as (w, h)
assert torch.equal(valid_ratios, torch.stack([get_valid_ratio(m) for m in masks], 1))

print("valid ratios (w, h)   " + "   ".join(f"level {lvl}" for lvl in range(n_levels)))
for b in range(B):
    print(f"image {b}:             " + "   ".join(f"{w:.2f},{h:.2f}" for w, h in valid_ratios[b].tolist()))

# %% [markdown]
# ## 4. The encoder's reference points
#
# In the encoder every token is a query and its reference point is its own cell centre: cell
# $(i, j)$ of level $l$ sits at $((j + 0.5) / \text{valid}W_l,\ (i + 0.5) / \text{valid}H_l)$ in units
# of the **valid image**. To read level $l'$ the point is multiplied by that level's valid ratio,
# giving `[B, S, L, 2]`: one location per token *per level*, all the same place in the image. (Tokens
# in the padding get coordinates beyond the valid image; their values are zero anyway.)

# %%
refs = []
for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    valid_w = valid_ratios[:, lvl, 0] * w  # number of valid columns, [B]
    valid_h = valid_ratios[:, lvl, 1] * h
    refs.append(
        torch.stack([xs.flatten()[None] / valid_w[:, None], ys.flatten()[None] / valid_h[:, None]], -1)
    )
enc_ref_valid = torch.cat(refs, 1)  # [B, S, 2] in units of the valid image
enc_ref = enc_ref_valid[:, :, None] * valid_ratios[:, None]  # [B, S, L, 2] in each level's padded map
package_ref = model.transformer.encoder.get_reference_points(spatial_shapes, valid_ratios, images.device)

# %%
# NBVAL_CHECK_OUTPUT
print("encoder reference points", tuple(enc_ref.shape), " [B, S, L, 2]")
assert torch.allclose(enc_ref, package_ref, atol=1e-6)
# one token, four levels: the same image location once the valid ratios are divided out
assert torch.allclose(
    enc_ref / valid_ratios[:, None], enc_ref_valid[:, :, None].expand(-1, -1, n_levels, -1), atol=1e-6
)
inside = (enc_ref_valid <= 1).all(-1)
assert torch.equal(
    inside, ~mask_flatten
)  # a cell centre is outside the valid image exactly when it is padding

# %%
fig, axes = plt.subplots(1, 2, figsize=(7, 3), dpi=80)
for b, ax in enumerate(axes):
    viz.show_unit_image(
        viz.denormalize(images[b]), ax, title=f"image {b}: level-2 (stride 32) reference points"
    )
    ax.imshow(mask[b].numpy(), cmap="gray", alpha=0.35 * mask[b].numpy().astype(float), extent=(0, 1, 1, 0))
    s0, n2 = int(level_start_index[2]), int(spatial_shapes[2].prod())
    pts = enc_ref[b, s0 : s0 + n2, 2]  # level-2 tokens, expressed on level 2's padded map
    real = ~mask_flatten[b, s0 : s0 + n2]
    ax.scatter(pts[real, 0], pts[real, 1], s=10, c="cyan", edgecolors="black", linewidths=0.3, label="valid")
    ax.scatter(pts[~real, 0], pts[~real, 1], s=10, c="red", marker="x", label="padding")
    ax.legend(fontsize=6, loc="lower left")
fig.tight_layout()

# %% [markdown]
# ## 5. The decoder: reference points and boxes relative to them
#
# `query_embed` `[Q, 2d]` is split into a positional half `query_pos` and a content half `tgt`
# (DETR started `tgt` at zeros). A linear layer + sigmoid turns `query_pos` into each query's
# **reference point**: a learned, image-independent starting place. Every decoder layer's
# cross-attention samples around it, and the box head predicts the box **relative** to it:
#
# $$\text{box} = \sigma\big(\text{bbox\_embed}(h) + [\sigma^{-1}(\text{ref}), 0, 0]\big)$$
#
# so the head only has to predict a correction. With **iterative box refinement** (the `+refine`
# variant, 46.2 AP on COCO instead of 44.5) each layer has its own heads and the box of layer $i$
# becomes the reference of layer $i + 1$.

# %%
t = model.transformer(
    srcs, masks, pos, query_embed=model.query_embed.weight,
    class_embed=model.class_embed, bbox_embed=model.bbox_embed, refine=model.with_box_refine,
)  # fmt: skip
query_pos, tgt = model.query_embed.weight.split(d, dim=1)
init_ref = model.transformer.reference_points(query_pos).sigmoid()  # [Q, 2]
outputs = model(images, mask)
# the last layer's box is a correction to the reference it sampled around (the one after layer L-2)
last_ref = t["references"][-2]
delta = model.bbox_embed[-1](t["hs"][-1])
if last_ref.shape[-1] == 2:  # a point reference anchors the centre only
    boxes_by_hand = torch.cat([delta[..., :2] + inverse_sigmoid(last_ref), delta[..., 2:]], -1).sigmoid()
else:  # a box reference (after refinement) anchors all four numbers
    boxes_by_hand = (delta + inverse_sigmoid(last_ref)).sigmoid()

# %%
# NBVAL_CHECK_OUTPUT
Q = mcfg.num_queries
print(
    "query_embed",
    tuple(model.query_embed.weight.shape),
    " -> query_pos",
    tuple(query_pos.shape),
    "+ tgt",
    tuple(tgt.shape),
)
print("initial reference points", tuple(t["init_reference"].shape), " [B, Q, 2]")
print("decoder outputs hs", tuple(t["hs"].shape), " [layers, B, Q, d]")
print("pred_logits", tuple(outputs["pred_logits"].shape), " [B, Q, K] (sigmoid classes, no no-object column)")
print("pred_boxes ", tuple(outputs["pred_boxes"].shape), " [B, Q, 4]")
assert torch.allclose(t["init_reference"][0], init_ref, atol=1e-6)
assert torch.allclose(t["init_reference"][0], t["init_reference"][1])  # learned: the same for every image
assert torch.allclose(outputs["pred_boxes"], boxes_by_hand, atol=1e-5)
assert outputs["pred_logits"].shape == (B, Q, mcfg.num_classes)

# %% [markdown]
# Where the reference points start (white dots, identical for every image) and, for the three most
# confident queries of each image, where the box centre ends up (arrow) and the box:

# %%
probs = outputs["pred_logits"].sigmoid()
score, label = probs.max(-1)
fig, axes = plt.subplots(1, B, figsize=(7, 3.2), dpi=80)
for b, ax in enumerate(axes):
    viz.show_unit_image(viz.denormalize(images[b]), ax, title=f"image {b}: reference -> box centre")
    h, w = targets[b]["size"].tolist()
    to_padded = torch.tensor([w / W, h / H])  # references and boxes are relative to the valid image
    ax.scatter(*(init_ref * to_padded).T, s=8, c="white", edgecolors="black", linewidths=0.3)
    for q in score[b].topk(3).indices.tolist():
        color = viz.COLORS[q % len(viz.COLORS)]
        r = init_ref[q] * to_padded
        cx, cy, bw, bh = (outputs["pred_boxes"][b, q] * to_padded.repeat(2)).tolist()
        ax.annotate(
            "", xy=(cx, cy), xytext=tuple(r.tolist()), arrowprops=dict(arrowstyle="->", color=color, lw=1.2)
        )
        ax.add_patch(plt.Rectangle((cx - bw / 2, cy - bh / 2), bw, bh, fill=False, edgecolor=color, lw=1.2))
fig.tight_layout()

# %% [markdown]
# With refinement (`with_box_refine=True`) the reference moves layer by layer; without it (this toy
# model's setting if the line below says so) all layers sample around the same learned points and only
# the box head's correction moves the box.

# %%
# NBVAL_CHECK_OUTPUT
print("iterative box refinement:", model.with_box_refine)
ref_shift = [float((r[..., :2] - t["init_reference"][..., :2]).abs().max()) for r in t["references"]]
print("reference changes after each decoder layer:", ["yes" if s > 1e-6 else "no" for s in ref_shift])
assert (max(ref_shift) > 1e-6) == model.with_box_refine

# %% [markdown]
# ## 6. The trained model's detections and where each query looked
#
# `PostProcess` keeps the best (query, class) pairs over all `Q × K` sigmoid scores (a query may
# appear with several classes). For the three most confident *queries* of each image (each with its
# best class) we draw the query's sampling points in the **last decoder layer's** cross-attention: colour = head, marker = level
# (○ stride 8, □ 16, △ 32, ◇ 64), size = attention weight. A forward hook records the inputs of that
# `MSDeformAttn`; calling it again with `return_sampling=True` returns the locations and weights.

# %%
captured = {}


def record_inputs(module, args, kwargs, output):
    captured["args"], captured["kwargs"] = args, kwargs


cross_attn = model.transformer.decoder.layers[-1].cross_attn
handle = cross_attn.register_forward_hook(record_inputs, with_kwargs=True)
outputs = model(images, mask)
handle.remove()
_, (sampling_locations, attention_weights) = cross_attn(
    *captured["args"], **{**captured["kwargs"], "return_sampling": True}
)
results = PostProcess()(outputs, torch.stack([t_["size"] for t_ in targets]))

# %%
# NBVAL_CHECK_OUTPUT
print("sampling_locations", tuple(sampling_locations.shape), " [B, Q, M, L, P, 2]")
print("attention_weights ", tuple(attention_weights.shape), " [B, Q, M, L, P]")
M, L, P = mcfg.nheads, mcfg.num_feature_levels, mcfg.dec_n_points
assert sampling_locations.shape == (B, Q, M, L, P, 2) and attention_weights.shape == (B, Q, M, L, P)
assert torch.allclose(attention_weights.sum((-1, -2)), torch.ones(B, Q, M), atol=1e-5)

# %%
for b in range(B):
    h, w = targets[b]["size"].tolist()
    top_scores, queries = score[b].topk(3)  # each query's best class, the three best queries
    assert torch.isclose(
        top_scores[0], results[b]["scores"][0]
    )  # PostProcess's best pair is the best query's
    fig, axes = plt.subplots(1, 4, figsize=(9.2, 2.4), dpi=80)
    gt = box_convert(targets[b]["boxes"], "cxcywh", "xyxy") * torch.tensor([w, h, w, h])
    viz.show_boxes(
        images[b, :, :h, :w],
        gt,
        labels=targets[b]["labels"],
        class_names=class_names,
        ax=axes[0],
        title=f"image {b}: ground truth",
    )
    for ax, q in zip(axes[1:], queries.tolist()):
        lab, sc = int(label[b, q]), float(score[b, q])
        viz.show_sampling_points(
            viz.denormalize(images[b]),
            sampling_locations[b, q],
            attention_weights[b, q],
            ax=ax,
            title=f"query {q}: {class_names.get(lab, lab)} {sc:.2f}",
        )
        box = box_convert(outputs["pred_boxes"][b, q], "cxcywh", "xyxy")  # relative to the valid image
        x0, y0, x1, y1 = (box * torch.tensor([w / W, h / H, w / W, h / H])).tolist()  # -> padded map
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", lw=1.2))
    fig.tight_layout()

# %% [markdown]
# ## 7. Convergence: Deformable DETR vs DETR on the bundled data
#
# The paper's headline: Deformable DETR matches DETR with **10× fewer epochs** (50 instead of 500 on
# COCO), because every query starts by looking at a small neighbourhood of its reference point
# instead of spreading uniform attention over all pixels, and because small objects are visible at
# stride 8. A fair test needs two models trained the same way. The toy Deformable DETR trains
# *everything* from random weights, so we compare it with the earlier DETR recipe that did the same
# (`data/checkpoints/detr_shapes_scratch.md`: ResNet-18 stages, d = 128, 3 + 3 layers, same data,
# batch and learning rate, 20 epochs); the Deformable preset is given about a third of those epochs.
# (The shipped `detr_shapes.pt` is trained differently: on a *pretrained* backbone whose layer2-3 it
# fine-tunes, with 10 object queries, for 90 epochs, and what it ships and logs is a moving average of
# its weights; it is printed for reference, not compared.) The per-epoch validation metrics ship
# beside the checkpoints (`*_log.jsonl`). We test the claim in this form:
# *does Deformable DETR reach the from-scratch DETR's final AP within a third of DETR's epochs?*
#
# **Validation size.** Both curves here were evaluated at validation short side 112, the toy
# Deformable DETR's own evaluation size, at which the from-scratch DETR record was evaluated too. The
# shipped DETR is evaluated at short side 160, the largest training scale of its last phase (its
# recipe trains on smaller images, short side 96–128, for 70 epochs, then at about the images' own
# size, 120–160, for the last 20: progressive resizing; official DETR likewise trains at 480–800 and
# evaluates at 800), during training and after. Its numbers below are at 160, one more reason they
# are for reference only.


# %%
def read_log(path: Path) -> list[dict]:
    """Epoch records with COCO metrics from a training log (one JSON object per line)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("type", "epoch") == "epoch" and "AP" in r]


logs = {name: read_log(CKPT_DIR / f"{stem}_log.jsonl") for name, stem in
        [("DETR (from scratch)", "detr_shapes_scratch"), ("Deformable DETR", "deformable_shapes")]}  # fmt: skip
curves = {name: (np.array([r["epoch"] + 1 for r in rows]), rows) for name, rows in logs.items()}

fig, axes = plt.subplots(1, 2, figsize=(9, 3), dpi=80)
for ax, key in zip(axes, ["AP", "APs"]):
    for name, (epochs, rows) in curves.items():
        ax.plot(epochs, [max(r[key], 0.0) for r in rows], "o-", markersize=3, label=name)
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_ylabel(key, fontsize=8)
    ax.set_title(
        f"{key} (COCO {'all areas' if key == 'AP' else 'small objects'}) on data/shapes val", fontsize=8
    )
    ax.tick_params(labelsize=7)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.legend(fontsize=7)
detr_epochs, detr_rows = curves["DETR (from scratch)"]
axes[0].axhline(detr_rows[-1]["AP"], color="gray", linestyle=":", linewidth=1)
axes[0].axvline(math.ceil(detr_epochs[-1] / 3), color="gray", linestyle="--", linewidth=1)
fig.tight_layout()

# %%
detr_final, n_detr = detr_rows[-1]["AP"], int(detr_epochs[-1])
def_epochs, def_rows = curves["Deformable DETR"]
reached = [int(e) for e, r in zip(def_epochs, def_rows) if r["AP"] >= detr_final]
first = reached[0] if reached else None
budget = math.ceil(n_detr / 3)  # a third of DETR's epochs, in whole epochs (training stops between epochs)
print(f"DETR:            final AP {detr_final:.3f} (APs {detr_rows[-1]['APs']:.3f}) after {n_detr} epochs")
print(
    f"Deformable DETR: final AP {def_rows[-1]['AP']:.3f} (APs {def_rows[-1]['APs']:.3f}) after "
    f"{int(def_epochs[-1])} epochs"
)
if first is None:
    print(
        f"Deformable DETR never reached DETR's final AP {detr_final:.3f} in its {int(def_epochs[-1])} epochs."
    )
else:
    print(
        f"Deformable DETR first reaches AP >= {detr_final:.3f} at epoch {first} "
        f"= {first / n_detr:.1%} of DETR's {n_detr} epochs."
    )
verdict = "HOLDS" if first is not None and first <= budget else "DOES NOT HOLD"
print(f"Claim 'reaches DETR's final AP within 1/3 of its epochs (<= {budget} of {n_detr})': {verdict}")
if all("train_time_s" in r for r in detr_rows + def_rows):  # epochs are not equally expensive
    detr_minutes = sum(r["train_time_s"] for r in detr_rows) / 60
    def_minutes = np.cumsum([r["train_time_s"] for r in def_rows]) / 60
    print(
        f"training time per epoch on this CPU: DETR {detr_minutes * 60 / n_detr:.0f} s, "
        f"Deformable DETR {def_minutes[-1] * 60 / len(def_rows):.0f} s"
    )
    if first is not None:
        print(
            f"wall clock: Deformable DETR got there after {def_minutes[first - 1]:.0f} min of training, "
            f"DETR trained {detr_minutes:.0f} min in total"
        )
if detr_final < 0.05:
    print(
        f"caveat: DETR's final AP {detr_final:.3f} means it is still on its from-scratch plateau (see "
        "data/checkpoints/detr_shapes_scratch.md), so the check mostly measures how slowly DETR starts."
    )
# the shipped DETR (pretrained backbone, layer2-3 fine-tuned): its training run evaluated at its own size
detr_model, detr_cfg, detr_ckpt = load_checkpoint(CKPT_DIR / "detr_shapes.pt")
assert (detr_cfg.data.val_size, cfg.data.val_size) == (160, 112)  # its log is not at the curves' size
shipped = read_log(CKPT_DIR / "detr_shapes_log.jsonl")
print(
    f"for reference, the shipped DETR (pretrained backbone, not a like-for-like comparison): AP "
    f"{shipped[0]['AP']:.3f} at epoch {shipped[0]['epoch'] + 1}, {shipped[-1]['AP']:.3f} at epoch "
    f"{shipped[-1]['epoch'] + 1} (val short side {detr_cfg.data.val_size}; the curves: {cfg.data.val_size})"
)

# %% [markdown]
# What "plateau" means can be measured directly: on 16 validation images, how much does each query's
# predicted box move from image to image? A model on the plateau predicts (almost) the same boxes for
# every image (the from-scratch DETR record measured 0.002 across images against 0.21 across
# queries); a model that looks at the image does not. Below: the shipped DETR and the toy Deformable
# DETR, both on the same 16 images, at each model's evaluation size (short side 112, long side at
# most 192, for the Deformable DETR; 160 and at most 240 for the shipped DETR), so the two are
# compared at both.

# %%
sizes = {(d.val_size, d.val_max_size) for d in (cfg.data, detr_cfg.data)}  # each model's val resize
assert sizes == {(112, 192), (160, 240)}
for size, max_size in sorted(sizes):
    val_n = build_dataset(
        DATA, "val2017", dataclasses.replace(cfg.data, val_size=size, val_max_size=max_size), train=False
    )
    imgs, msk, _ = collate_fn([val_n[i] for i in range(16)])  # one batch for both models
    for name, net in [("DETR", detr_model), ("Deformable DETR", model)]:
        boxes = net(imgs, msk)["pred_boxes"]  # [16, Q, 4]
        print(
            f"short side {size}: {name:16s} {boxes.shape[1]:3d} queries, box std across images "
            f"{float(boxes.std(0).mean()):.3f}, across queries {float(boxes.std(1).mean()):.3f}"
        )

# %% [markdown]
# Read the printed numbers, not the paper: the compared toy models are small, trained from scratch
# (no ImageNet weights offline) on a shared 2-core CPU, one run each, on about a thousand synthetic
# images. With such budgets a from-scratch DETR sits on a plateau where every image gets the same
# boxes (its authors report needing hundreds of epochs; see `data/checkpoints/detr_shapes_scratch.md`),
# while the deformable model, whose queries start out sampling a local neighbourhood at four scales,
# begins to separate objects within the first epochs. The chart shows the difference in how fast
# they start, which is the effect the paper is about. The shipped DETR shows the other cure, the one
# the official recipe relies on: a pretrained backbone (notebook 06). Both loaded models are off the
# plateau: their boxes move from image to image (std 0.144 at short side 112 and 0.139 at 160 for
# the shipped DETR, 0.060 and 0.061 for the Deformable DETR, against the from-scratch record's
# 0.002), and the evaluation size barely changes that.

# %%
print(f"notebook ran in {time.perf_counter() - notebook_start:.0f} s")

# %% [markdown]
# ## Summary
#
# * The backbone hands over several maps (officially C3–C5, strides 8–32; the toy model C3–C4) and
#   stride-2 convolutions add the coarser levels up to stride 64. Each is projected to `d` channels
#   with Conv + GroupNorm.
# * Position codes use cell centres (offset −0.5) and get a learned **level embedding** per level;
#   all levels are flattened into one sequence (`spatial_shapes`, `level_start_index` remember where).
# * **Valid ratios** relate each level's padded map to the real image, so a normalised reference point
#   means the same image location on every level and for every image in the batch.
# * Encoder queries are the tokens themselves, with their cell centres as reference points; decoder
#   queries get learned reference points, and boxes are predicted as corrections to them (with
#   refinement: layer by layer).
# * On COCO this converges about 10× faster than DETR; section 7 measures the toy version honestly.
#
# ## Exercises
#
# 1. Build a single-scale model (`num_feature_levels=1`) from the same preset and count its tokens
#    and parameters. Which objects would you expect it to miss?
# 2. Pad one image much more (e.g. collate it with a 2× larger blank image) and check that its
#    detections do not move. Which tensors make that true?
# 3. Turn on `with_box_refine` in the config, run one batch, and plot the reference box of each layer
#    for one query.
# 4. Look at the sampling points of a query that detects a *small* shape: which levels carry most of
#    its attention weight? Compare with a large shape.
# 5. Using the two logs, compare the wall-clock time (not epochs) each model needed to reach DETR's
#    final AP.
