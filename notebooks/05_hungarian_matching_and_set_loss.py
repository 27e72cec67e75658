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
# # 05 · Hungarian matching and the set loss
#
# **Learning goal.** DETR does not predict "one box per anchor"; it predicts an unordered *set* of
# `Q` boxes (here `Q = 10`) and most of them should say "no object". To compute a loss against the
# `n` ground-truth boxes of an image it first decides **which prediction is responsible for which
# ground-truth box**: a one-to-one *bipartite matching* that minimises a total cost. The process
# notes ([notebook 01](01_backbone_and_flatten.ipynb)) put it in one line:
#
# > One pass predicts N objects, then the Hungarian algorithm finds the best match with the ground
# > truth; the cost contains the bounding-box and the class terms (box: IoU + L1; class: negative
# > log-likelihood).
#
# By the end of this notebook you can
#
# 1. build DETR's matching cost matrix by hand from three primitives (−probability, L1 distance on
#    `cxcywh`, −GIoU, weighted 1 / 5 / 2) and read it as a heatmap;
# 2. solve the assignment with `scipy.optimize.linear_sum_assignment`, check it against brute force
#    and against `detr_lite.matcher.HungarianMatcher`;
# 3. explain the official batching trick (one big cost matrix, split per image);
# 4. compute every term of the set loss by hand (cross-entropy with a 0.1 no-object weight, L1 and
#    GIoU normalised by the number of boxes, auxiliary losses per decoder layer) and check
#    `detr_lite.criterion.SetCriterion` gives the same numbers;
# 5. say what changes for Deformable DETR (focal loss) and for an image with no objects at all.
#
# Everything runs on the bundled synthetic shapes data and the shipped toy DETR checkpoint.

# %%
import itertools
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from detr_lite import viz
from detr_lite.checkpoint import load_checkpoint
from detr_lite.criterion import SetCriterion
from detr_lite.data.coco import build_dataset, collate_fn
from detr_lite.matcher import HungarianMatcher
from detr_lite.models import build_criterion

viz.use_style()  # the notebooks' figure dpi and font sizes
torch.manual_seed(0)
torch.set_grad_enabled(False)  # we only look at losses here; notebook 06 trains

# The notebook runs from notebooks/ (jupytext, nbval, JupyterLab) or from the repository root.
ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
DATA = ROOT / "data" / "shapes"
CKPT = ROOT / "data" / "checkpoints" / "detr_shapes.pt"

# %% [markdown]
# ## 1. One bundled image, its ground truth, and the trained toy DETR's predictions
#
# The shipped checkpoint is a small DETR (ResNet-18 cut after `layer3`, pretrained, with `layer2` and
# `layer3` fine-tuned during DETR training; 3 + 3 pre-norm transformer layers, `d = 128`, 10 queries)
# trained on the bundled shapes ([notebook 06](06_training_detr.ipynb)). Its config travels inside
# the checkpoint, so `load_checkpoint` rebuilds exactly that model. The validation split gives images
# resized to a small short side (`cfg.data.val_size`, 160 pixels) with targets in the package convention: **normalised `cxcywh` boxes** and raw COCO category ids (1..5
# here; id 0 is unused and the last logit, index 6, means "no object").

# %%
model, cfg, ckpt = load_checkpoint(CKPT)
val = build_dataset(DATA, "val2017", cfg.data, train=False)
names = {c["id"]: c["name"] for c in val.coco.loadCats(val.coco.getCatIds())}
print("checkpoint:", CKPT.name, "| preset:", cfg.name)
print("classes:", names)
print("num_classes (max id + 1):", cfg.model.num_classes, "| queries:", cfg.model.num_queries)
print("val short side:", cfg.data.val_size)


# %%
def n_objects(image_id: int) -> int:
    return len(val.coco.getAnnIds(imgIds=image_id, iscrowd=False))


# The first validation image with exactly four objects (deterministic: the data is bundled).
img_ids = val.ids  # the dataset indexes its images in this (sorted) order
index = next(k for k, i in enumerate(img_ids) if n_objects(i) == 4)
image, target = val[index]
H, W = image.shape[-2:]

# %%
# NBVAL_CHECK_OUTPUT
print(
    "image:",
    tuple(image.shape),
    "| boxes:",
    tuple(target["boxes"].shape),
    "| labels:",
    target["labels"].tolist(),
)
assert image.shape[0] == 3 and target["boxes"].shape == (4, 4) and target["labels"].shape == (4,)


# %%
def to_pixels_xyxy(boxes_cxcywh: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Normalised cxcywh -> absolute xyxy pixels (what the drawing helpers want)."""
    return box_convert(boxes_cxcywh, "cxcywh", "xyxy") * torch.tensor([w, h, w, h])


gt_xyxy = to_pixels_xyxy(target["boxes"], H, W)
viz.show_boxes(image, gt_xyxy, labels=target["labels"], class_names=names, title="ground truth")
plt.show()

# %% [markdown]
# One forward pass gives `Q = 10` predictions: a class distribution over 5 + 1 logits and a box per
# query. A well-trained DETR puts most queries' mass on "no object" and a few confident ones on the
# objects.
#
# Our toy checkpoint is a real but imperfect detector: large shapes are found well, small ones less
# well ([notebook 06](06_training_detr.ipynb) has its AP table). On this image
# (below) 8 of the 10 queries have p(object) > 0.5 for 4 objects. The four most sure of an object sit
# one on each, with the right class (q1, q2, q9 and q8). The fifth, q5 (square, 0.86), is a false
# positive: its box frames the cross's left arm and the top of the circle. Three more confident
# queries (q7, q0 and q4, 0.79, 0.77 and 0.64) are not even drawn; q7 and q0 are second guesses at
# the small square and the circle. The model is more sure of "some object here" than of "only one
# query per object". That makes it a good input for this notebook: the matcher must pick exactly one
# candidate per object, and the loss then pushes every other query, duplicates and the false
# positive included, towards "no object".

# %%
outputs = model(image[None], torch.zeros(1, H, W, dtype=torch.bool))
logits, boxes = outputs["pred_logits"][0], outputs["pred_boxes"][0]  # [Q, K+1], [Q, 4]
Q, K1 = logits.shape

# %%
# NBVAL_CHECK_OUTPUT
print(
    "pred_logits:", tuple(outputs["pred_logits"].shape), "| pred_boxes:", tuple(outputs["pred_boxes"].shape)
)
print("aux_outputs (one per earlier decoder layer):", len(outputs["aux_outputs"]))
assert (Q, K1) == (cfg.model.num_queries, cfg.model.num_classes + 1)
assert len(outputs["aux_outputs"]) == cfg.model.dec_layers - 1

# %%
prob = logits.softmax(-1)  # [Q, K+1]
p_object = 1 - prob[:, -1]
print(f"p(object) per query: min {p_object.min().item():.2f}, max {p_object.max().item():.2f}")
print(f"queries with p(object) > 0.5: {int((p_object > 0.5).sum())} for {len(target['labels'])} objects")
order = p_object.argsort(descending=True)
print(
    "by p(object):",
    ", ".join(f"q{int(q)} {names[int(prob[q, :-1].argmax())]} {p_object[q]:.2f}" for q in order),
)
keep = order[:5]  # the five queries most sure they hold an object
ax = viz.show_boxes(
    image,
    to_pixels_xyxy(boxes[keep], H, W),
    labels=prob[keep, :-1].argmax(-1),
    scores=p_object[keep],
    class_names=names,
    title="5 queries with the highest p(object)",
)
plt.show()

# %% [markdown]
# ## 2. The matching cost, built by hand
#
# For every (prediction `i`, ground truth `j`) pair DETR scores how bad it would be to make `i`
# responsible for `j`:
#
# $$C_{ij} = \lambda_\text{class}\,\big(-\hat p_i(c_j)\big) + \lambda_\text{L1}\,\lVert \hat b_i - b_j\rVert_1
#           + \lambda_\text{GIoU}\,\big(-\mathrm{GIoU}(\hat b_i, b_j)\big),\qquad \lambda = 1, 5, 2.$$
#
# * **class:** minus the predicted probability of the ground-truth class. The official code uses the
#   probability, not the log-probability the loss uses (a `1 - p` approximation; the constant 1 does
#   not change the argmin), which keeps the three terms on comparable scales.
# * **L1:** the sum of absolute differences of the normalised `(cx, cy, w, h)`, i.e. `torch.cdist(p=1)`.
# * **GIoU:** generalised IoU, in [−1, 1]; unlike IoU it still says *how far apart* two disjoint boxes are.
#
# We build each term from tensor primitives and check the library version.

# %%
tgt_labels, tgt_boxes = target["labels"], target["boxes"]  # [n], [n, 4]
n = len(tgt_labels)

cost_class = -prob[:, tgt_labels]  # [Q, n]: column j = -p(class of gt j) for every query
cost_l1 = (boxes[:, None, :] - tgt_boxes[None, :, :]).abs().sum(-1)  # [Q, n]
assert torch.allclose(cost_l1, torch.cdist(boxes, tgt_boxes, p=1), atol=1e-6)


# %% [markdown]
# GIoU written out: convert `cxcywh` → corners, then for every pair the intersection, the union and
# the smallest enclosing box `E`:
#
# $$\mathrm{IoU} = \frac{|A\cap B|}{|A\cup B|},\qquad \mathrm{GIoU} = \mathrm{IoU} - \frac{|E| - |A\cup B|}{|E|}.$$


# %%
def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def giou_by_hand(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU of xyxy boxes a [N, 4] and b [M, 4] -> [N, M]."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    # intersection: the overlap of the two boxes (zero width/height when they do not overlap)
    inter_w = (
        torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0])
    ).clamp(min=0)
    inter_h = (
        torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1])
    ).clamp(min=0)
    inter = inter_w * inter_h
    union = area_a[:, None] + area_b[None, :] - inter
    iou = inter / union
    # smallest enclosing box
    encl_w = torch.maximum(a[:, None, 2], b[None, :, 2]) - torch.minimum(a[:, None, 0], b[None, :, 0])
    encl_h = torch.maximum(a[:, None, 3], b[None, :, 3]) - torch.minimum(a[:, None, 1], b[None, :, 1])
    encl = encl_w * encl_h
    return iou - (encl - union) / encl


pred_xyxy, tgt_xyxy = cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(tgt_boxes)
assert torch.allclose(pred_xyxy, box_convert(boxes, "cxcywh", "xyxy"))
giou = giou_by_hand(pred_xyxy, tgt_xyxy)
assert torch.allclose(giou, generalized_box_iou(pred_xyxy, tgt_xyxy), atol=1e-6)
cost_giou = -giou

C = 1.0 * cost_class + 5.0 * cost_l1 + 2.0 * cost_giou  # weights: class 1, L1 5, GIoU 2

# %%
# NBVAL_CHECK_OUTPUT
for name, t in [("cost_class", cost_class), ("cost_l1", cost_l1), ("cost_giou", cost_giou), ("C", C)]:
    print(f"{name:10s} {tuple(t.shape)}")
    assert t.shape == (Q, n)
print("GIoU range ok:", bool(((giou >= -1) & (giou <= 1)).all()))

# %% [markdown]
# ## 3. Solving the assignment: `linear_sum_assignment`
#
# The Hungarian algorithm (scipy's `linear_sum_assignment`, a Jonker–Volgenant variant) picks `n`
# distinct rows (queries) for the `n` columns (ground-truth boxes) with the smallest total cost, in
# O(Q·n²) rather than by trying every assignment. It returns the row indices sorted, with the
# matching column for each.

# %%
row, col = linear_sum_assignment(C.numpy())
pred_idx, tgt_idx = torch.as_tensor(row, dtype=torch.int64), torch.as_tensor(col, dtype=torch.int64)
for i, j in zip(row, col):
    print(
        f"query {i:2d} <-> gt {j} ({names[int(tgt_labels[j])]:8s}) | -p {cost_class[i, j].item():+.3f} "
        f"| L1 {cost_l1[i, j].item():.3f} | -GIoU {cost_giou[i, j].item():+.3f} | C {C[i, j].item():+.3f}"
    )
print(f"total cost of the matching: {C[row, col].sum().item():.4f}")

# %%
# NBVAL_CHECK_OUTPUT
print("pred_idx:", tuple(pred_idx.shape), pred_idx.dtype, "| tgt_idx:", tuple(tgt_idx.shape), tgt_idx.dtype)
assert len(pred_idx) == len(tgt_idx) == min(Q, n)
assert len(set(row.tolist())) == n and sorted(col.tolist()) == list(range(n))  # one-to-one
assert (np.diff(row) > 0).all()  # rows come back sorted

# %%
fig, (ax0, ax1) = plt.subplots(
    1, 2, figsize=(viz.FIG_WIDTH, 3), dpi=viz.DPI, gridspec_kw={"width_ratios": [2, 1.2]}, layout="constrained"
)
viz.show_cost_matrix(
    C,
    pred_idx,
    tgt_idx,
    ax=ax0,
    title="cost C (dark = cheap); outlined = Hungarian choice",
    tgt_names=[f"gt{j} {names[int(c)]}" for j, c in enumerate(tgt_labels)],
)
viz.show_matching(
    image,
    pred_xyxy * torch.tensor([W, H, W, H]),
    gt_xyxy,
    pred_idx,
    tgt_idx,
    ax=ax1,
    title="solid = gt, dashed = matched query",
)
plt.show()

# %% [markdown]
# Each box also has a **runner-up**: the cheapest query the matching did *not* give it. A confident
# runner-up is a duplicate; being unmatched, it gets "no object" as its target in the loss below.

# %%
for i, j in zip(row, col):
    k = next(int(q) for q in C[:, j].argsort() if q != i)  # cheapest query other than the matched one
    print(
        f"gt {j} ({names[int(tgt_labels[j])]:8s}): matched query {i:2d} (C {C[i, j].item():+.3f}) | runner-up"
        f" query {k:2d} (C {C[k, j].item():+.3f}, p(object) {p_object[k].item():.2f})"
    )

# %% [markdown]
# Both objects with two confident candidates went to the candidate that is better on every term. The
# circle went to query 9 (C −1.907: −p −0.975, L1 0.065, −GIoU −0.627), not to query 0 (C −1.394,
# p(object) 0.77), which has a less sure class (−p −0.753) and a looser box (L1 0.107, −GIoU
# −0.588); the small square went to query 8 (C −2.230: −p −0.770, L1 0.014, −GIoU −0.766), not to
# query 7 (C −1.418, p(object) 0.79; −p −0.700, L1 0.046, −GIoU −0.474), by a margin of 0.812. Here
# the surer class and the tighter box belong to the same query; that need not be so, and since the
# cost scores class and box together, on another image a tighter box can outweigh a surer class. The
# cross and the big square have no serious rival: they went to queries 1 and 2 (C −2.558 and
# −2.351), and the runner-up of both is query 4 (C +2.390 and +2.239), which does call its box a
# cross (p(object) 0.64), but the box is far off. That is how DETR learns to do without non-maximum
# suppression: a second query on the same object, like query 0 or 7 here, is trained to say "no
# object".
#
# ### Checking the optimum by brute force
#
# With `Q = 10` queries and `n = 4` boxes there are 10·9·8·7 = 5040 injective assignments —
# few enough to enumerate them all with numpy and confirm nothing beats the Hungarian answer.

# %%
perms = np.array(list(itertools.permutations(range(Q), n)))  # [P, n]: perms[p, j] = query for gt j
totals = C.numpy()[perms, np.arange(n)].sum(1)
best = perms[totals.argmin()]
print(f"{len(perms)} assignments, best total {totals.min():.4f}, hungarian {C[row, col].sum().item():.4f}")
assert np.isclose(totals.min(), C[row, col].sum().item(), atol=1e-5)
assert all(best[col[k]] == row[k] for k in range(n))  # the same pairs

# %% [markdown]
# Why not simply let every ground-truth box take its cheapest query? Because two boxes can want the
# same query. A 3×3 toy cost makes the point: greedy (in column order) pays more than the optimum.

# %%
toy = np.array([[1.0, 2.0, 9.0], [2.0, 9.0, 9.0], [9.0, 3.0, 4.0]])  # rows = queries, cols = gts
greedy_cost, used = 0.0, set()
for j in range(3):
    i = min((i for i in range(3) if i not in used), key=lambda i: toy[i, j])
    used.add(i)
    greedy_cost += toy[i, j]
r, c = linear_sum_assignment(toy)
brute = min(sum(toy[p[j], j] for j in range(3)) for p in itertools.permutations(range(3)))
print(f"greedy {greedy_cost}, hungarian {toy[r, c].sum()}, brute force {brute}")
assert toy[r, c].sum() == brute < greedy_cost

# %% [markdown]
# ### The package matcher gives the identical indices
#
# `HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)` takes the model outputs and a list of
# target dicts and returns one `(pred_idx, tgt_idx)` pair of int64 tensors per image.

# %%
matcher = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)
[(m_pred, m_tgt)] = matcher({k: v for k, v in outputs.items() if k != "aux_outputs"}, [target])

# %%
# NBVAL_CHECK_OUTPUT
print("package:", tuple(m_pred.shape), m_pred.dtype, tuple(m_tgt.shape), m_tgt.dtype)
assert torch.equal(m_pred, pred_idx) and torch.equal(m_tgt, tgt_idx)
print("package indices == hand-built indices")

# %% [markdown]
# ## 4. Batched matching: one big cost matrix, split per image
#
# The official matcher does not loop over images to build costs. It flattens the batch,
# `[B, Q, ·] → [B·Q, ·]`, concatenates all targets (`N = Σ nᵢ` boxes), builds **one** `[B·Q, N]`
# cost matrix, reshapes it to `[B, Q, N]` and splits the last axis by the per-image target counts.
# Block `i` of the split, `[B, Q, nᵢ]`, still holds every image's queries; only the slice `[i]`
# (image i's queries × image i's boxes) is used. The off-diagonal blocks are wasted work, but one
# large matrix op is much faster on a GPU than B small ones.
#
# The batch below has three images, the last one with **no objects**, to show that an empty split
# (`nᵢ = 0`) just yields an empty match.

# %%
empty_index = next(k for k, i in enumerate(img_ids) if n_objects(i) == 0)
other_index = next(k for k, i in enumerate(img_ids) if n_objects(i) == 2)
images, mask, targets = collate_fn([val[index], val[other_index], val[empty_index]])
batch_out = model(images, mask)
B = images.shape[0]
sizes = [len(t["boxes"]) for t in targets]

out_prob = batch_out["pred_logits"].flatten(0, 1).softmax(-1)  # [B*Q, K+1]
out_bbox = batch_out["pred_boxes"].flatten(0, 1)  # [B*Q, 4]
all_labels = torch.cat([t["labels"] for t in targets])  # [N]
all_boxes = torch.cat([t["boxes"] for t in targets])  # [N, 4]
C_all = (
    -out_prob[:, all_labels]
    + 5 * torch.cdist(out_bbox, all_boxes, p=1)
    - 2
    * generalized_box_iou(box_convert(out_bbox, "cxcywh", "xyxy"), box_convert(all_boxes, "cxcywh", "xyxy"))
)
C_all = C_all.view(B, Q, -1)
assert torch.allclose(C_all, matcher.cost_matrix(batch_out, targets), atol=1e-5)  # the package's batched cost
blocks = C_all.split(sizes, dim=-1)
batch_indices = []
for i, c in enumerate(blocks):
    r, c_ = linear_sum_assignment(c[i].numpy())
    batch_indices.append((torch.as_tensor(r, dtype=torch.int64), torch.as_tensor(c_, dtype=torch.int64)))

# %%
# NBVAL_CHECK_OUTPUT
print("images", tuple(images.shape[:1]), "| mask", tuple(mask.shape[:1]), "| targets per image:", sizes)
print("flattened probs", tuple(out_prob.shape), "| flattened boxes", tuple(out_bbox.shape))
print("all targets: labels", tuple(all_labels.shape), "boxes", tuple(all_boxes.shape))
print("C_all", tuple(C_all.shape), "-> split by", sizes, "->", [tuple(b.shape) for b in blocks])
print("used blocks c[i]:", [tuple(b[i].shape) for i, b in enumerate(blocks)])
print("matches per image:", [len(p) for p, _ in batch_indices])
assert C_all.shape == (B, Q, sum(sizes)) and [len(p) for p, _ in batch_indices] == sizes

# %%
fig, ax = plt.subplots(figsize=(viz.FIG_WIDTH, 2.2), dpi=viz.DPI, layout="constrained")
im = ax.imshow(C_all.flatten(0, 1).T.numpy(), cmap="viridis", aspect="auto", interpolation="nearest")
fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="cost")
start = 0
for i, s in enumerate(sizes):  # outline the blocks that are actually used
    if s:
        ax.add_patch(plt.Rectangle((i * Q - 0.5, start - 0.5), Q, s, fill=False, edgecolor="red", lw=2))
    start += s
ax.set_xlabel("query index in the flattened batch (B·Q)", fontsize=8)
ax.set_ylabel("target index (N)", fontsize=8)
ax.set_title("one [B·Q, N] cost matrix; red = the per-image blocks the matcher uses", fontsize=8)
plt.show()

# %%
pkg_indices = matcher(batch_out, targets)
for (p, t), (hp, ht) in zip(pkg_indices, batch_indices):
    assert torch.equal(p, hp) and torch.equal(t, ht)
print("hand-batched indices == package indices for all", B, "images")

# %% [markdown]
# The package matcher's default goes one step further (`layout="padded"`): it pads every image's
# targets to the largest count `T_max` and computes a `[B, Q, T_max]` cost in the same few tensor
# ops, so the wasted off-diagonal blocks are never computed. The official flat layout is kept as
# `layout="flat"`; both give the same assignment.

# %%
padded = matcher.padded_cost(batch_out, targets)
flat_indices = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2, layout="flat")(batch_out, targets)
for b_, n_b in enumerate(sizes):
    assert torch.allclose(padded[b_, :, :n_b], blocks[b_][b_], atol=1e-5)  # the same per-image blocks
    assert all(torch.equal(x, y) for x, y in zip(flat_indices[b_], pkg_indices[b_]))

# %%
# NBVAL_CHECK_OUTPUT
print("padded cost:", tuple(padded.shape), "= [B, Q, T_max] vs flat", tuple(C_all.shape), "= [B, Q, sum T]")
assert padded.shape == (B, Q, max(sizes))

# %% [markdown]
# ## 5. The set loss, term by term
#
# Once matched, the loss is an ordinary per-query loss:
#
# * **classification `loss_ce`:** every query gets a target class — its matched box's class, or
#   "no object" (index `K = 6`) for the unmatched ones. Cross-entropy over all `B·Q` queries, but the
#   no-object class is down-weighted by `eos_coef = 0.1`, since most queries are unmatched (24 of
#   the 30 in our three-image batch; a larger share with COCO's 100 queries). With
#   class weights, PyTorch's mean is a *weighted* mean: `Σ wᵢ·nllᵢ / Σ wᵢ`.
# * **box `loss_bbox`:** L1 between matched predicted and ground-truth `cxcywh`, summed and divided by
#   `num_boxes` (the number of ground-truth boxes in the batch, at least 1; under DDP averaged over
#   processes).
# * **`loss_giou`:** `1 − GIoU` of matched pairs, summed, divided by `num_boxes`.
# * **auxiliary losses:** the same three terms for the output of every earlier decoder layer (each
#   matched *separately*), with suffix `_0, _1, …`.
#
# The total is `1·ce + 5·bbox + 2·giou`, summed over the final and auxiliary layers. Two logged, not
# optimised, numbers come along: `class_error` (100 − top-1 accuracy of matched queries) and
# `cardinality_error` (|#predicted objects − #boxes|, averaged over images).

# %%
num_classes = cfg.model.num_classes  # 6 -> the no-object index is 6
empty_weight = torch.ones(num_classes + 1)
empty_weight[-1] = 0.1
num_boxes = max(float(sum(sizes)), 1.0)


def set_loss_by_hand(out: dict, indices: list) -> dict:
    """loss_ce, loss_bbox, loss_giou of one decoder layer's output, written out."""
    src_logits = out["pred_logits"]  # [B, Q, K+1]
    batch_idx = torch.cat([torch.full_like(p, b) for b, (p, _) in enumerate(indices)])
    src_idx = torch.cat([p for p, _ in indices])
    matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
    target_classes = torch.full(src_logits.shape[:2], num_classes, dtype=torch.int64)  # all "no object"
    target_classes[batch_idx, src_idx] = matched_labels
    nll = -src_logits.log_softmax(-1).gather(-1, target_classes[..., None])[..., 0]  # [B, Q]
    w = empty_weight[target_classes]  # 1 for matched queries, 0.1 for the rest
    loss_ce = (w * nll).sum() / w.sum()
    assert torch.allclose(loss_ce, F.cross_entropy(src_logits.transpose(1, 2), target_classes, empty_weight))

    src_boxes = out["pred_boxes"][batch_idx, src_idx]  # [N, 4]
    tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])  # [N, 4]
    loss_bbox = (src_boxes - tgt).abs().sum() / num_boxes
    loss_giou = (
        1 - torch.diag(giou_by_hand(cxcywh_to_xyxy(src_boxes), cxcywh_to_xyxy(tgt)))
    ).sum() / num_boxes

    acc = (src_logits[batch_idx, src_idx].argmax(-1) == matched_labels).float().mean() * 100
    n_pred = (src_logits.argmax(-1) != num_classes).sum(1).float()
    card = (n_pred - torch.tensor(sizes, dtype=torch.float)).abs().mean()
    return {
        "loss_ce": loss_ce,
        "loss_bbox": loss_bbox,
        "loss_giou": loss_giou,
        "class_error": 100 - acc,
        "cardinality_error": card,
    }


hand = set_loss_by_hand(batch_out, batch_indices)
for i, aux in enumerate(batch_out["aux_outputs"]):  # each decoder layer is matched on its own
    aux_indices = matcher(aux, targets)
    aux_terms = set_loss_by_hand(aux, aux_indices)
    hand.update({f"{k}_{i}": aux_terms[k] for k in ("loss_ce", "loss_bbox", "loss_giou")})

for k, v in hand.items():
    print(f"{k:20s} {v.item():9.4f}")
n_predicted = (batch_out["pred_logits"].argmax(-1) != num_classes).sum(1).tolist()
print("predicted objects per image (argmax is not 'no object'):", n_predicted, "| true boxes:", sizes)
print(f"matched queries: {sum(sizes)} of {B * Q}; the other {B * Q - sum(sizes)} have the target 'no object'")

# %% [markdown]
# The `cardinality_error` above (2.33) is large because the model predicts more objects than there
# are (8 and 5 for images with 4 and 2 boxes): the duplicates and other extra confident queries we
# met in sections 1 and 3. It is only
# logged; the `loss_ce` term is what trains the unmatched duplicates towards "no object".

# %% [markdown]
# Now the package criterion, built from the checkpoint's config (class weights 1 / 5 / 2, `eos_coef
# = 0.1`, aux losses on). It returns the **unweighted** terms; the weights live in
# `criterion.weight_dict`.

# %%
criterion = build_criterion(cfg.model)
assert isinstance(criterion, SetCriterion)
pkg = criterion(batch_out, targets)
for k, v in hand.items():
    assert torch.allclose(pkg[k], v, atol=1e-5), (k, pkg[k], v)
total_hand = sum(hand[k] * w for k, w in criterion.weight_dict.items() if k in hand)
total_pkg = sum(pkg[k] * w for k, w in criterion.weight_dict.items() if k in pkg)
print(f"total weighted loss: by hand {total_hand.item():.4f}, package {total_pkg.item():.4f}")
assert torch.allclose(total_hand, total_pkg, atol=1e-5)

# %%
# NBVAL_CHECK_OUTPUT
print("weight_dict:", {k: float(v) for k, v in sorted(criterion.weight_dict.items())})
print("loss keys:", sorted(k for k in pkg if k.startswith("loss")))
print(
    "every term matches the hand computation:", all(torch.allclose(pkg[k], hand[k], atol=1e-5) for k in hand)
)

# %% [markdown]
# ## 6. The focal variant (Deformable DETR, brief)
#
# Deformable DETR replaces the softmax over `K + 1` classes by `K` independent sigmoids (no explicit
# no-object logit: an unmatched query simply has every class as a negative) and trains them with the
# **sigmoid focal loss** (α = 0.25, γ = 2), which down-weights the many easy negatives. Two things
# change:
#
# * **matching class cost:** the focal loss of "this is class c" minus the focal loss of "this is not
#   class c", evaluated at p = σ(logit):
#   `α(1−p)^γ·(−log p) − (1−α)p^γ·(−log(1−p))`, with weight 2 instead of 1;
# * **classification loss:** `sigmoid_focal_loss` summed over all queries and classes, divided by
#   `num_boxes` (the official code writes `mean(1).sum() / num_boxes * Q`, the same number).
#
# We check both against the package with made-up logits `[B, Q, K]`.

# %%
g = torch.Generator().manual_seed(0)
focal_logits = torch.randn(B, Q, num_classes, generator=g) * 2
focal_out = {"pred_logits": focal_logits, "pred_boxes": batch_out["pred_boxes"]}
alpha, gamma = 0.25, 2.0

p = focal_logits.flatten(0, 1).sigmoid()  # [B*Q, K]
pos = alpha * (1 - p) ** gamma * -(p + 1e-8).log()
neg = (1 - alpha) * p**gamma * -(1 - p + 1e-8).log()
C_focal = (
    2 * (pos - neg)[:, all_labels]
    + 5 * torch.cdist(out_bbox, all_boxes, p=1)
    - 2
    * generalized_box_iou(box_convert(out_bbox, "cxcywh", "xyxy"), box_convert(all_boxes, "cxcywh", "xyxy"))
)
C_focal = C_focal.view(B, Q, -1).split(sizes, -1)
focal_indices = [
    tuple(torch.as_tensor(a, dtype=torch.int64) for a in linear_sum_assignment(c[i].numpy()))
    for i, c in enumerate(C_focal)
]
focal_matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2, focal=True)
for (a, b), (c, d) in zip(focal_matcher(focal_out, targets), focal_indices):
    assert torch.equal(a, c) and torch.equal(b, d)

onehot = torch.zeros(B, Q, num_classes)  # unmatched queries: all zeros (negative for every class)
for b_, (pi, ti) in enumerate(focal_indices):
    onehot[b_, pi, targets[b_]["labels"][ti]] = 1.0
loss_focal = sigmoid_focal_loss(focal_logits, onehot, alpha=alpha, gamma=gamma, reduction="sum") / num_boxes

focal_criterion = SetCriterion(
    num_classes,
    focal_matcher,
    weight_dict={"loss_ce": 2, "loss_bbox": 5, "loss_giou": 2},
    focal=True,
    focal_alpha=alpha,
)
pkg_focal = focal_criterion(focal_out, targets)
print(f"focal loss_ce: by hand {loss_focal.item():.4f}, package {pkg_focal['loss_ce'].item():.4f}")
assert torch.allclose(loss_focal, pkg_focal["loss_ce"], atol=1e-5)

# %%
# NBVAL_CHECK_OUTPUT
print(
    "focal logits:",
    tuple(focal_logits.shape),
    "(K classes, no no-object logit) | one-hot targets:",
    tuple(onehot.shape),
)
print("focal matching identical to the package:", True)

# %% [markdown]
# ## 7. An image with zero targets
#
# Empty images are normal (the bundled data has some on purpose). The cost matrix is `[Q, 0]`, the
# assignment is empty, every query's target is "no object", and the box losses have nothing to sum:
# they are exactly 0, and `num_boxes` is clamped to 1 so nothing divides by zero. The classification
# loss is then the plain mean of `−log p(no object)` (all weights are 0.1, which cancels).

# %%
empty_target = targets[2]
single = {k: v[2:3] for k, v in batch_out.items() if k != "aux_outputs"}
[(e_pred, e_tgt)] = matcher(single, [empty_target])
empty_loss = SetCriterion(num_classes, matcher, weight_dict={"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2})(
    single, [empty_target]
)
by_hand_ce = -single["pred_logits"][0].log_softmax(-1)[:, -1].mean()
print(f"loss_ce {empty_loss['loss_ce'].item():.4f} (by hand {by_hand_ce.item():.4f})")

# %%
# NBVAL_CHECK_OUTPUT
print(
    "empty target boxes:",
    tuple(empty_target["boxes"].shape),
    "| matched:",
    tuple(e_pred.shape),
    tuple(e_tgt.shape),
)
print("loss_bbox:", float(empty_loss["loss_bbox"]), "| loss_giou:", float(empty_loss["loss_giou"]))
assert e_pred.numel() == 0 and e_tgt.numel() == 0
assert float(empty_loss["loss_bbox"]) == 0.0 and float(empty_loss["loss_giou"]) == 0.0
assert torch.allclose(empty_loss["loss_ce"], by_hand_ce, atol=1e-6)

# %% [markdown]
# ## Summary
#
# * DETR's loss starts with a **one-to-one matching** between `Q` predictions and `n` ground-truth
#   boxes. The cost of a pair is `1·(−p(class)) + 5·L1(cxcywh) + 2·(−GIoU)`; `linear_sum_assignment`
#   finds the cheapest assignment exactly (we confirmed it against all 5040 assignments), and
#   `HungarianMatcher` returns the same indices.
# * The official batching trick builds one `[B·Q, N]` cost matrix, views it as `[B, Q, N]`, splits
#   the last axis by the per-image box counts and keeps only the diagonal blocks.
# * The **set loss** is then per-query: cross-entropy with a 0.1 weight on "no object", L1 and
#   `1 − GIoU` on matched pairs divided by the number of boxes, repeated (with its own matching) for
#   every decoder layer. `SetCriterion` reproduces each hand-computed term.
# * Deformable DETR swaps softmax+CE for sigmoid focal loss (in the matching cost too); an image
#   with no objects needs no special case: empty matching, box losses 0, all queries pushed to
#   "no object".
#
# Because the matching is one-to-one, DETR needs **no non-maximum suppression**: a second query on
# the same object is matched to nothing and is trained to say "no object".
#
# ## Exercises
#
# 1. Set the GIoU weight to 0 and the L1 weight to 5 and re-match: which pairs change? Try an image
#    with small and large objects — why does L1 alone favour getting the *large* boxes right?
# 2. Replace `−p` in the class cost by `−log p`. Does the matching of the trained model change? What
#    happens to the relative scale of the three terms for a query with p ≈ 0?
# 3. Show that adding a constant to a whole column (or row) of `C` never changes the assignment.
#    Why does that make the "1 − p" vs "−p" question irrelevant?
# 4. Set `eos_coef = 1.0` and recompute `loss_ce` for the batch. Which queries dominate the loss now,
#    and what would that do to training?
# 5. Time `linear_sum_assignment` on random `[300, n]` matrices for n = 10, 50, 100 (Deformable DETR
#    uses 300 queries). How does it scale?
# 6. Compute the focal loss of one negative query with p = 0.01 and one with p = 0.6 by hand. How much
#    larger is the second, and how does γ control that ratio?
