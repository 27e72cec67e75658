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
# # 06 · Training DETR on the bundled data
#
# **Learning goal.** Put the stages of notebooks 01–05 together and *train* DETR: see what the
# model is fed (box-aware augmentation, batches padded with a mask), watch the set loss fall in a
# short live run on this machine's CPU, and then study a model that was trained for longer — the
# shipped toy checkpoint — with the numbers the field reports (COCO AP via pycocotools), its
# predictions, and what its encoder and decoder attend to.
#
# By the end you can
#
# 1. explain DETR's training augmentation (flip, multi-scale resize, random crop) and why a batch
#    needs a padding mask;
# 2. write one DETR training step (forward → set loss → weighted sum → backward → clip → step) and
#    run the package's `train_one_epoch`;
# 3. read a training recipe and curve, and compute the COCO AP table yourself with
#    `detr_lite.engine.evaluate`;
# 4. look at encoder self-attention and decoder cross-attention of a trained model, and explore
#    them interactively.
#
# This is also where the toy recipe is taught: what `make train` does, and which of its choices
# matter (section 5; the [model card](../data/checkpoints/detr_shapes.md) has the measured effect of
# each).

# %%
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display
from torch.utils.data import DataLoader, Subset
from torchvision.ops import box_convert, box_iou

from detr_lite import viz
from detr_lite.checkpoint import load_checkpoint
from detr_lite.config import get_config
from detr_lite.data.coco import build_dataset, collate_fn
from detr_lite.engine import ModelEma, build_optimizer, evaluate, train_one_epoch, weighted_loss
from detr_lite.models import build_criterion, build_model, build_postprocessor
from detr_lite.pretrain import DenseHead, dense_targets, load_backbone_weights, pretext_loss
from detr_lite.transformer import capture_attention
from detr_lite.utils import AP_KEYS, format_ap_table, read_jsonl, seed_everything

seed_everything(0)
viz.use_style()  # the notebooks' figure dpi and font sizes

# The notebook runs from notebooks/ (jupytext, nbval, JupyterLab) or from the repository root.
ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
DATA = ROOT / "data" / "shapes"
CKPT_DIR = ROOT / "data" / "checkpoints"
device = torch.device("cpu")

# %% [markdown]
# ## 1. The data: bundled shapes in COCO layout
#
# `data/shapes` is a small synthetic detection set in the exact COCO 2017 layout (PNG images +
# `annotations/instances_{train,val}2017.json`), so the same `build_dataset` reads real COCO. Five
# shape classes with raw category ids 1..5, objects in all three COCO size ranges, overlaps,
# textured backgrounds, and some images with no objects at all.
#
# The `detr-shapes` preset scales the official recipe down to small images (printed below): the
# short side is drawn from a handful of sizes around 100 pixels (COCO: 480..800 in steps of 32), and
# for the last 20 of its 90 epochs every training size is multiplied by 1.25 (`data.late_scale`:
# short side 120..160, about the bundled images' own size). This is **progressive resizing**: cheap
# small images for most of the run, the evaluation size at its end. Validation resizes to a single
# short side, the largest training size (COCO: 800; here 160). Small images are what make CPU
# training possible at all.

# %%
cfg = get_config("detr-shapes")
train_ds = build_dataset(DATA, "train2017", cfg.data, train=True)
val_ds = build_dataset(DATA, "val2017", cfg.data, train=False)
names = {c["id"]: c["name"] for c in val_ds.coco.loadCats(val_ds.coco.getCatIds())}
print("train scales:", cfg.data.train_scales, "max", cfg.data.train_max_size)
print(
    "crop branch: resize to",
    cfg.data.crop_resize_scales,
    "then crop",
    cfg.data.crop_size,
    "| val size",
    cfg.data.val_size,
)
print(f"after epoch {cfg.data.late_scale_after}: every training size x{cfg.data.late_scale} (data.late_scale)")

# %%
# NBVAL_CHECK_OUTPUT
print("train images:", len(train_ds), "| val images:", len(val_ds), "| classes:", names)
assert len(train_ds) > 0 and len(val_ds) > 0 and sorted(names) == list(range(1, cfg.model.num_classes))


# %% [markdown]
# ### Augmentation, box-aware
#
# Training images go through the official DETR pipeline built from `torchvision.transforms.v2`:
# random horizontal flip, then *either* a random multi-scale resize *or* resize → random crop →
# multi-scale resize. `v2` moves the boxes with the pixels (they are `tv_tensors.BoundingBoxes`), and
# `SanitizeBoundingBoxes` drops boxes a crop removed. Below: one training image, five random draws.


# %%
def pixels_xyxy(target: dict) -> torch.Tensor:
    """A target's normalised cxcywh boxes -> absolute xyxy pixels of its (transformed) image."""
    h, w = target["size"].tolist()
    return box_convert(target["boxes"], "cxcywh", "xyxy") * torch.tensor([w, h, w, h])


seed_everything(1)
# a training image with three objects (ids come from the bundled annotations, so this is fixed)
aug_index = next(k for k, i in enumerate(train_ds.ids) if len(train_ds.coco.getAnnIds(imgIds=i)) == 3)
fig, axes = viz.subplots(1, 5)
for ax in axes[0]:
    img, tgt = train_ds[aug_index]
    viz.show_boxes(
        img,
        pixels_xyxy(tgt),
        labels=tgt["labels"],
        class_names=names,
        ax=ax,
        title=f"{tuple(img.shape[-2:])}, {len(tgt['boxes'])} boxes",
    )
fig.suptitle("one training image, five random draws of the augmentation (boxes follow the pixels)")
plt.show()

# %% [markdown]
# ### A batch and its padding mask
#
# Images in a batch have different sizes. `collate_fn` pads them (bottom and right) to the largest
# height and width and returns a mask that is **True on padded pixels**. The mask follows the image
# down to the feature grid and tells attention to ignore padded keys (notebook 01).

# %%
seed_everything(2)
images, mask, targets = collate_fn([train_ds[i] for i in range(4)])
fig, axes = viz.subplots(2, 4)
for b in range(4):
    h, w = targets[b]["size"].tolist()
    viz.show_boxes(
        images[b],
        pixels_xyxy(targets[b]),
        labels=targets[b]["labels"],
        class_names=names,
        ax=axes[0, b],
        title=f"image {b}: {h}x{w}",
    )
    viz.show_mask(mask[b], ax=axes[1, b])
fig.suptitle("a batch of four padded images (top) and their padding masks (bottom, white = pad)")
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
print("images:", images.dtype, "[B, 3, Hmax, Wmax] with B =", images.shape[0], "| mask:", mask.dtype)
for b, t in enumerate(targets):
    h, w = t["size"].tolist()
    assert not mask[b, :h, :w].any() and mask[b].sum() == mask.shape[1] * mask.shape[2] - h * w
    assert t["boxes"].shape[1] == 4 and t["boxes"].min() >= 0 and t["boxes"].max() <= 1
assert images.shape[0] == mask.shape[0] == 4 and images.shape[-2:] == mask.shape[-2:]
assert tuple(images.shape[-2:]) == tuple(max(t["size"][k].item() for t in targets) for k in (0, 1))
print("mask is True exactly outside each image's (h, w); boxes are normalised cxcywh")

# %% [markdown]
# ## 2. Stage 0: a backbone that already sees shapes
#
# Official DETR never trains its ResNet from random weights: it starts from ImageNet weights and
# freezes their BatchNorm statistics. Those weights can't be downloaded here, and a DETR whose
# backbone *and* transformer both start random stays for a long time on a plateau where it predicts
# the same boxes for every image ([the from-scratch record](../data/checkpoints/detr_shapes_scratch.md)).
# So the `detr-shapes` recipe first **pretrains the backbone** on the training split — the toy
# stand-in for ImageNet — with a dense pretext that needs no transformer and no matching
# (`python -m detr_lite.pretrain`, 20 epochs):
#
# * a class heatmap per feature cell, 1 at each object's centre and a Gaussian bump around it
#   (CenterNet's target and focal loss);
# * inside each box, the distances from the cell centre to the four box sides (FCOS's `ltrb`, L1).
#
# Then DETR trains on top of the pretrained backbone and fine-tunes part of it, as official DETR
# fine-tunes its ImageNet ResNet: BatchNorm, the stem and `layer1` stay frozen, `layer2` and `layer3`
# train at a smaller learning rate than the transformer (`lr_backbone`, printed with the optimizer
# groups in section 3). Below: the pretext targets of the batch above on the stride-16 grid the toy
# backbone produces.

# %%
stride = 16  # ResNet-18 stopped after layer3
grid = (-(-images.shape[-2] // stride), -(-images.shape[-1] // stride))  # ceil: the backbone's grid
heat, ltrb, inside = dense_targets(targets, grid, images.shape[-2:], cfg.model.num_classes)
fig, axes = viz.subplots(2, 4, row_height=1.8)
for b in range(4):
    heat_im = axes[0, b].imshow(heat[b].amax(0), cmap="magma", vmin=0, vmax=1)
    axes[0, b].set_title(f"image {b}: centre heatmap")
    ltrb_im = axes[1, b].imshow(ltrb[b, 0] * inside[b], cmap="viridis", vmin=0, vmax=float(ltrb[:, 0].max()))
    axes[1, b].set_title(f"image {b}: distance to left side")
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.colorbar(heat_im, ax=list(axes[0]), fraction=0.02, pad=0.01, label="target")
fig.colorbar(ltrb_im, ax=list(axes[1]), fraction=0.02, pad=0.01, label="normalised distance")
fig.suptitle("pretext targets on the stride-16 grid: max over classes (top), left-side distance inside boxes (bottom)")
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
print("heat", tuple(heat.shape), "[B, K, h, w] | ltrb", tuple(ltrb.shape), "| inside", tuple(inside.shape))
assert heat.shape == (4, cfg.model.num_classes, *grid) and ltrb.shape == (4, 4, *grid)
assert all(heat[b].eq(1).sum() == len(targets[b]["boxes"]) for b in range(4))  # one peak per object
head = DenseHead(256, cfg.model.num_classes)
feat = torch.randn(4, 256, *grid)  # stands in for the backbone's features here
losses = pretext_loss(*head(feat), heat, ltrb, inside, ~mask[:, ::stride, ::stride])
print("pretext terms:", sorted(losses))
assert all(torch.isfinite(v) for v in losses.values())

# %% [markdown]
# ## 3. One training step, written out
#
# The whole DETR training recipe is five lines (the official one: AdamW, weight decay 1e-4,
# gradient clipping at max-norm 0.1; the backbone gets its own learning rate):
#
# ```
# outputs = model(images, mask)                         # pred_logits, pred_boxes, aux_outputs
# loss_dict = criterion(outputs, targets)               # Hungarian matching + set loss (notebook 05)
# loss = sum(loss_dict[k] * w for k, w in weight_dict)  # 1·ce + 5·L1 + 2·GIoU, every decoder layer
# loss.backward(); clip_grad_norm_(params, 0.1); optimizer.step()
# ```

# %%
seed_everything(0)
model = build_model(cfg.model).to(device)
# the recipe starts DETR from the pretext backbone; here we borrow the backbone inside the shipped
# checkpoint (the same pretext backbone after its layer2-3 were fine-tuned with DETR)
print(load_backbone_weights(model, CKPT_DIR / "detr_shapes.pt").replace(str(ROOT) + "/", ""))
criterion = build_criterion(cfg.model)
optimizer = build_optimizer(model, cfg.train)
print("parameters:", sum(p.numel() for p in model.parameters()) / 1e6, "M")
print("optimizer groups:", [(g["name"], g["lr"], len(g["params"])) for g in optimizer.param_groups])

model.train()
outputs = model(images, mask)
loss_dict = criterion(outputs, targets)
loss = weighted_loss(loss_dict, criterion.weight_dict)
optimizer.zero_grad()
loss.backward()
grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_max_norm)
optimizer.step()
print(
    f"first step: loss {loss.item():.3f}, gradient norm before clipping {grad_norm.item():.2f} -> clipped to {cfg.train.clip_max_norm}"
)

# %%
# NBVAL_CHECK_OUTPUT
print("pred_logits", tuple(outputs["pred_logits"].shape), "| pred_boxes", tuple(outputs["pred_boxes"].shape))
print(
    "weighted terms:",
    len([k for k in criterion.weight_dict if k in loss_dict]),
    "(3 per decoder layer x",
    cfg.model.dec_layers,
    ")",
)
assert outputs["pred_logits"].shape == (4, cfg.model.num_queries, cfg.model.num_classes + 1)
assert torch.isfinite(loss)

# %% [markdown]
# ## 4. A short live run
#
# Now the package's `train_one_epoch` (the same step plus logging, AMP on GPUs, and a clear stop on a
# non-finite loss), over a 32-image subset of the training split, for a few hundred steps. Its `log`
# callback gets one record per iteration; the transformer and the heads train at lr 2e-4, the
# backbone's layer2-3 at 1e-4 (the optimizer groups above). From random transformer weights DETR first learns the cheap statistics of the data: boxes
# drift towards typical positions and sizes (the L1 term, weighted 5, falls first) and queries lean
# towards "no object". Learning that one particular query covers one particular object — actual
# detection — takes far longer: DETR is famous for needing long training, which is what Deformable
# DETR (notebook 08) attacks.

# %%
# stop after ~35 s, but never before 128 iterations (16 epochs), so that the loss falls on a slow CPU too
BUDGET_S, MIN_ITERS = 35.0, 128  # 128 iterations alone: mean loss 24.86 -> 13.19
subset = Subset(train_ds, range(32))
loader = DataLoader(
    subset, batch_size=4, shuffle=True, collate_fn=collate_fn, generator=torch.Generator().manual_seed(0)
)
records = []
t0, epoch = time.perf_counter(), 0
while time.perf_counter() - t0 < BUDGET_S or len(records) < MIN_ITERS:
    train_one_epoch(
        model,
        criterion,
        loader,
        optimizer,
        device,
        epoch,
        clip_max_norm=cfg.train.clip_max_norm,
        log=records.append,
        progress=False,
    )
    epoch += 1
print(f"{len(records)} iterations ({epoch} epochs of {len(loader)} batches)")


# %%
def smooth(xs, k=5):
    return [sum(xs[max(0, i - k + 1) : i + 1]) / len(xs[max(0, i - k + 1) : i + 1]) for i in range(len(xs))]


fig, ((ax_total, ax_terms),) = viz.subplots(1, 2, row_height=2.6)
viz.plot_loss_curves(
    {"loss (all layers)": smooth([r["loss"] for r in records], k=4)},
    ax=ax_total,
    title="total, 4-iteration mean",
)
terms = {k: smooth([r[k] for r in records], k=4) for k in ("loss_ce", "loss_bbox", "loss_giou")}
viz.plot_loss_curves(terms, ax=ax_terms, title="weighted terms of the final layer")
plt.show()
first, last = sum(r["loss"] for r in records[:4]) / 4, sum(r["loss"] for r in records[-4:]) / 4
print(f"mean loss, first 4 iterations {first:.2f} -> last 4 iterations {last:.2f}")

# %%
# NBVAL_CHECK_OUTPUT
print("record keys used:", [k for k in ("loss", "loss_ce", "loss_bbox", "loss_giou") if k in records[0]])
assert len(records) >= MIN_ITERS
assert last < first, "the loss should fall during the live run"
print("loss fell during the live run:", last < first)

# %% [markdown]
# ## 5. The recipe of the shipped checkpoint, and its training curve
#
# A few hundred steps detect nothing yet. The repository ships a toy DETR trained on this data by
# `make train`, which runs the `detr-shapes` preset in two stages; its card,
# [`data/checkpoints/detr_shapes.md`](../data/checkpoints/detr_shapes.md), has the exact commands,
# the training time and, for each choice below, its measured effect.
#
# | stage | what the recipe does | why |
# |---|---|---|
# | pretext | ResNet-18 cut after `layer3` (stride 16), 20 epochs of the dense pretext of section 2 | the toy stand-in for ImageNet weights; from scratch DETR stays on its plateau |
# | model | pre-norm transformer, d = 128, 8 heads, 3 + 3 layers, FFN 512, no dropout; sine temperature 20 | the official architecture scaled down; T = 20 keeps the position code informative on small grids (notebook 02) |
# | queries | 10 object queries (COCO: 100) | the images hold at most 6 objects; fewer slots are each matched, and so trained, more often |
# | backbone | `layer2`, `layer3` fine-tuned at lr 1e-4, half the transformer's 2e-4; stem, `layer1`, BatchNorm frozen | the pretext features need reshaping; the official lr / 10 protects ImageNet features, which these are not |
# | images | epochs 1–70 at short side 96–128, epochs 71–90 at ×1.25 (120–160); evaluation at 160 | progressive resizing: cheap small images for most of the run, the evaluation size at its end |
# | schedule | 90 epochs at a constant lr, AdamW, weight decay 1e-4, clip 0.1, batch 4 | the official optimiser; no lr drop, because of the next row |
# | weights | a moving average of the weights (`train.ema_decay 0.998`) is evaluated and saved | it averages out the jitter of the constant-lr steps (below) |
#
# Everything else is the official DETR recipe: matcher and loss weights 1 / 5 / 2, no-object weight
# 0.1, auxiliary losses, horizontal flip and the multi-scale / crop augmentation of section 1.
# `detr_shapes_log.jsonl` beside the checkpoint holds the run's per-epoch records.

# %%
log_path = CKPT_DIR / "detr_shapes_log.jsonl"
records_log = read_jsonl(log_path) if log_path.exists() else []
history = [r for r in records_log if r.get("type", "epoch") == "epoch"]  # one record per epoch
evals = [r for r in history if "AP" in r]  # every 5th epoch: evaluated at the config's val size
print(f"{len(history)} epoch records, {len(evals)} with validation metrics")
if history:
    print("keys:", sorted(history[-1]))
    print("val AP by epoch:", {r["epoch"] + 1: round(r["AP"], 3) for r in evals})
    print("val loss by epoch:", {r["epoch"] + 1: round(r["val_loss"], 2) for r in evals if "val_loss" in r})
    # with train.ema_decay the run evaluates the moving average of the weights (the next cells)
    averaged = "val_weights" in evals[-1]
    fig, ((ax_loss, ax_ap),) = viz.subplots(1, 2, row_height=2.8)
    ep = [r["epoch"] + 1 for r in history]
    ax_loss.plot(ep, [r["train_loss"] for r in history], "o-", markersize=3, label="train (live weights)")
    val_pts = [(r["epoch"] + 1, r["val_loss"]) for r in evals if "val_loss" in r]
    if val_pts:
        ax_loss.plot(*zip(*val_pts), "o-", markersize=3, label="val (moving average)" if averaged else "val")
    ax_loss.set(xlabel="epoch", ylabel="weighted loss", title="loss (sum over decoder layers)")
    for key in ("AP", "AP50", "AP75"):
        ax_ap.plot([r["epoch"] + 1 for r in evals], [r[key] for r in evals], "o-", markersize=3, label=key)
    ax_ap.set(
        xlabel="epoch",
        ylabel="COCO metric",
        title=("val AP of the moving average" if averaged else "validation AP")
        + f" (short side {cfg.data.val_size})",  # = the shipped config's
        ylim=(0, max(0.1, 1.4 * max(r["AP50"] for r in evals))),  # room for the legend
    )
    for ax in (ax_loss, ax_ap):  # where the training images grow (progressive resizing)
        ax.axvline(cfg.data.late_scale_after + 0.5, color="gray", lw=0.8, ls="--")
    ax_loss.legend(fontsize=7)
    ax_ap.legend(fontsize=7, loc="upper left", ncol=2)
    fig.suptitle(f"the shipped run, per epoch (dashed: training images x{cfg.data.late_scale} from here)")
    plt.show()
else:
    print(f"no {log_path.name} beside this checkpoint")

# %%
trained, ckpt_cfg, ckpt = load_checkpoint(CKPT_DIR / "detr_shapes.pt")
meta = ckpt["meta"]
print("pretext:", meta["backbone_weights"]["command"])
print("DETR   :", meta["command"])
steps_per_epoch = len(train_ds) // ckpt_cfg.train.batch_size  # the trainer drops the last partial batch
epochs = ckpt_cfg.train.epochs
print(f"{ckpt_cfg.model.num_queries} object queries | {epochs} epochs x {steps_per_epoch} steps = {epochs * steps_per_epoch} optimiser steps")

# %% [markdown]
# The curve shows DETR's slow but steady convergence, with one step. The training loss, of the live
# weights, falls for 70 epochs, steps down once the training images grow to the evaluation size
# after epoch 70, and then falls slowly and noisily: at a constant learning rate the live weights
# never settle. The validation curves measure the moving average of the weights (below), and they
# are smooth: validation AP, measured at short side 160 throughout, rises fast at first, then slowly,
# hardly at all over epochs 60–70, in one step once the training images grow, and on to the end.
# Whether a longer schedule would keep it rising is exercise 6.
#
# ### The moving average of the weights
#
# At a constant learning rate each AdamW step moves the weights a sizeable way along the gradient of
# one small batch, so they keep jittering around a good region instead of settling in it. The recipe
# therefore keeps a second copy of the model that is never trained: after every optimiser step each
# trained parameter of the copy moves a little towards the live one, `ema = 0.998 * ema + 0.002 *
# weights` (`train.ema_decay 0.998`; buffers such as the frozen BatchNorm statistics are copied). The
# weights of k steps ago count with 0.002 · 0.998^k, so the average spans about 1 / (1 - 0.998) = 500
# steps, nearly two epochs: the jitter of those steps largely cancels, and what is left lies near the
# centre of the region. The run evaluates the average, the checkpoint's `model` holds it, and every
# loader and `python -m detr_lite.evaluate` use it. The usual way to let DETR's weights settle is to
# drop the learning rate 10× late in the run; on this recipe the average did better. AP / AP50 at
# epoch 90 of four runs that share their first 69 epochs (from the card):
#
# | epochs 70–90 | live weights | moving average |
# |---|---|---|
# | lr ×0.1 after epoch 78 | 0.574 / 0.839 | 0.580 / 0.834 |
# | constant lr (the recipe) | 0.494 / 0.805 | **0.586 / 0.855** |
#
# Below, `detr_lite.engine.ModelEma` (what the trainer uses) averages a layer with a single weight,
# at decay 0.8 (a window of about 5 steps, short enough to watch in 20). The live weight jumps to
# about 1.0 and then jitters around it, as weights do at a high learning rate; the average trails
# the jump by a few steps and then moves far less per step.

# %%
# ModelEma on a one-weight layer: decay 0.8 averages ~1 / (1 - 0.8) = 5 steps (the recipe: 0.998, ~500)
layer = torch.nn.Linear(1, 1, bias=False)
with torch.no_grad():
    layer.weight.zero_()
ema = ModelEma(layer, decay=0.8)  # a frozen copy of the layer (weight 0), in eval mode
gen = torch.Generator().manual_seed(0)
live, averaged, by_hand = [], [], [0.0]
for _ in range(20):
    # stands in for an optimiser step at a high lr: a jump to 1.0, then jitter around it
    with torch.no_grad():
        layer.weight.copy_(1.0 + 0.3 * torch.randn(1, 1, generator=gen))
    ema.update(layer)
    live.append(layer.weight.item())
    averaged.append(ema.module.weight.item())
    by_hand.append(0.8 * by_hand[-1] + 0.2 * live[-1])
print("average:", ema.module, tuple(ema.module.weight.shape), "| trainable:", ema.module.weight.requires_grad)
print("live   :", " ".join(f"{w:4.2f}" for w in live))
print("average:", " ".join(f"{w:4.2f}" for w in averaged))
print(f"steps 1-5, mean weight: live {sum(live[:5]) / 5:.2f} | average {sum(averaged[:5]) / 5:.2f}")
change = lambda ws: sum(abs(b - a) for a, b in zip(ws, ws[1:])) / (len(ws) - 1)
print(f"mean change per step: live {change(live):.2f} | average {change(averaged):.2f}")
assert all(abs(a - h) < 1e-5 for a, h in zip(averaged, by_hand[1:]))  # exactly the exponential average
assert sum(averaged[:5]) < sum(live[:5]) - 1.5  # it trails the live weight (by over 0.3 on average)...
assert change(averaged) < change(live) / 3  # ...and jitters far less

# %% [markdown]
# ## 6. COCO AP, computed live
#
# `detr_lite.engine.evaluate` runs the model over the validation loader, turns the outputs into
# per-image detections at the *original* image size (`PostProcess`: softmax, drop "no object", best
# class per query, boxes → absolute `xyxy`), and hands them to pycocotools' `COCOeval` together with
# the dataset's own ground truth. AP is averaged over IoU thresholds 0.50:0.95; AP50/AP75 at one
# threshold; APs/APm/APl over small (< 32²), medium and large (> 96²) objects. The checkpoint's
# config resizes the validation images to short side 160, as the training run did at each of its
# evaluations, and the checkpoint's `model` holds the weights those evaluations used, the moving
# average; so the live table is checked against the log's last record (epoch 90). The two differ
# only by the float16 storage of the shipped weights. Read the table as the verdict: a real detector,
# good on medium and large shapes, weaker on small ones, which cover only a cell or two of the
# stride-16 grid. The card adds the same model's table on a freshly generated validation split.

# %%
# the checkpoint's own data settings (val short side 160, the largest training scale) and batch size
print("val short side:", ckpt_cfg.data.val_size, "| max side:", ckpt_cfg.data.val_max_size)
val_ds = build_dataset(DATA, "val2017", ckpt_cfg.data, train=False)
val_loader = DataLoader(val_ds, batch_size=ckpt_cfg.train.batch_size, shuffle=False, collate_fn=collate_fn)
postprocessor = build_postprocessor(ckpt_cfg.model)
metrics = evaluate(trained, postprocessor, val_loader, val_ds.coco, device)
display(Markdown(format_ap_table(metrics, title="detr-shapes checkpoint, bundled val split (computed now)")))
logged = (evals or [None])[-1]  # the training run's last evaluation: float32 averaged weights, same val size
if logged:
    title = f"log: epoch {logged['epoch'] + 1} record, val {ckpt_cfg.data.val_size} (the training run)"
    display(Markdown(format_ap_table(logged, title=title)))
    print("live - logged:", {k: round(metrics[k] - logged[k], 4) for k in AP_KEYS})

# %%
# NBVAL_CHECK_OUTPUT
print("metrics:", [k for k in AP_KEYS if k in metrics], "| images:", metrics["num_images"])
assert metrics["num_images"] == len(val_ds)
if logged:  # the shipped (float16) weights, evaluated at the same val size, reproduce the logged record
    assert abs(metrics["AP"] - logged["AP"]) < 0.01 and abs(metrics["AP50"] - logged["AP50"]) < 0.01
assert all(-1 <= metrics[k] <= 1 for k in AP_KEYS)

# %% [markdown]
# ## 7. Predictions on validation images
#
# For drawing we post-process against the *resized* image size instead of the original one. A
# trained DETR is drawn with a score threshold (say 0.5) and needs no non-maximum suppression — the
# set loss teaches duplicate queries to say "no object". We draw the queries scoring above 0.5 (at
# least each image's best one), and then measure how much the boxes depend on the image.

# %%
show_ids = [0, 1, 2, 5]
images, mask, targets = collate_fn([val_ds[i] for i in show_ids])
with torch.no_grad():
    out = trained(images, mask)
results = postprocessor(out, torch.stack([t["size"] for t in targets]))
fig, axes = viz.subplots(2, len(show_ids), row_height=2.3)
kept = []  # the drawn queries of each image
for b, res in enumerate(results):
    keep = torch.nonzero(res["scores"] > 0.5).flatten()
    if len(keep) == 0:
        keep = res["scores"].argmax()[None]
    kept.append(keep)
    h, w = targets[b]["size"].tolist()
    unpadded = images[b, :, :h, :w]  # draw without the batch padding
    viz.show_boxes(
        unpadded,
        pixels_xyxy(targets[b]),
        labels=targets[b]["labels"],
        class_names=names,
        ax=axes[0, b],
        title="ground truth",
    )
    viz.show_boxes(
        unpadded,
        res["boxes"][keep],
        labels=res["labels"][keep],
        scores=res["scores"][keep],
        class_names=names,
        ax=axes[1, b],
        title=f"{len(keep)} queries with score > 0.5",
    )
fig.suptitle("four validation images: ground truth (top) and the shipped model's detections (bottom)")
plt.show()

# %%
# How many ground-truth objects does a drawn box find (IoU >= 0.5, class ignored)?
for b, (res, keep) in enumerate(zip(results, kept)):
    iou = box_iou(pixels_xyxy(targets[b]), res["boxes"][keep])  # [objects, drawn boxes]
    hit = int((iou.max(1).values >= 0.5).sum())
    print(f"image {b}: {len(iou)} objects, {len(keep)} boxes drawn, objects hit: {hit}")
    # the most confident box of every image lies on an object
    assert box_iou(pixels_xyxy(targets[b]), res["boxes"][res["scores"].argmax()][None]).max() >= 0.5

# %%
# Does the output depend on the image? Spread of each query's box across the 4 images, compared with
# the spread between the queries of one image (a trained detector: both large; a DETR on its
# from-scratch plateau gives about 0.002 across images, i.e. the same boxes for every image).
boxes_b = out["pred_boxes"]  # [B, Q, 4]
across_images = boxes_b.std(dim=0).mean().item()
across_queries = boxes_b.std(dim=1).mean().item()
print(
    f"{boxes_b.shape[1]} queries | box std across images {across_images:.3f} | across queries {across_queries:.3f}"
)
assert across_images > 0.05, "the boxes should follow the image"

# %% [markdown]
# The boxes follow the objects of each image (their spread across images, 0.144, is of the same order
# as across queries, 0.199), and every image's most confident box lies on an object: the large shapes
# get confident, tight boxes (the big star and the lower triangle at 1.00, the large square at 0.99,
# the circle at 0.96). All 7 objects are hit, the upper triangle, partly covered by the lower one
# (0.93), and the small star on the red image (0.84) included. One sign of a DETR that has not
# converged shows too: the small square and the small star each get a second box above 0.5 (9 boxes
# drawn for 7 objects; the labels of each pair overlap), and the circle a second one at 0.45, just
# below the threshold. The set loss eventually teaches such duplicates to say "no object" (which is
# why a converged DETR needs no NMS); here it has not finished, and the duplicates cost AP.

# %% [markdown]
# ## 8. What the trained model attends to
#
# `capture_attention` records every attention layer's weights `[B, heads, Lq, Lk]` during a forward
# pass. The feature grid is the image size divided by the backbone's stride, rounded up. The toy
# model stops its ResNet-18 after `layer3` (stride 16 instead of the official 32: finer cells for
# tiny images), so a validation image of short side 160 has 160 / 16 = 10 cells along that side; the
# image drawn below and its grid are printed in the next cell.
#
# * **Encoder self-attention** (last layer, heads averaged): for a token inside an object, where does
#   it look? For the COCO model the DETR paper shows tokens attending to the rest of their own
#   object — the encoder already separates instances.
# * **Decoder cross-attention** (last layer, heads averaged): for each query that detects an object,
#   where on the feature grid does it read from? The paper's COCO model looks at the object's
#   extremities, where the box edges are decided.
#
# Compare the toy model's maps with those descriptions and judge how far it got. Each map is blended
# over the image, each 16-pixel cell on its own pixels, with its colour scale beside it.

# %%
b = 0
h_img, w_img = targets[b]["size"].tolist()
image_b, mask_b = images[b, :, :h_img, :w_img], mask[b, :h_img, :w_img]
with torch.no_grad(), capture_attention(trained) as attn:
    out_b = trained(image_b[None], mask_b[None])
enc_key = f"transformer.encoder.layers.{ckpt_cfg.model.enc_layers - 1}.self_attn"
dec_key = f"transformer.decoder.layers.{ckpt_cfg.model.dec_layers - 1}.multihead_attn"
stride = trained.backbone.strides[-1]  # 16 for the toy model
fh, fw = -(-h_img // stride), -(-w_img // stride)  # ceil division: the feature grid

# %%
# NBVAL_CHECK_OUTPUT
print("captured layers:", len(attn))
print("encoder", enc_key, tuple(attn[enc_key].shape), "| decoder", dec_key, tuple(attn[dec_key].shape))
print("image h x w:", (h_img, w_img), "| backbone stride:", stride)
print("feature grid h x w:", (fh, fw), "=", fh * fw, "tokens")
assert attn[enc_key].shape == (1, ckpt_cfg.model.nheads, fh * fw, fh * fw)
assert attn[dec_key].shape == (1, ckpt_cfg.model.nheads, ckpt_cfg.model.num_queries, fh * fw)
assert torch.allclose(attn[dec_key].sum(-1), torch.ones(()), atol=1e-5)  # softmax over keys

# %%
# encoder, last layer, heads averaged: what the token at each object's centre (dot) attends to
enc = attn[enc_key][0].mean(0).reshape(fh, fw, fh, fw)  # [h, w, h, w]
centres = (targets[b]["boxes"][:, :2] * torch.tensor([w_img, h_img])).tolist()
maps = torch.stack([enc[min(int(y) // stride, fh - 1), min(int(x) // stride, fw - 1)] for x, y in centres])
fig = viz.show_attention_maps(
    image_b,
    maps,
    points=[tuple(c) for c in centres],
    titles=[f"token at gt {j}" for j in range(len(centres))],
    stride=stride,
    suptitle="encoder self-attention (last layer) of the token at each object's centre",
)
plt.show()

# %%
# decoder, last layer, heads averaged: where each confident query reads, with its predicted box
res_b = postprocessor(out_b, torch.tensor([[h_img, w_img]]))[0]
n_show = int((res_b["scores"] > 0.5).sum().clamp(1, 5))  # the confident queries (at least the best one)
conf = res_b["scores"].argsort(descending=True)[:n_show].sort().values
dec = attn[dec_key][0].mean(0).reshape(-1, fh, fw)  # [Q, h, w]
fig = viz.show_attention_maps(
    image_b,
    dec[conf],
    boxes=res_b["boxes"][conf],
    titles=[f"query {q} ({names[int(res_b['labels'][q])]})" for q in conf.tolist()],
    stride=stride,
    suptitle="decoder cross-attention (last layer) of each confident query, with its predicted box",
)
plt.show()


# %%
def cells_touched(box: torch.Tensor) -> torch.Tensor:
    """[fh, fw] bool: the feature cells an xyxy pixel box overlaps."""
    x0, y0, x1, y1 = box.tolist()
    rows, cols = torch.arange(fh) * stride, torch.arange(fw) * stride  # each cell's top / left pixel
    return ((rows < y1) & (rows + stride > y0))[:, None] & ((cols < x1) & (cols + stride > x0))[None, :]


# how much of each map falls on the cells of its own object, against those cells' share of the grid
for j, box in enumerate(pixels_xyxy(targets[b])):
    cells = cells_touched(box)
    on, share = float(maps[j][cells].sum()), float(cells.float().mean())
    print(f"encoder token at gt {j}: {on:.2f} on its object's cells ({share:.2f} of the grid)")
dec_on_box = {}
for q in conf.tolist():
    cells = cells_touched(res_b["boxes"][q])
    dec_on_box[q] = (float(dec[q][cells].sum()), float(cells.float().mean()))
    print(
        f"decoder query {q}: {dec_on_box[q][0]:.2f} on its box's cells ({dec_on_box[q][1]:.2f} of the grid)"
    )
assert all(on > share for on, share in dec_on_box.values()), "confident queries should read from their box"

# %% [markdown]
# Uniform attention would put on a set of cells exactly those cells' share of the grid. The decoder
# beats that, three to six times over: the lower triangle's query 9 puts 0.58 of its attention on
# the cells of its box, which are 0.10 of the grid (brightest inside the triangle and at its
# lower-left corner), and the upper triangle's query 6 puts 0.31 on cells that are also 0.10 of it
# (brightest near the triangle's right corner, but with a bright cell below the triangles, outside
# its box). The two square queries 3 and 7 put 0.21 and 0.30 on cells that are 0.05 of the grid, both
# brightest on the square's own cell; they are the duplicate pair of section 7. (This image now runs
# alone, without the batch padding of section 7, and the same four detections are confident: the two
# triangles and the square twice: padding changes the backbone's features near the border, not what
# the model finds here.) At 16 pixels a cell, whether a query
# prefers an object's extremities, as in the paper, cannot be told apart here. The encoder is further
# from the paper's picture: the token in the lower triangle (gt 0) puts 0.39 on its object's cells
# (0.13 of the grid) and the one in the upper triangle 0.34 (0.10), but both maps are brightest on
# the same cell, where the two triangles meet. Only the token on the small square is brightest on
# its own object (0.15 on its cells against 0.05), with the triangles' meeting cell third. The toy
# encoder does not yet separate instances.

# %% [markdown]
# ### Interactive explorer
#
# In JupyterLab, move the sliders to pick any pixel and see the encoder attention of the feature
# cell under it (`viz.attention_explorer`). Where no kernel runs (a rendered page, or this notebook
# just opened, before the cell is re-run) the widget cannot work, so its output also holds a static
# picture: the attention of the cells under a 2 × 3 grid of query points. `.draw(x, y)` draws one
# point, `.draw_grid(points)` any set of points.

# %%
explorer = viz.attention_explorer(trained, image_b, mask_b)
display(explorer)

# %% [markdown]
# ## Summary
#
# * DETR trains on box-aware augmented images (flip, multi-scale resize, random crop via
#   `torchvision.transforms.v2`), batched with padding and a True-means-padding mask.
# * One step is forward → Hungarian matching + set loss → weighted sum over the final and auxiliary
#   decoder layers → backward → clip at 0.1 → AdamW. A short run shows the loss falling, first
#   through the box L1 term; real detection takes far longer.
# * The toy recipe: a backbone pretrained on a dense pretext (the offline stand-in for ImageNet),
#   10 object queries, `layer2`-`layer3` fine-tuned at half the transformer's lr, progressive
#   resizing (small images, then the evaluation size for the last 20 epochs), a constant lr, and a
#   moving average of the weights as the model that is evaluated and shipped.
# * `detr_lite.engine.evaluate` computes the COCO AP table with pycocotools on the dataset's own
#   ground truth. The shipped model is a real detector, weaker on small
#   shapes, with some duplicate boxes not yet suppressed.
# * `capture_attention` exposes encoder self-attention per feature cell and decoder cross-attention
#   per query. The confident queries read far more from their own boxes than uniform attention
#   would; the encoder tokens do not yet keep to their own objects.
#
# ## Exercises
#
# 1. Turn augmentation off (`build_dataset(..., train=False)` for the live subset) and rerun the live
#    run. Does the training loss fall faster? Why is that not good news?
# 2. Set `eos_coef = 1.0` in `cfg.model` before `build_criterion` and rerun the live run: what
#    happens to the number of predicted objects (`cardinality_error` in the records)?
# 3. Remove gradient clipping (`clip_max_norm=0`). Plot the gradient norm per iteration with and
#    without it.
# 4. Choosing the evaluation size from AP on the validation split would tune on val. Choose it
#    without looking at val: run
#    `python -m detr_lite.evaluate --checkpoint data/checkpoints/detr_shapes.pt --split train2017
#    --val-size N --val-max-size M` (the val transform on all training images) for N = 128, 160,
#    192, with M at least 1.5 N so that no image is capped (the preset's 240 would cap the wide ones
#    at 192). Which N wins on the training split, does it agree with the official rule (the largest training scale), and which of APs / APm / APl moves
#    most as N grows (how many stride-16 cells does a small shape cover)? Then, on val, set
#    `params.useCats = 0` on a pycocotools `COCOeval` of `engine.coco_detections`: how much of the
#    missing AP50 is lost to wrong classes rather than missed boxes, for small objects especially?
# 5. Build a fresh model *without* `load_backbone_weights` (its backbone starts random: the stem and
#    `layer1` stay frozen at random values, `layer2`-`layer3` train) and rerun the live run. Which
#    loss terms fall, and which cannot? What does that say about the role of pretraining?
# 6. Train the full recipe yourself with `make train` (the README gives its time), then compare your
#    AP table and curve with the shipped ones. Then give it 30 more epochs (`--resume --epochs 120`): the preset's `lr_drop 90`
#    now takes effect, so they run at a tenth of the learning rate. Does AP keep rising, and does a
#    learning-rate drop still help once the weights are averaged?
# 7. Train the DETR stage again without the moving average, on exercise 6's backbone:
#    `python -m detr_lite.train --config detr-shapes --backbone-weights runs/detr-shapes/backbone.pt
#    --output runs/no-ema --ema-decay 0` (its evaluations and checkpoint are then the live weights).
#    Compare the two validation curves and final AP tables: how much does the average add, and how
#    much noisier is the curve without it?
