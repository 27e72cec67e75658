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
# # 10 · Fine-tuning on your own COCO-format dataset
#
# **Learning goal.** Take a detector trained on one set of classes and teach it yours. You will:
#
# 1. point the package at *a folder of images plus one COCO JSON* and turn it into the COCO 2017
#    layout the trainer reads (train/val split included);
# 2. see why `num_classes` follows your **category ids** (max id + 1), not how many classes you have;
# 3. start from a checkpoint — the shipped `data/checkpoints/detr_shapes.pt`, or an official COCO
#    model if you have one — and replace only the **class head**, keeping backbone, transformer,
#    queries and box head;
# 4. measure what transfers (the box losses before a single step, against random weights), then
#    fine-tune briefly with `python -m detr_lite.train --finetune` and measure AP before and after;
# 5. look at the predictions with your class names, through `detr_lite.Detector` (one call per image).
#
# The demonstration dataset is built right here from the bundled shapes generator, with
# **different classes**: new category ids (7, 12, 23, 31, 40) and new names. To use your own data,
# set `IMAGES_DIR` and `ANNOTATIONS_JSON` in the next cell (tagged `parameters`).

# %% tags=["parameters"]
IMAGES_DIR = None  # your images folder; None = build the demonstration dataset below
ANNOTATIONS_JSON = None  # one COCO JSON for those images (split 75/25 into train/val) ...
VAL_JSON = None  # ... or a separate val JSON (images in IMAGES_DIR too)
START_CHECKPOINT = "data/checkpoints/detr_shapes.pt"  # a detr_lite checkpoint (relative to the repo root)
OFFICIAL_CHECKPOINT = None  # e.g. "detr-r50-e632da11.pth": start from the official COCO model instead
OFFICIAL_ARCH = "detr_r50"
NUM_IMAGES = 64  # demonstration dataset: 48 train + 16 val images
EPOCHS = 8
BATCH_SIZE = 4
LR, LR_BACKBONE = 3e-4, 1e-5  # transformer + heads; LR_BACKBONE acts only on a trainable backbone
TRAIN_BACKBONE = False  # freeze the backbone (its features transfer); None = as in the start checkpoint
MAX_ITERS_PER_EPOCH = None  # None = whole epochs
DEVICE = "cpu"  # "cuda" on a GPU machine
OUTPUT_DIR = None  # None = a fresh temporary folder

# %%
# %matplotlib inline
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torchvision.ops import box_convert

from detr_lite import Detector, launch, viz
from detr_lite.checkpoint import read_checkpoint, save_checkpoint
from detr_lite.config import Config
from detr_lite.data.shapes import SHAPE_CLASSES, generate
from detr_lite.models import build_model
from detr_lite.train import load_finetune_weights

torch.manual_seed(0)
REPO = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "pyproject.toml").is_file())
work = Path(tempfile.mkdtemp(prefix="detr_lite_10_")) if OUTPUT_DIR is None else Path(OUTPUT_DIR).resolve()
work.mkdir(parents=True, exist_ok=True)
print("repo:", REPO.name, "| working folder ready")

# %% [markdown]
# ## 1. "Your" dataset: a folder and a JSON
#
# Most annotation tools (CVAT, Label Studio, Roboflow, …) export COCO JSON: one `images` list
# (`id`, `file_name`, `height`, `width`), one `annotations` list (`image_id`, `category_id`,
# `bbox` = [x, y, w, h] in pixels, `area`, `iscrowd`) and one `categories` list (`id`, `name`).
# We fake such an export: shapes images in a flat folder, and a JSON whose categories are *not*
# the ones the checkpoint knows.

# %%
NEW_CLASSES = {7: "coin", 12: "tile", 23: "sail", 31: "starfish", 40: "plus sign"}  # id -> name

if IMAGES_DIR is None:
    raw = work / "generated"
    generate(raw, seed=11, num_train=NUM_IMAGES, num_val=0, image_size=(96, 128), category_ids=tuple(NEW_CLASSES))
    export = json.loads((raw / "annotations" / "instances_train2017.json").read_text())
    for c in export["categories"]:  # the generator named them after shapes; the export uses our names
        c.update(name=NEW_CLASSES[c["id"]], supercategory="demo")
    IMAGES_DIR = raw / "train2017"
    ANNOTATIONS_JSON = work / "my_export.json"
    Path(ANNOTATIONS_JSON).write_text(json.dumps(export))
print("images:", len(list(Path(IMAGES_DIR).iterdir())), "| annotations file:", Path(ANNOTATIONS_JSON).name)

# %% [markdown]
# `arrange_coco_layout` builds `train2017/`, `val2017/` (symbolic links to your images, nothing is
# copied) and `annotations/instances_{train,val}2017.json`. Without a separate val JSON it holds out
# a random quarter of the images (fixed by a seed) for validation.

# %%
# NBVAL_CHECK_OUTPUT
root = work / "my_coco"
counts = launch.arrange_coco_layout(IMAGES_DIR, ANNOTATIONS_JSON, root, val_json=VAL_JSON, val_fraction=0.25)
train_json = json.loads((root / "annotations" / "instances_train2017.json").read_text())
cats = {c["id"]: c["name"] for c in train_json["categories"]}
num_classes = max(cats) + 1
print("images per split:", counts)
print("categories:", cats)
print(
    "num_classes = max id + 1 =", num_classes, f"(softmax head: {num_classes + 1} logits, last = no object)"
)
assert launch.check_coco_layout(root) == []

# %% [markdown]
# Why 41 and not 5? DETR uses the raw category ids as class indices (so COCO's gapped ids 1..90 need
# 91), which keeps predictions directly comparable with the JSON — no id ↔ index table to get wrong.
# The unused logits cost nothing: the loss pushes them down like any wrong class. (Renumbering your
# ids to 1..K before training would give a smaller head; both work.)

# %%
from detr_lite.data.coco import build_dataset, collate_fn

if OFFICIAL_CHECKPOINT is None:  # show the images at the starting model's val size (detr_shapes.pt: 160)
    data_cfg = Config.from_dict(read_checkpoint(REPO / START_CHECKPOINT)["config"]).data
else:
    data_cfg = Config().data
train_ds = build_dataset(root, "train2017", data_cfg, train=False)
fig, axes = plt.subplots(1, 3, figsize=(7, 2.5), dpi=80)
for ax, i in zip(axes, range(3)):
    img, t = train_ds[i]
    h, w = t["size"].tolist()
    boxes = t["boxes"] * torch.tensor([w, h, w, h])  # normalised cxcywh -> pixels
    viz.show_boxes(img, box_convert(boxes, "cxcywh", "xyxy"), labels=t["labels"], class_names=cats, ax=ax)
fig.tight_layout()

# %% [markdown]
# ## 2. The starting checkpoint, and what "replace the class head" means
#
# A detr_lite checkpoint carries its config. The one shipped with the repository was trained on the
# bundled shapes with ids 1..5 (val AP 0.586, AP50 0.855, evaluated at short side 160, the largest
# training scale of its last phase, as official DETR evaluates at its largest training scale, 800;
# `data/checkpoints/detr_shapes.md`), so its class head is `Linear(hidden_dim, 6 + 1)`. Its config,
# val size included, comes along: the images above and every evaluation below use short side 160.
# Everything else —
# backbone, input projection, transformer, the object queries (10 of them) and the box MLP — knows
# nothing about class *names* and transfers as is. With an official COCO checkpoint
# (`OFFICIAL_CHECKPOINT`), the package converts the model-zoo file to a detr_lite checkpoint first
# (same code as notebook 09's evaluation); its head is `Linear(256, 92)`.

# %%
if OFFICIAL_CHECKPOINT is not None:  # official model-zoo file -> detr_lite checkpoint with a config
    from detr_lite.official import load_official_checkpoint, official_config

    off_model = load_official_checkpoint(OFFICIAL_CHECKPOINT, arch=OFFICIAL_ARCH)
    start_cfg = Config(name=OFFICIAL_ARCH, model=official_config(OFFICIAL_ARCH))
    start_path = work / f"{OFFICIAL_ARCH}_as_detr_lite.pt"
    save_checkpoint(start_path, off_model, start_cfg, meta={"source": str(OFFICIAL_CHECKPOINT)})
else:
    start_path = REPO / START_CHECKPOINT
    start_cfg = Config.from_dict(read_checkpoint(start_path)["config"])
start_sd = read_checkpoint(start_path)["model"]
head = {k: tuple(v.shape) for k, v in start_sd.items() if k.startswith("class_embed")}
m = start_cfg.model
print(f"start: {start_cfg.name} ({m.arch}/{m.backbone}), num_classes {m.num_classes}")
print("its class head:", head)

# %% [markdown]
# Build the same architecture with *our* `num_classes` and load the checkpoint into it with
# `load_finetune_weights` — what `--finetune` does. Tensors whose shape changed because of the
# number of classes (the class head) are skipped and keep their fresh initialisation; any other
# mismatch is an error naming the keys (a checkpoint of another architecture must not half-load).
#
# The config comes along too, including `train_backbone`. The shipped checkpoint was trained with
# layer2 and layer3 of its (pretext-pretrained) ResNet-18 fine-tuned, conv1, layer1 and every
# BatchNorm frozen (the official DETR rule). Here `TRAIN_BACKBONE = False` freezes the whole
# backbone instead: its features already describe these objects, a frozen backbone makes a step
# cheaper, and 48 images are too few to improve 2.8 M convolution weights. The input projection,
# transformer, queries and heads train (`TRAIN_BACKBONE = None` keeps the checkpoint's choice).

# %%
# NBVAL_CHECK_OUTPUT
ft_cfg = Config.from_dict(start_cfg.to_dict())
ft_cfg.model.num_classes = num_classes
ft_cfg.model.pretrained_backbone = False  # every weight comes from the checkpoint
if TRAIN_BACKBONE is not None:
    ft_cfg.model.train_backbone = TRAIN_BACKBONE
torch.manual_seed(0)
model = build_model(ft_cfg.model)
print(load_finetune_weights(model, str(start_path)).replace(str(start_path), "START"))
new_sd = model.state_dict()
kept = [k for k in start_sd if not k.startswith("class_embed")]
assert all(torch.equal(new_sd[k], start_sd[k].to(new_sd[k].dtype)) for k in kept)
print(f"copied unchanged: {len(kept)} tensors; new class head:",
      {k: tuple(new_sd[k].shape) for k in head})  # fmt: skip
n_logits = num_classes + 1 if ft_cfg.model.arch == "detr" else num_classes  # focal heads: no no-object logit
head_key = "class_embed.weight" if "class_embed.weight" in new_sd else "class_embed.0.weight"
assert new_sd[head_key].shape[0] == n_logits
bb_params = [p for n, p in model.named_parameters() if n.startswith("backbone")]
n_bb, n_bb_train = sum(p.numel() for p in bb_params), sum(p.numel() for p in bb_params if p.requires_grad)
print(f"train_backbone {ft_cfg.model.train_backbone}: {n_bb_train / 1e6:.2f} M of the backbone's "
      f"{n_bb / 1e6:.2f} M parameters train")  # fmt: skip

# %% [markdown]
# ## 3. What transfers, before a single step
#
# Push one batch of *our* training images through the loaded model and through the same
# architecture with random weights, and compare the (unweighted) loss terms of the set criterion.
# Both class heads are new, so the classification loss `loss_ce` starts at about the same level;
# the **box** terms (`loss_bbox` = L1 on normalised cxcywh, `loss_giou`) show what the rest of the
# network brings.
#
# Be precise about *what* transfers here. The shipped toy checkpoint is a real but modest detector
# (val AP 0.586 and AP50 0.855 on the shapes, meeting both of the project's goals, AP ≥ 0.50 and
# AP50 ≥ 0.85; good on large objects, APl 0.752, weaker on small ones, APs 0.387). And the
# demonstration's "new" classes are the same five generated shapes under new ids and
# names, so this is the friendliest possible transfer: features and box head already know these
# objects, only the class head starts from zero. On your own data expect less from this toy start;
# an official COCO model brings features for real-world objects. The mechanics are identical.

# %%
from detr_lite.models import build_criterion

criterion = build_criterion(ft_cfg.model)
torch.manual_seed(0)
scratch_model = build_model(ft_cfg.model)  # same architecture, random initialisation
images, mask, targets = collate_fn([train_ds[i] for i in range(BATCH_SIZE)])
losses = {}
with torch.no_grad():
    start_model = model  # kept for section 4
    for name, m in (("fine-tune start", start_model), ("random init", scratch_model)):
        m.eval()
        d = criterion(m(images, mask), targets)
        losses[name] = {k: float(d[k]) for k in ("loss_ce", "loss_bbox", "loss_giou")}
print("batch:", tuple(images.shape), "| targets per image:", [len(t["labels"]) for t in targets])
for name, d in losses.items():
    print(f"{name:16s}", "  ".join(f"{k} {v:6.3f}" for k, v in d.items()))
ft, rnd = losses["fine-tune start"], losses["random init"]
assert ft["loss_bbox"] < 0.5 * rnd["loss_bbox"] and ft["loss_giou"] < 0.5 * rnd["loss_giou"]
print("transferred weights: box losses less than half of random init's, before any fine-tuning step")

# %% [markdown]
# The box terms drop several-fold (L1 0.134 against 0.678, GIoU loss 0.288 against 0.795): the
# matched queries of the loaded model already sit on the objects. `loss_ce` stays at the level of a
# fresh head in both (3.619 against 3.584): nothing about our classes has transferred.

# %% [markdown]
# ## 4. AP before fine-tuning
#
# `detr_lite.Detector` wraps a model for inference: `predict` takes file paths (or PIL images, arrays,
# tensors), resizes them like the val split and returns, per image, absolute `xyxy` boxes, scores,
# labels and class names; `to_coco(image_id)` writes them in COCO results format. Those results go to
# pycocotools' COCOeval, the same evaluation as `python -m detr_lite.evaluate`. With a fresh class head
# the model cannot know our ids yet, whatever its boxes: AP is (about) zero.

# %%
from detr_lite.engine import coco_bbox_eval

val_ds = build_dataset(root, "val2017", data_cfg, train=False)
val_images = val_ds.coco.loadImgs(sorted(val_ds.coco.getImgIds()))
val_files = [root / "val2017" / im["file_name"] for im in val_images]
val_ids = [im["id"] for im in val_images]


def coco_ap(detector):
    """COCO box AP / AP50 of a Detector on our val split (every query kept, as COCOeval expects)."""
    results = detector.predict(val_files, threshold=0.0)
    dets = [d for image_id, r in zip(val_ids, results) for d in r.to_coco(image_id)]
    m = coco_bbox_eval(val_ds.coco, dets, val_ids)
    return m["AP"], m["AP50"]


before = Detector(start_model, ft_cfg, class_names=cats, device=DEVICE)
ap_before = coco_ap(before)
print(f"before fine-tuning: AP {ap_before[0]:.3f}, AP50 {ap_before[1]:.3f} on {len(val_files)} val images")

# %% [markdown]
# ## 5. Fine-tune with the training CLI
#
# The run's config is the checkpoint's own config with our data folder and a short schedule (written
# to JSON, read by `--config FILE.json`); `--finetune START` loads the weights exactly as above. The
# trainer validates the folder, derives `num_classes = 41` from the JSON, trains and evaluates with
# pycocotools after the last epoch.
#
# What makes this short CPU run enough: only the class head has to be learned from scratch, and the
# frozen backbone's features plus the loaded transformer already separate the five shapes, so a
# linear head on top learns them in ~100 steps (48 images, batch 4, 8 epochs) at `LR` 3e-4. A smaller
# lr (1e-4) moves the head too little in that many steps; a larger one (1e-3) shakes the loaded
# transformer more than it helps (exercise 3). The checkpoint's moving average of the weights
# (`train.ema_decay` 0.998, a window of ~500 steps) is switched off: over ~100 steps it would barely
# leave the starting weights.

# %%
run_cfg = Config.from_dict(ft_cfg.to_dict())
run_cfg.data.root = str(root)
run_cfg.train.epochs, run_cfg.train.lr_drop, run_cfg.train.batch_size = EPOCHS, EPOCHS, BATCH_SIZE
run_cfg.train.lr, run_cfg.train.lr_backbone = LR, LR_BACKBONE
run_cfg.train.ema_decay = 0.0  # the checkpoint's moving average spans ~500 steps; this run has ~100
finetuned = work / "finetuned"
config_json = work / "finetune_config.json"
config_json.write_text(json.dumps(run_cfg.to_dict()))
args = launch.train_args(config_json, root, finetuned, device=DEVICE, num_workers=0, finetune=start_path,
                         max_iters_per_epoch=MAX_ITERS_PER_EPOCH,
                         extra=["--no-progress", "--eval-every", str(EPOCHS)])  # fmt: skip
print("python -m detr_lite.train", " ".join(args).replace(str(work), "WORK").replace(str(REPO) + "/", ""))
r = subprocess.run([sys.executable, "-m", "detr_lite.train", *args], capture_output=True, text=True)
assert r.returncode == 0, r.stderr[-3000:]
shown = [line for line in r.stdout.splitlines() if line.startswith(("loaded", "epoch"))]
print("\n".join(shown).replace(str(REPO) + "/", "").replace(str(work), "WORK"))

# %%
iters = launch.read_log(finetuned / "log.jsonl")[0]
fig, ax = plt.subplots(figsize=(4.5, 2.6), dpi=80)
for key in ("loss_ce", "loss_bbox", "loss_giou"):
    ax.plot([r[key] for r in iters], label=key + " (weighted)")
ax.set(xlabel="iteration", ylabel="loss", title="fine-tuning loss per iteration")
ax.legend(fontsize=7)
fig.tight_layout()

# %% [markdown]
# ## 6. AP after fine-tuning, and predictions with your class names
#
# The fine-tuned checkpoint is an ordinary detr_lite checkpoint (config included), so
# `Detector.from_checkpoint(path)` needs nothing else; the class names come from the categories of
# the checkpoint's data folder (our JSON). The same `coco_ap` as before:

# %%
after = Detector.from_checkpoint(finetuned / "checkpoint.pt", device=DEVICE)
ap_after = coco_ap(after)
print(f"before fine-tuning: AP {ap_before[0]:.3f}, AP50 {ap_before[1]:.3f}")
print(f"after {EPOCHS} epochs:    AP {ap_after[0]:.3f}, AP50 {ap_after[1]:.3f}")
assert ap_after[0] > ap_before[0] + 0.15

# %% [markdown]
# The class head learned our ids: AP rose from zero to about a third, and AP50 to about 0.6. (The
# toy start detector itself reaches AP 0.586 on the bundled shapes after an hour of training; a
# longer fine-tune, or more images, moves towards it.) Three val images with the detections above
# the default threshold 0.5, as `predict` returns them:

# %%
fig, axes = plt.subplots(1, 3, figsize=(7, 2.5), dpi=80)
results = after.predict(val_files[:3])  # threshold 0.5
for ax, f, res in zip(axes, val_files, results):
    rgb = plt.imread(f)[..., :3]
    viz.show_boxes(rgb, res.boxes, labels=res.labels, scores=res.scores, class_names=after.class_names, ax=ax)
    print(f"{f.name}: {[(n, round(float(sc), 2)) for n, sc in zip(res.names, res.scores)]}")
fig.tight_layout()

# %% [markdown]
# The labels are *our* names. How often is the most confident detection of a val image one of our
# ids, and how many val objects does some box find (IoU ≥ 0.5, class ignored: what the boxes alone
# transferred) before and after?

# %%
from torchvision.ops import box_iou


def top_label_and_recall(detector):
    results = detector.predict(val_files, threshold=0.0)
    ours = sum(len(r) > 0 and int(r.labels[0]) in cats for r in results)
    hits, total = 0, 0
    for image_id, r in zip(val_ids, results):
        anns = val_ds.coco.loadAnns(val_ds.coco.getAnnIds(imgIds=image_id, iscrowd=False))
        gt = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                           for a in anns]).reshape(-1, 4)  # fmt: skip
        total += len(gt)
        if len(gt) and len(r):
            hits += int((box_iou(gt, r.boxes).max(1).values >= 0.5).sum())
    return ours, hits, total


for name, detector in (("before", before), ("after", after)):
    ours, hits, total = top_label_and_recall(detector)
    print(f"{name:6s}: top detection has one of our ids in {ours}/{len(val_files)} images; "
          f"{hits}/{total} val objects found by some box (IoU >= 0.5, any class)")  # fmt: skip

# %% [markdown]
# Before fine-tuning no image has one of our ids on top (the head is random), yet every val object
# already has a box on it (46 of 46): the boxes are what transferred. After, every image's most
# confident detection names one of our classes, and 39 of the 46 objects still have a box at IoU ≥ 0.5:
# the ~100 steps at lr 3e-4 moved the loaded transformer a little too, the price of a step size large
# enough to teach the head in that time (exercise 3 varies it).

# %%
# NBVAL_CHECK_OUTPUT
print("num_classes:", after.num_classes, "| class names:", {k: after.class_names[k] for k in sorted(cats)})
assert after.num_classes == num_classes and all(after.class_names[k] == v for k, v in cats.items())

# %% [markdown]
# ## Summary
#
# * Any COCO JSON + image folder becomes a training set with `launch.arrange_coco_layout`; the
#   trainer validates it before building anything.
# * `num_classes = max category id + 1`: ids are used raw, so predictions carry your ids.
# * Fine-tuning = load every tensor except the class head (its shape depends on `num_classes`);
#   `--finetune CKPT` does it and refuses checkpoints of another architecture.
# * Transfer shows before any step: box losses several times lower than random init's, and most val
#   objects already have a well-placed box; only the labels are missing, so AP starts at zero.
# * A short CPU fine-tune (frozen backbone, ~100 steps at lr 3e-4) teaches the new head the ids:
#   AP rises from zero to about a third.
# * `detr_lite.Detector` is the inference side: `predict` for any image (paths, arrays, tensors, any
#   size), `to_coco` for COCOeval, `explain` for the attention maps; `python -m detr_lite.predict`
#   draws the same on files.
# * Official COCO weights go through the same path after `load_official_checkpoint` +
#   `save_checkpoint`; on a GPU, use `--config` of that checkpoint, `--device cuda`, `--amp`.
#
# ## Exercises
#
# 1. Renumber the categories to 1..5 in the export: does `num_classes` shrink to 6, and does the
#    fine-tuned AP change?
# 2. Let layer2-3 of the backbone train too (`TRAIN_BACKBONE = None`, the checkpoint's setting, at
#    `LR_BACKBONE`): how much slower is a step, and does AP move after the same 8 epochs?
# 3. Try `LR` 1e-4 and 1e-3 for the same 8 epochs, and `EPOCHS` 16 at 3e-4: which limits this run,
#    the step size or the number of steps? Watch `loss_ce` and the box losses in the plot.
# 4. Train the same budget from scratch (the same command without `--finetune`, with
#    `TRAIN_BACKBONE = None` and `frozen_bn = False` in the run's JSON so the random backbone trains)
#    and compare AP.
# 5. With an official DETR checkpoint and a GPU, fine-tune on your own export
#    (`OFFICIAL_CHECKPOINT`, `DEVICE = "cuda"`), then evaluate; compare 10 epochs against 50.
