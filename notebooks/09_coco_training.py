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
# # 09 · Full COCO training on GPUs
#
# **Learning goal.** Everything so far trained in seconds on the bundled shapes. The real DETR
# recipe trains for **500 epochs on 118k COCO images (≈ 2000 V100-hours)**, Deformable DETR for
# **50 epochs (≈ 325 V100-hours)**. At that scale the problems are operational rather than
# mathematical, and this notebook is the control panel for them:
#
# 1. get the data into the COCO 2017 layout and verify it (or be told exactly how to fetch it);
# 2. pick the official recipe and adapt the learning rate to *your* total batch (linear scaling);
# 3. launch `torchrun` as a **detached subprocess** — a kernel restart does not kill it, running the
#    launch cell again neither starts a second copy nor starts over (it adds `--resume`);
# 4. follow the run live from its `log.jsonl` (loss, AP per epoch, images/s, GPU memory, ETA);
# 5. evaluate with pycocotools and compare against the papers; look at predictions and attention;
# 6. evaluate the *official* checkpoints with the same code.
#
# **The outputs stored in this notebook are a CPU smoke run on a fixture, not results.** With
# `SMOKE = True` a tiny COCO-*like* fixture (real category ids with gaps, crowd regions, polygons,
# 12-digit JPEG names) is generated on the fly and the *same* `torchrun` code path trains a small
# model on CPU for 2 iterations; CI runs exactly that. Every loss, AP and box printed below comes
# from those 2 iterations on 6 fixture images. To train for real, set `SMOKE = False`, `COCO_ROOT`
# and the GPU count below (papermill users: the next cell is tagged `parameters`). Cells that only
# make sense on GPUs are tagged `gpu` and print "skipped" in smoke mode.

# %% tags=["parameters"]
ARCH = "detr_r50"  # detr_r50 | deformable_detr_r50 | deformable_detr_r50_refine | ..._two_stage
COCO_ROOT = "/path/to/coco"  # train2017/ val2017/ annotations/instances_{train,val}2017.json
EPOCHS = None  # None = the recipe's (500 for DETR, 50 for Deformable DETR)
BATCH_SIZE_PER_GPU = 4
NUM_GPUS = 8  # processes on this node (torchrun --nproc-per-node)
AMP = True  # bf16 autocast where supported (fp16 + GradScaler otherwise)
CHANNELS_LAST = True
COMPILE = False  # torch.compile: faster steps after a slow first compile
NUM_WORKERS = 8  # DataLoader workers per GPU
PRETRAINED_BACKBONE = True  # ImageNet ResNet (needs the torchvision weights in the torch cache offline)
OUTPUT_DIR = "runs/coco_" + ARCH
DOWNLOAD = False  # opt-in: fetch + verify + unzip COCO 2017 into COCO_ROOT (~19 GB)
OFFICIAL_CHECKPOINT = None  # the model-zoo file of ARCH, e.g. "detr-r50-e632da11.pth", to evaluate it
SMOKE = True  # CI / CPU: tiny fixture, 2 iterations; set False for the real run

# %%
# %matplotlib inline
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from detr_lite import launch, viz
from detr_lite.coco_fixture import FIXTURE_CATEGORIES, make_coco_fixture

torch.manual_seed(0)
viz.use_style()  # the notebooks' figure dpi and font sizes

if SMOKE:  # everything goes to a fresh temporary folder; same code path, tiny sizes, CPU
    work = Path(tempfile.mkdtemp(prefix="detr_lite_09_"))
    COCO_ROOT = str(work / "coco")
    OUTPUT_DIR = str(work / "run")
    fixture_stats = make_coco_fixture(COCO_ROOT, seed=0, num_train=6, num_val=4)
    EPOCHS, BATCH_SIZE_PER_GPU, NUM_GPUS, NUM_WORKERS = 1, 2, 1, 0
    AMP = CHANNELS_LAST = COMPILE = PRETRAINED_BACKBONE = False
COCO_ROOT, OUTPUT_DIR = Path(COCO_ROOT).resolve(), Path(OUTPUT_DIR).resolve()
print("ARCH", ARCH, "| SMOKE", SMOKE)

# %% [markdown]
# ## 1. The dataset: layout check, download instructions, opt-in download
#
# Training reads exactly four things under `COCO_ROOT`. `check_coco_layout` lists whatever is
# missing (an empty image folder counts as missing); `download_instructions` turns that list into
# the commands that fetch the official archives (with their sizes and MD5 sums). The training CLI
# validates the same folder again before it builds anything heavy.

# %%
missing = launch.check_coco_layout(COCO_ROOT)
print(launch.download_instructions(COCO_ROOT, missing))

# %% [markdown]
# The download is opt-in (`DOWNLOAD = True`): it checks the free disk space first, resumes a
# partial file, verifies every archive's byte size and MD5 before unzipping, and deletes the zip
# afterwards.

# %%
if DOWNLOAD and not SMOKE:
    still_missing = launch.download_coco(COCO_ROOT)
    print("still missing:", still_missing or "nothing")
else:
    print("DOWNLOAD is off: nothing fetched")
for name, a in launch.COCO_ARCHIVES.items():
    print(f"{name:12s} {a.url}  {a.human_size:>8s}  md5 {a.md5}")

# %% [markdown]
# What a COCO annotation file looks like, on the fixture in smoke mode (or your `COCO_ROOT`).
# The two quirks that matter for DETR: **category ids have gaps** (the 80 COCO classes use ids
# 1..90), and **crowd regions** (`iscrowd=1`, stored as run-length masks) must be left out of the
# training targets but kept for COCOeval, which ignores detections that fall on them.

# %%
# NBVAL_CHECK_OUTPUT
if SMOKE:
    ann = json.loads((COCO_ROOT / "annotations" / "instances_train2017.json").read_text())
    ids = sorted(c["id"] for c in ann["categories"])
    crowd = [a for a in ann["annotations"] if a["iscrowd"]]
    print("category ids:", ids, "->", [c["name"] for c in sorted(ann["categories"], key=lambda c: c["id"])])
    print("num_classes = max id + 1 =", max(ids) + 1, "(softmax DETR adds one no-object logit)")
    print("crowd annotations:", len(crowd), "segmentation type:", type(crowd[0]["segmentation"]).__name__)
    print("a file name:", ann["images"][0]["file_name"])
    assert ids == [cid for cid, _, _ in FIXTURE_CATEGORIES] and max(ids) + 1 == 91
    assert all(isinstance(a["segmentation"], list) for a in ann["annotations"] if not a["iscrowd"])

# %% [markdown]
# ## 2. The recipe, and the learning rate for your batch
#
# | | DETR R50 | Deformable DETR R50 |
# |---|---|---|
# | AdamW lr / backbone lr | 1e-4 / 1e-5 | 2e-4 / 2e-5 (and ×0.1 for `sampling_offsets`, `reference_points`) |
# | weight decay, grad clip | 1e-4, 0.1 | 1e-4, 0.1 |
# | epochs (lr ×0.1 after) | 500 (400) | 50 (40) |
# | total batch | 64 | 32 |
# | training time (paper) | ≈ 2000 V100-h | ≈ 325 V100-h |
#
# The learning rates belong to the total batch in the table. If yours (images per GPU × GPUs)
# differs, the **linear scaling rule** multiplies both by `your_batch / recipe_batch`: a k-times
# larger batch averages the gradient over k-times more images, so k-times larger steps keep the
# progress per epoch roughly the same. It is a starting point, not a law (see
# `docs/COCO_TRAINING.md`). The epoch schedule stays in epochs.
#
# How long a run takes on your GPUs: section 6 estimates it from the live log, and
# [docs/COCO_TRAINING.md](../docs/COCO_TRAINING.md#5-expected-wall-clock-time) has measured step times
# of both models on one GPU. For `ARCH = "detr_r50"` set `AMP = False`: under bf16 autocast DETR's
# gradients can go non-finite (the same page, "Known problem"; the trainer stops before such a step).

# %%
recipe = launch.RECIPES[launch.family(ARCH)]
total_batch = BATCH_SIZE_PER_GPU * NUM_GPUS
lr, lr_backbone = launch.scaled_lrs(ARCH, total_batch)
epochs = EPOCHS or recipe.epochs
lr_drop = max(1, round(epochs * recipe.lr_drop / recipe.epochs))  # same fraction of the schedule
print(f"recipe: lr {recipe.lr:g}, backbone {recipe.lr_backbone:g} at total batch {recipe.total_batch}")
print(f"yours:  total batch {BATCH_SIZE_PER_GPU} x {NUM_GPUS} = {total_batch}", end=" ")
print(f"-> lr {lr:.3g}, backbone {lr_backbone:.3g}")
print(f"schedule: {epochs} epochs, lr drop after {lr_drop}")

# %% [markdown]
# ## 3. Before launching: GPUs and ImageNet weights
#
# The official runs start from torchvision's ImageNet ResNet-50. Offline, the file must already sit
# in the torch hub cache; `ensure_pretrained_backbone` stops with the exact path rather than letting
# a multi-day run start from random weights. (Smoke mode trains a small ResNet-18 from scratch.)

# %% tags=["gpu"]
if SMOKE:
    print("skipped (gpu cell)")
else:
    assert torch.cuda.is_available(), "no CUDA device visible to this kernel"
    assert torch.cuda.device_count() >= NUM_GPUS, (
        f"NUM_GPUS={NUM_GPUS} but {torch.cuda.device_count()} visible"
    )
    for i in range(NUM_GPUS):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16: {torch.cuda.is_bf16_supported()}")
    if PRETRAINED_BACKBONE:
        print("ImageNet weights:", launch.ensure_pretrained_backbone("resnet50"))
    launch.require_coco_layout(COCO_ROOT)

# %% [markdown]
# ## 4. The command
#
# The run's configuration is the preset for `ARCH` (in smoke mode a small CPU version of the same
# architecture) plus the scaled learning rates, written to a JSON file that the trainer reads with
# `--config FILE.json`. `torchrun` starts `NUM_GPUS` processes on this node; each trains on its
# share of every batch, and rank 0 writes `checkpoint.pt`, `log.jsonl`, `metrics.json` and
# `loss.png` into `OUTPUT_DIR`. `--batch-size` is per process.

# %%
OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
config_json = launch.write_run_config(
    ARCH,
    OUTPUT_DIR / "run_config.json",
    smoke=SMOKE,
    lr=lr,
    lr_backbone=lr_backbone,
    epochs=epochs,
    lr_drop=lr_drop,
)
args = launch.train_args(
    str(config_json), COCO_ROOT, OUTPUT_DIR, batch_size=BATCH_SIZE_PER_GPU, amp=AMP, channels_last=CHANNELS_LAST,
    compile=COMPILE, num_workers=NUM_WORKERS, pretrained_backbone=PRETRAINED_BACKBONE,
    max_iters_per_epoch=2 if SMOKE else None, device="cpu" if SMOKE else "cuda", extra=["--no-progress"],
)  # fmt: skip
cmd = launch.torchrun_command(launch.with_resume(args, OUTPUT_DIR), nproc_per_node=NUM_GPUS)
print(launch.shell_line(cmd))

# %% [markdown]
# On several nodes, run the same command on every node with a rendezvous instead of
# `--standalone` (or submit the SLURM script in `docs/COCO_TRAINING.md`):

# %%
for rank in (0, 1):
    multi = launch.torchrun_command(
        args, 8, nnodes=2, node_rank=rank, master_addr="10.0.0.1", python="python"
    )
    print(f"node {rank}:", launch.shell_line(multi)[:150], "...")

# %% [markdown]
# ## 5. Launch, detached
#
# `launch_detached` starts the command in a **new session** (`start_new_session=True`), with
# stdout/stderr appended to `OUTPUT_DIR/train.out` and its pid recorded in `OUTPUT_DIR/train.pid`.
# The notebook kernel is merely an observer: restart it, close the browser, come back tomorrow.
# Running this cell again is safe: if the recorded pid is alive, nothing new starts; if the job ended
# and `checkpoint.pt` exists, the command above already carries `--resume`.

# %%
pid = launch.launch_detached(cmd, OUTPUT_DIR)
print("training job pid:", pid)
print("pid file:", json.loads((OUTPUT_DIR / launch.PID_FILE).read_text())["cmd"][:3], "...")

# %% [markdown]
# A second launch while the first runs is refused (the pid is alive); stopping the job signals its
# whole process group (torchrun and every worker): `launch.stop(OUTPUT_DIR)`.

# %%
if launch.running_pid(OUTPUT_DIR) == pid:  # still running: a second launch returns the same pid
    assert launch.launch_detached(cmd, OUTPUT_DIR) == pid
if SMOKE:  # the smoke run takes seconds: wait for it here (a real run is followed below instead)
    t0 = time.perf_counter()
    rc = launch.wait(OUTPUT_DIR, timeout=300)
    print(f"smoke training finished with exit code {rc}")
    print(launch.tail(OUTPUT_DIR / launch.STDOUT_FILE, 6))
    assert rc == 0, launch.tail(OUTPUT_DIR / launch.STDOUT_FILE, 40)

# %% [markdown]
# ## 6. Live progress
#
# The trainer appends one JSON record per iteration (`type: iter`: losses, lr, images/s) and one per
# epoch (`type: epoch`: mean losses, COCO AP..APl on val2017, images/s, peak GPU memory) to
# `log.jsonl`. `follow` re-reads it every minute and redraws, with an ETA from the measured
# throughput; interrupt the cell to stop *watching* (the job keeps going).

# %%
# train2017 has 118,287 images (no need to parse its 450 MB annotation file in the kernel for that)
n_train = (
    118_287
    if not SMOKE
    else len(json.loads((COCO_ROOT / "annotations/instances_train2017.json").read_text())["images"])
)
launch.follow(OUTPUT_DIR, every_s=60, epochs=epochs, train_images=n_train)

# %%
# NBVAL_CHECK_OUTPUT
its, eps = launch.read_log(OUTPUT_DIR / "log.jsonl")
print("iteration records:", len(its), "| epoch records:", len(eps))
print("epoch record keys:", sorted(k for k in eps[-1] if not k.startswith("train_loss_")) if eps else None)
if SMOKE:
    assert len(its) == 2 and len(eps) == 1 and "AP" in eps[0] and "images_per_s" in eps[0]

# %% [markdown]
# ## 7. Evaluate with pycocotools, next to the papers
#
# `python -m detr_lite.evaluate` rebuilds the model from the checkpoint's config, runs the val2017
# transform (shorter side 800, longer ≤ 1333 for the COCO presets; the small smoke model uses its own
# preset's size), and hands the detections to `COCOeval` — the numbers papers report. After a real
# run, compare your AP with the published one for the same architecture (printed below); after the
# smoke run the AP is that of 2 training iterations, about 0, and says nothing about the model.

# %%
eval_json = OUTPUT_DIR / "eval.json"
ev = subprocess.run(
    [sys.executable, "-m", "detr_lite.evaluate", "--checkpoint", str(OUTPUT_DIR / "checkpoint.pt"),
     "--data", str(COCO_ROOT), "--json", str(eval_json), "--no-progress"],
    capture_output=True, text=True,
)  # fmt: skip
print(ev.stdout[-1500:] or ev.stderr[-3000:])
assert ev.returncode == 0
ours = json.loads(eval_json.read_text())
if SMOKE:
    print(f"smoke run (2 iterations on a fixture): AP {100 * ours['AP']:.1f} is a pipeline check, not a result")
else:
    print(f"{ARCH}: your run AP {100 * ours['AP']:.1f}  |  published AP {launch.PAPER_AP[ARCH]:.1f}")

# %%
# NBVAL_CHECK_OUTPUT
print("published COCO val2017 box AP:")
for name, ap in launch.PAPER_AP.items():
    print(f"  {name:34s} {ap:5.1f}")
print(f"training time: DETR {launch.RECIPES['detr'].v100_hours} V100-h (500 ep), "
      f"Deformable DETR {launch.RECIPES['deformable_detr'].v100_hours} V100-h (50 ep)")  # fmt: skip

# %% [markdown]
# ## 8. Predictions and attention on val images
#
# Load the checkpoint through the package, run two val images, keep detections above a score
# threshold, and — for DETR — capture the last decoder layer's cross-attention: for each detection,
# the attention of its query over the encoder's feature grid shows *where the object query looked*.
# (In the stored smoke run the boxes and maps are noise from 2 iterations; after a real run they are
# the picture in the paper.)

# %%
from torchvision.ops import box_convert

from detr_lite.checkpoint import load_checkpoint
from detr_lite.data.coco import build_dataset, collate_fn
from detr_lite.models import build_postprocessor
from detr_lite.transformer import capture_attention

model, cfg, _ = load_checkpoint(OUTPUT_DIR / "checkpoint.pt")
model.eval()
val = build_dataset(COCO_ROOT, "val2017", cfg.data, train=False)
coco_names = {c["id"]: c["name"] for c in val.coco.dataset["categories"]}
# a barely trained model also predicts ids no category uses: give them a name too
names = {i: coco_names.get(i, f"id {i}") for i in range(cfg.model.num_classes)}
images, mask, targets = collate_fn([val[0], val[1]])
with torch.no_grad(), capture_attention(model, layers=["transformer.decoder"]) as attn:
    outputs = model(images, mask)
results = build_postprocessor(cfg.model)(outputs, torch.stack([t["size"] for t in targets]))

# %%
# NBVAL_CHECK_OUTPUT
print("pred_logits", tuple(outputs["pred_logits"].shape), "| pred_boxes", tuple(outputs["pred_boxes"].shape))
assert outputs["pred_logits"].shape[-1] == (91 + 1 if cfg.model.arch == "detr" else 91)

# %%
fig, axes = viz.subplots(1, 2, width=6.0, row_height=3.0)
for ax, img, t, r in zip(axes[0], images, targets, results):
    h, w = t["size"].tolist()
    keep = r["scores"].topk(min(5, len(r["scores"]))).indices  # the 5 most confident detections
    viz.show_boxes(img[:, :h, :w], r["boxes"][keep], labels=r["labels"][keep], scores=r["scores"][keep],
                   class_names=names, ax=ax, title=f"image {int(t['image_id'])}")  # fmt: skip
fig.suptitle(("smoke run (noise): " if SMOKE else "") + "the 5 most confident detections per val image")

# %%
if cfg.model.arch == "detr" and attn:
    cross = [k for k in attn if k.endswith("multihead_attn")]  # transformer.decoder.layers.N.multihead_attn
    last = max(cross, key=lambda k: int(k.split(".")[-2]))  # the last decoder layer's cross-attention
    w_att = attn[last][0].mean(0)  # [Q, HW] for image 0, heads averaged
    h, w = targets[0]["size"].tolist()
    stride = model.backbone.strides[-1]  # 32 for ResNet layer4 (16 for DC5 or the toy's layer3)
    fh, fw = -(-images.shape[-2] // stride), -(-images.shape[-1] // stride)  # padded feature grid
    top = results[0]["scores"].topk(3).indices
    maps = w_att[top].reshape(-1, fh, fw)
    boxes = results[0]["boxes"][top]
    print(f"cross-attention from {last}: {tuple(attn[last].shape)} -> maps {tuple(maps.shape)}")
    viz.show_attention_maps(
        images[0], maps, boxes=boxes, titles=[f"query {int(q)}" for q in top], stride=stride,
        suptitle=("smoke run (noise): " if SMOKE else "") + "last decoder layer's cross-attention, 3 top queries",
    )  # fmt: skip
else:
    print("Deformable DETR attends at a few sampled points per query instead of the whole grid; "
          "notebooks 07-08 draw them.")  # fmt: skip

# %% [markdown]
# ## 9. The official checkpoints, through the same evaluation
#
# The model zoos publish the weights behind the papers' tables. They load unchanged (same
# state-dict names), so evaluating one is the quickest end-to-end check of a COCO setup — and the
# AP your own run is heading for. DETR weights (`https://dl.fbaipublicfiles.com/detr/…`) are plain
# files; Deformable DETR's are behind the "model" links (Google Drive) of its README.

# %%
for arch, url in launch.OFFICIAL_CHECKPOINTS.items():
    print(f"{arch:34s} AP {launch.PAPER_AP[arch]:4.1f}  {url}")
print()
print("python -m detr_lite.evaluate --checkpoint detr-r50-e632da11.pth --official-arch detr_r50 "
      f"--data {COCO_ROOT if not SMOKE else '/path/to/coco'} --batch-size 2   # expect AP 42.0")  # fmt: skip

# %% tags=["gpu"]
if SMOKE or OFFICIAL_CHECKPOINT is None:
    print("skipped (gpu cell): set SMOKE = False and OFFICIAL_CHECKPOINT to a downloaded model-zoo file")
else:
    official_arch = ARCH  # the model-zoo file of the same architecture
    subprocess.run(
        [sys.executable, "-m", "detr_lite.evaluate", "--checkpoint", OFFICIAL_CHECKPOINT, "--official-arch",
         official_arch, "--data", str(COCO_ROOT), "--batch-size", "2", "--num-workers", str(NUM_WORKERS)],
        check=True,
    )  # fmt: skip
    print(f"published: {launch.PAPER_AP[official_arch]}")

# %% [markdown]
# ## Summary
#
# * A COCO run is a long-lived **job**, not a cell: `torchrun` in its own session, a pid file that
#   prevents double launches, `--resume` on re-launch, and a JSON-lines log as the only channel back.
# * The official recipes (DETR: 500 epochs, lr 1e-4/1e-5, batch 64; Deformable: 50 epochs,
#   lr 2e-4 with ×0.1 for backbone, offsets and reference points, batch 32) assume their total
#   batch; linear scaling adapts the lr to yours.
# * `images_per_s` and `max_memory_mb` in every epoch record make the effect of `--amp`,
#   `--channels-last`, `--compile` and `--num-workers` measurable, and give the ETA.
# * The same `python -m detr_lite.evaluate` scores your checkpoint and the official ones (42.0 AP for
#   DETR R50; 44.5 / 46.2 / 46.9 for Deformable DETR and its refinement / two-stage variants).
#
# ## Exercises
#
# 1. Set `EPOCHS = 50` for `ARCH = "detr_r50"` and `"deformable_detr_r50"`: compare the AP curves
#    in `log.jsonl` after the same number of epochs (the Deformable DETR paper's Figure 3 story).
# 2. Launch, restart the kernel, re-run the notebook: check the job was neither duplicated nor
#    restarted (`train.pid`, `train.out`), then `launch.stop(OUTPUT_DIR)` and relaunch to resume.
# 3. From two short runs with and without `AMP` / `CHANNELS_LAST`, read `images_per_s` and
#    `max_memory_mb` from the epoch records and estimate the hours each saves over 50 epochs.
# 4. Evaluate `detr-r50-e632da11.pth` with `--batch-size 1` and `2`: why does padding change AP?
