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
# # 03 · Object queries and decoder self-attention
#
# **Learning goal.** The first half of the decoder stage of the process notes
# ([notebook 01](01_backbone_and_flatten.ipynb)):
#
# > Input: Encoder-Out (d×HW), Object-Query (num_query × dim_query) → (100×256).
# > 1 Self-attention on the object queries, so that each object query attends to different object
# > information: a) object queries `[num_layer(6), num_query(100), B, 256]`; b) key and value are
# > computed from the query itself; c) `query_positional_embedding` `[num_layer(6), num_query(100), B, 256]`.
#
# We make the 100 learned **object queries**, see why the decoder's input `tgt` starts at zero, build
# the decoder's self-attention by hand and check it against `detr_lite.transformer.TransformerDecoderLayer`,
# then stack six layers and relate the process notes' sequence-first `[6, 100, B, 256]` to the package's
# batch-first `[6, B, 100, 256]`. Finally we look at what the queries of the trained toy DETR have
# learned: where each query "slot" predicts boxes, and how the queries attend to each other.

# %%
# %matplotlib inline
import math

import matplotlib.pyplot as plt
import torch
from torch.utils.data import DataLoader, Subset
from torchvision.ops import box_convert, box_iou

from detr_lite import viz
from detr_lite.checkpoint import load_checkpoint
from detr_lite.data.coco import build_dataset, collate_fn
from detr_lite.transformer import TransformerDecoder, TransformerDecoderLayer, capture_attention

torch.manual_seed(0)
torch.set_grad_enabled(False)  # these notebooks only run forward passes
viz.use_style()  # the notebooks' figure dpi and font sizes

# %% [markdown]
# ## 1. Object queries: 100 learned vectors
#
# DETR predicts a fixed-size *set* of N = 100 detections. Each prediction slot owns one learned
# 256-d vector, an `nn.Embedding(100, 256)`: the **object queries**. They are the same for every
# image; only what they read from the image differs.

# %%
# NBVAL_CHECK_OUTPUT
num_queries, d, nhead, B = 100, 256, 8, 2
query_embed = torch.nn.Embedding(num_queries, d)
print("query_embed.weight:", tuple(query_embed.weight.shape), " (num_query x dim_query)")
assert query_embed.weight.shape == (100, 256)

# %% [markdown]
# For a batch they are repeated per image. The official code (and the process notes) use the sequence-first
# layout `[num_query, B, 256]`; the package is batch-first `[B, num_query, 256]`.

# %%
# NBVAL_CHECK_OUTPUT
query_pos_seq = query_embed.weight.unsqueeze(1).repeat(1, B, 1)  # [100, B, 256]  official / process notes
query_pos = query_embed.weight.unsqueeze(0).expand(B, -1, -1)  # [B, 100, 256]  detr_lite
print("seq-first  :", tuple(query_pos_seq.shape))
print("batch-first:", tuple(query_pos.shape))
assert torch.equal(query_pos_seq.transpose(0, 1), query_pos)

# %% [markdown]
# The decoder's running state `tgt` (the "content" of each slot) **starts at zero**. The learned
# queries enter every layer only as a *positional* code, added to the attention queries and keys,
# exactly as the sine code `pos` is added to the image tokens in the encoder.

# %%
tgt = torch.zeros_like(query_pos)  # [B, 100, 256]

# %% [markdown]
# ## 2. Decoder self-attention, by hand
#
# Self-attention among the queries: `q = k = tgt + query_pos`, `v = tgt`. It is how slots talk to each
# other, e.g. so that two slots do not both claim the same object. We write multi-head attention out
# with matrix multiplies (as in notebook 02) and use the weights of a package decoder layer.


# %%
def multi_head_attention(query, key, value, in_w, in_b, out_w, out_b, nhead):
    """Returns (output [B, Lq, d], weights [B, nhead, Lq, Lk]); weights as in nn.MultiheadAttention."""
    Wq, Wk, Wv = in_w.chunk(3)
    bq, bk, bv = in_b.chunk(3)
    Bn, Lq, dm = query.shape
    Lk, dh = key.shape[1], dm // nhead
    q = (query @ Wq.T + bq).view(Bn, Lq, nhead, dh).transpose(1, 2)
    k = (key @ Wk.T + bk).view(Bn, Lk, nhead, dh).transpose(1, 2)
    v = (value @ Wv.T + bv).view(Bn, Lk, nhead, dh).transpose(1, 2)
    weights = (q @ k.transpose(-2, -1) / math.sqrt(dh)).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(Bn, Lq, dm)
    return out @ out_w.T + out_b, weights


layer = TransformerDecoderLayer(d_model=d, nhead=nhead, dim_feedforward=2048, dropout=0.1).eval()
for p in layer.parameters():  # random weights everywhere (biases and norms too), so checks are not trivial
    torch.nn.init.normal_(p, std=0.05)
sa = layer.self_attn
params = (sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight, sa.out_proj.bias)

# %% [markdown]
# In the **first** layer `tgt = 0`, so every value vector is just the value bias `b_v`, and any
# weighted average of identical vectors is that vector: the output is `out_proj(b_v)`, the same for
# every slot whatever the attention weights. Only from the second layer on does self-attention carry
# information between slots.

# %%
first, _ = multi_head_attention(tgt + query_pos, tgt + query_pos, tgt, *params, nhead)
b_v = sa.in_proj_bias[2 * d :]
assert torch.allclose(first, (b_v @ sa.out_proj.weight.T + sa.out_proj.bias).expand_as(first), atol=1e-6)

# %% [markdown]
# So for a meaningful check we use a non-zero `tgt`, as it is after a layer has run.

# %%
# NBVAL_CHECK_OUTPUT
tgt1 = torch.randn(B, num_queries, d)
q = k = tgt1 + query_pos
by_hand, weights = multi_head_attention(q, k, tgt1, *params, nhead)
print(
    "self-attention output:", tuple(by_hand.shape), " weights:", tuple(weights.shape), " [B, heads, 100, 100]"
)
assert torch.allclose(layer.self_attn(q, k, tgt1), by_hand, atol=1e-5)

# %% [markdown]
# The layer then adds the result back and normalises (`norm1`); cross-attention (notebook 04) and the
# FFN follow. The query-to-query weight matrix of one head of this random layer:

# %%
fig, ax = viz.subplots(1, 1, width=3.4, row_height=2.6)
im = ax[0, 0].imshow(weights[0, 0], cmap="viridis")
ax[0, 0].set_title("untrained layer, head 0: query -> query weights")
ax[0, 0].set_xlabel("key (query slot)")
ax[0, 0].set_ylabel("query slot")
fig.colorbar(im, ax=ax[0, 0], label="attention weight")
# %% [markdown]
# ## 3. Six decoder layers and the shared final norm
#
# `TransformerDecoder` stacks six layers and, for DETR's auxiliary losses, returns **every** layer's
# output, each passed through **one shared** LayerNorm. The decoder needs the encoder's memory to
# cross-attend to; here a random one for a 10×15 feature grid.

# %%
# NBVAL_CHECK_OUTPUT
HW = 10 * 15
memory = torch.randn(B, HW, d)
pos = torch.randn(B, HW, d)
decoder = TransformerDecoder(layer, num_layers=6, d_model=d, return_intermediate=True).eval()
hs = decoder(tgt, memory, None, pos, query_pos)
print("hs (batch-first):", tuple(hs.shape), " [num_layer, B, num_query, 256]")
hs_seq = hs.transpose(1, 2)
print(
    "hs (seq-first)  :", tuple(hs_seq.shape), " [num_layer(6), num_query(100), B, 256]  (the process notes' notation)"
)
assert hs.shape == (6, 2, 100, 256) and hs_seq.shape == (6, 100, 2, 256)

# %% [markdown]
# Run the layers one at a time to see where the norm sits: layer `i`'s output goes on, un-normalised,
# to layer `i+1`; a normalised copy `norm(tgt)` is what is stored in `hs[i]` (and fed to the heads).

# %%
state = tgt
for i, lyr in enumerate(decoder.layers):
    state = lyr(state, memory, None, pos, query_pos)
    assert torch.allclose(hs[i], decoder.norm(state), atol=1e-5)
    assert not torch.allclose(hs[i], state, atol=1e-2)  # the stored copy really is normalised

# %% [markdown]
# ## 4. What the trained toy DETR's queries learned
#
# The toy model shipped with the package (`data/checkpoints/detr_shapes.pt`, preset `detr-shapes`,
# trained as [notebook 06](06_training_detr.ipynb) shows) has 10 queries of width 128 and 3 decoder
# layers. We run it over the first 60 bundled validation images at the validation size (short side
# 160) and also record the decoder's attention weights, for the self-attention check at the end.

# %%
model, cfg, ckpt = load_checkpoint("../data/checkpoints/detr_shapes.pt")
val = build_dataset("../data/shapes", "val2017", cfg.data, train=False)
loader = DataLoader(Subset(val, range(60)), batch_size=20, collate_fn=collate_fn)
preds, gt_per_image, self_attn_last = [], [], []
for images, masks, targets in loader:
    with capture_attention(model, layers=["transformer.decoder"]) as attn:
        out = model(images, masks)
    prob = out["pred_logits"].softmax(-1)
    preds.append(torch.cat([out["pred_boxes"], 1 - prob[..., -1:]], dim=-1))  # cx, cy, w, h, p(object)
    gt_per_image += [t["boxes"] for t in targets]
    self_attn_last.append(attn["transformer.decoder.layers.2.self_attn"].mean(1))  # [b, Q, Q], heads averaged
preds = torch.cat(preds)  # [num_images, num_queries, 5]
gt_boxes = torch.cat(gt_per_image)  # every ground-truth box, normalised cxcywh
self_attn_last = torch.cat(self_attn_last)  # [num_images, Q, Q]

# %%
# NBVAL_CHECK_OUTPUT
print("model queries:", tuple(model.query_embed.weight.shape), " predictions:", tuple(preds.shape))
num_q = cfg.model.num_queries  # 10 for the toy model
assert model.query_embed.weight.shape == (num_q, cfg.model.hidden_dim) and preds.shape == (60, num_q, 5)

# %% [markdown]
# **Query slots.** As in Fig. 7 of the DETR paper: for every query, the centres of its boxes over
# these validation images (normalised coordinates), coloured by the box: green = small, red = large and wide, blue = large and tall
# (faint where the query predicts "no object", p(object) ≤ 0.5). In the paper's converged COCO model
# each slot's dots cover a region, and every slot can also predict image-wide boxes.


# %%
def slot_colors(boxes):
    """green = small (w*h < 0.04), red = large & wide, blue = large & tall."""
    w, h = boxes[:, 2], boxes[:, 3]
    small = w * h < 0.04
    colors = torch.where((w > h)[:, None], torch.tensor([0.85, 0.1, 0.1]), torch.tensor([0.1, 0.2, 0.9]))
    colors[small] = torch.tensor([0.1, 0.7, 0.1])
    return colors.numpy()


rows = math.ceil(num_q / 10)
fig, axes = viz.subplots(rows, 10, row_height=1.25)
for qi, ax in enumerate(axes.flat):
    if qi >= num_q:
        ax.axis("off")
        continue
    p = preds[:, qi]
    alpha = (0.15 + 0.85 * (p[:, 4] > 0.5).float()).numpy()
    ax.scatter(p[:, 0], p[:, 1], s=4, c=slot_colors(p[:, :4]), alpha=alpha, linewidths=0)
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"query {qi}", fontsize=7)
fig.suptitle(
    "box centres of each query over 60 val images (green: small, red: large and wide, blue: large and tall;"
    " faint: no object)"
)

# %% [markdown]
# How much does a query's box move from image to image? If the queries had only memorised "where
# objects usually are", their centres would barely move; a detector's centres move as much as the
# objects do. We compare the spread (standard deviation) of each query's predicted centres with the
# spread of the true object centres.

# %%
query_spread = preds[..., :2].std(dim=0).mean(-1)  # per query: std of its centre over the images
object_spread = gt_boxes[:, :2].std(dim=0).mean()
print("std of each query's centre:", [round(v, 3) for v in query_spread.tolist()])
print(f"std of the object centres : {object_spread:.3f}")
print(f"query spread / object spread: median {query_spread.median() / object_spread:.2f}, "
      f"smallest {query_spread.min() / object_spread:.2f}")  # fmt: skip
# the centres move with the images (measured: median 0.74, smallest 0.36 of the objects' spread)
assert query_spread.median() > 0.5 * object_spread and query_spread.min() > 0.25 * object_spread
print("least mobile query:", int(query_spread.argmin()))
confident = preds[..., 4] > 0.5  # [num_images, Q]: the query claims an object in that image
small = preds[..., 2] * preds[..., 3] < 0.04  # the same threshold as the green dots
small_share = (small & confident).sum(0) / confident.sum(0).clamp(min=1)  # per query
gt_small = (gt_boxes[:, 2] * gt_boxes[:, 3] < 0.04).float().mean()
print(f"\nsmall share of each query's confident boxes (of all true boxes: {gt_small:.2f}):")
print(" ", [round(v, 2) for v in small_share.tolist()])
print("queries whose confident boxes are > 75% small:", torch.nonzero(small_share > 0.75).flatten().tolist())
print("queries with no small confident box          :", torch.nonzero(small_share == 0).flatten().tolist())
centre = torch.stack([preds[confident[:, qi], qi, :2].mean(0) for qi in range(num_q)])
print("mean centre (x, y) of each query's confident boxes:")
print(" ", [(round(x, 2), round(y, 2)) for x, y in centre.tolist()])

# %% [markdown]
# The queries' centres move with the images: a typical query's centre spreads about three quarters
# as much as the object centres do (median ratio 0.74; 0.13 against 0.17 of the image). The least
# mobile query, 1 (std 0.063), is a large-box slot: its dots are red and blue, near the image centre,
# and a large box's centre cannot go far from it. With only 10 slots for 3.2 objects per image, the
# slots have still **specialised**, as in the paper's Fig. 7 (the ids here are read off the printed
# lists). By box size: about a quarter of the true boxes are small (0.23), but over three quarters of
# the confident boxes of 0, 3, 7 and 8 are small (0.80, 0.80, 0.83 and 0.80), while 1 and 4 never
# predict a small box. And by place: 3's boxes sit in the upper right of the image (mean centre
# (0.64, 0.32)), 5's in the upper left (0.31, 0.39), 0's and 9's in the lower left, 6's and 8's in
# the lower right and 7's on the right (mean x 0.72), while the large-box slots 1 and 4 stay near the
# centre. Unlike in the paper's converged COCO model, though, not every slot also predicts image-wide
# boxes: 0, 3, 7 and 8 mostly predict small ones.
#
# A spread alone could also be noise. Do the boxes land on the objects? For every true object, the
# best IoU among its image's confident predictions (p(object) > 0.5):

# %%
best_iou = torch.cat(
    [
        box_iou(box_convert(g, "cxcywh", "xyxy"), box_convert(p[c, :4], "cxcywh", "xyxy")).amax(1)
        if c.any()
        else torch.zeros(len(g))
        for g, p, c in zip(gt_per_image, preds, confident)
        if len(g)
    ]
)
recall = (best_iou >= 0.5).float().mean()
print(f"{len(best_iou)} objects, {len(best_iou) / len(preds):.1f} per image; "
      f"confident predictions per image: {confident.sum(1).float().mean():.1f}")  # fmt: skip
print(f"objects with a confident box at IoU >= 0.5: {recall:.0%}; median best IoU {best_iou.median():.2f}")
assert recall > 0.7  # measured 0.96

# %% [markdown]
# Most objects (96 %) get a confident box that overlaps them at IoU ≥ 0.5 (median best IoU 0.85), so
# the slots really do read *this* image. But there are 5.1 confident predictions per image for 3.2
# objects: many objects are claimed by two or more slots, and such duplicates count as false
# positives in AP. That is one reason why the model's AP50 stays well below this recall. Avoiding
# duplicates is the job of the decoder's self-attention.

# %% [markdown]
# **Decoder self-attention of the trained model** on one validation image: the last decoder layer's
# query-to-query weights (heads averaged); the queries that claim an object (p > 0.7) have red
# labels. In a converged DETR this is where slots negotiate who predicts which object, which is why
# DETR needs no non-maximum suppression (the paper shows NMS stops helping once the later decoder layers
# have run).

# %%
image, target = val[3]
with capture_attention(model, layers=["transformer.decoder"]) as attn:
    out = model(image[None])
names = sorted(k for k in attn if k.endswith("self_attn"))
last = attn[names[-1]][0].mean(0)  # [Q, Q]
keep = (1 - out["pred_logits"][0].softmax(-1)[:, -1]) > 0.7  # slots that claim an object

# %%
# NBVAL_CHECK_OUTPUT
print("decoder self-attention layers:", names)
print("last layer weights:", tuple(attn[names[-1]].shape), " [B, heads, Q, Q]")
assert last.shape == (num_q, num_q)

# %%
fig, axes = viz.subplots(1, 2, width=7.0, row_height=2.9)
axes = axes[0]
im = axes[0].imshow(last, cmap="viridis")
fig.colorbar(im, ax=axes[0], label="attention weight (heads averaged)")
axes[0].set_xticks(range(num_q))
axes[0].set_yticks(range(num_q))
axes[0].tick_params(labelsize=5)
for ticks in (axes[0].get_xticklabels(), axes[0].get_yticklabels()):
    for qi, tick in enumerate(ticks):
        tick.set_color("red" if keep[qi] else "gray")  # red = the slot detects an object
axes[0].set_title("trained: last decoder layer, query -> query")
axes[0].set_xlabel("key query")
axes[0].set_ylabel("query")
H_img, W_img = image.shape[-2:]
scale = torch.tensor([W_img, H_img, W_img, H_img])
boxes = box_convert(out["pred_boxes"][0][keep] * scale, "cxcywh", "xyxy")
viz.show_image(image, ax=axes[1], title="queries with p(object) > 0.7")
viz.draw_boxes(
    axes[1], boxes, labels=torch.nonzero(keep).flatten(), class_names=[f"q{i}" for i in range(num_q)]
)

# %% [markdown]
# How far from uniform is the matrix, and how well do the red slots' boxes fit the true objects?

# %%
print(f"uniform would be 1/{num_q} = {1 / num_q:.2f} everywhere; the largest weight in each row:")
print(" ", [round(v, 2) for v in last.max(1).values.tolist()])
kept = torch.nonzero(keep).flatten().tolist()
fit = box_iou(boxes, box_convert(target["boxes"] * scale, "cxcywh", "xyxy")).amax(1)  # best IoU, true box
p_obj = 1 - out["pred_logits"][0].softmax(-1)[:, -1]
for qi, f in zip(kept, fit.tolist()):
    print(f"q{qi}: p(object) {p_obj[qi]:.2f}, best IoU with a true box {f:.2f}")

# %% [markdown]
# The matrix is far from uniform: every row's largest weight is 0.18–0.44, 1.8 to 4.4 times the
# uniform 0.10, so most slots favour a few others; several of them (q3, q4, q5 and q6) favour the
# same one, q2, the brightest column of the figure, q0 and q7 favour q9, and q1 and q9 favour q4.
# Which slots on the right claim the same object (their boxes overlap the same true box most), and do
# they attend to each other?

# %%
true_xyxy = box_convert(target["boxes"] * scale, "cxcywh", "xyxy")
owner = box_iou(boxes, true_xyxy).argmax(1)  # [kept]: the true box each red box overlaps most
overlap = box_iou(boxes, boxes)
for a in range(len(kept)):
    for b in range(a + 1, len(kept)):
        if owner[a] == owner[b]:
            qa, qb = kept[a], kept[b]
            print(
                f"q{qa} and q{qb} claim true box {int(owner[a])}: their boxes overlap at IoU {overlap[a, b]:.2f};"
                f" weight q{qa}->q{qb} {last[qa, qb]:.2f}, q{qb}->q{qa} {last[qb, qa]:.2f} (uniform {1 / num_q:.2f})"
            )

# %% [markdown]
# Two of the four objects are claimed twice: the circle by q9 and q0 (IoU with it 0.65 and 0.60) and
# the small square by q8 and q7 (0.77 and 0.49). The circle's two boxes overlap each other at 0.39
# and the small square's at 0.43, so NMS at IoU 0.5 would keep both of each pair (and the 60-image
# measurement below, which calls a pair a duplicate only at IoU > 0.5, does not count them). The
# third slot listed with the circle, q5 (p(object) 0.86), fits no object: its box spans the cross's
# left arm and the circle (best IoU 0.19), a plain false positive. The large cross has a single red
# slot, q1 (0.90), and so has the magenta square, q2 (0.85). The attention within the two real pairs is
# one-sided: q0's largest weight (0.41) goes to q9 and q8's (0.35) to q7, but q9 gives q0 far less
# than the uniform 0.10 (0.04) and q7 gives q8 only a little more (0.14). In neither pair has the
# attention (yet) taught one of them to step back: all four keep p(object) > 0.7. One slot that did
# step back is q3 (p(object) 0.004, so not drawn): its small box at the top edge of the image lies
# partly on the magenta square, and its row's largest weight, 0.35, goes to q2, the slot that claims
# that square.
#
# The same over all 60 images: the last layer's weight between two confident slots whose boxes
# overlap (IoU > 0.5, a duplicate pair) against two confident slots whose boxes do not. And the
# slots that *did* step back (p(object) ≤ 0.5): how much do they attend to a confident slot whose
# box overlaps theirs, against one whose box does not?

# %%
dup_w, other_w, silent_dup_w, silent_other_w = [], [], [], []
for p, c, sa_img in zip(preds, confident, self_attn_last):
    bx = box_convert(p[:, :4], "cxcywh", "xyxy")
    is_dup = box_iou(bx, bx) > 0.5  # [Q, Q]
    off_diag = ~torch.eye(num_q, dtype=torch.bool)
    both = c[:, None] & c[None, :] & off_diag  # both slots confident
    silent = ~c[:, None] & c[None, :]  # row: a silent slot, column: a confident one
    dup_w.append(sa_img[both & is_dup])
    other_w.append(sa_img[both & ~is_dup])
    silent_dup_w.append(sa_img[silent & is_dup])
    silent_other_w.append(sa_img[silent & ~is_dup])
dup_w, other_w, silent_dup_w, silent_other_w = map(torch.cat, (dup_w, other_w, silent_dup_w, silent_other_w))
for label, w in [
    ("confident pairs, duplicate", dup_w),
    ("confident pairs, not duplicate", other_w),
    ("silent -> confident, overlapping", silent_dup_w),
    ("silent -> confident, not overlapping", silent_other_w),
]:
    print(f"{label:36}: {len(w):4d} (ordered) pairs, mean weight {w.mean():.3f}")
assert dup_w.mean() > 1.4 * other_w.mean()  # measured 0.188 vs 0.101
assert silent_dup_w.mean() > 1.4 * silent_other_w.mean()  # measured 0.258 vs 0.112

# %% [markdown]
# Slots that claim the same object attend to each other about 1.9 times as much as other confident
# slots (0.188 against 0.101; uniform is 0.10): the self-attention does pick out duplicates. The
# silent slots attend even more to the confident slot that claims "their" object (0.258 against
# 0.112), which fits the picture of a slot that has heard someone else answer, though these averages
# alone do not prove that the attention is what silenced it. Turning "I see a duplicate" into "only
# one of us answers" every time is what a converged DETR does, and what this toy model, with its many
# duplicates, has only partly learned.

# %% [markdown]
# ## Summary
#
# * **Object queries** are `N` learned vectors (`nn.Embedding(100, 256)` in DETR, 10×128 in the toy
#   model). They act as *positional* codes of the prediction slots; the decoder's content state `tgt`
#   starts at zero.
# * **Decoder self-attention**: `q = k = tgt + query_pos`, `v = tgt` — the slots exchange information.
#   In layer 1 it can only add the constant `out_proj(b_v)`, because `tgt = 0`.
# * The decoder returns every layer's output through **one shared LayerNorm**: batch-first
#   `[6, B, 100, 256]` in the package, `[num_layer(6), num_query(100), B, 256]` sequence-first in the
#   process notes;
#   `hs.transpose(1, 2)` converts.
# * Trained queries **specialise** by image region and box size (query-slot plot), and their boxes
#   follow the objects of each image: in the toy model a query's centre spreads about three quarters as much as the object centres, and 96 % of the
#   objects get a confident box at IoU ≥ 0.5.
# * It also makes 5.1 confident predictions per image for 3.2 objects. Duplicate slots attend to each
#   other in the last decoder self-attention (about 1.9 times the weight of other pairs), but often
#   do not suppress each other, which costs AP.
#
# ## Exercises
#
# 1. Swap two rows of `query_embed.weight` in the trained model and rerun the query-slot plot. What
#    changes, and what does not? (Hint: is the decoder permutation-equivariant in its queries?)
# 2. Replace `tgt = 0` by `tgt = query_pos` (and remove `query_pos` from the attention inputs). Is the
#    first layer's self-attention still trivial?
# 3. The shared final norm is applied to all six outputs. Why does that matter for the auxiliary
#    losses, which put the same class and box heads on every layer?
# 4. For the trained model, find the two queries with the largest mutual attention on an image with
#    two objects of the same class. Do they predict the same object?
# 5. Repeat the duplicate-pair measurement with the first and second decoder layers' self-attention
#    (record `layers.0` and `layers.1` in the loop of section 4). In which layer do duplicate slots
#    start to attend to each other?
# 6. Remove duplicates by hand with `torchvision.ops.nms` (IoU 0.5) on the confident boxes and count
#    the predictions per image again. (The evaluation in `detr_lite.evaluate` uses no NMS, as DETR.)
