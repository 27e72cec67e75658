"""Train DETR / Deformable DETR: ``python -m detr_lite.train --config NAME [options]``.

Examples::

    python -m detr_lite.train --config detr-shapes --output runs/detr-shapes        # the toy recipe
    python -m detr_lite.train --config detr-shapes --epochs 2 --max-iters-per-epoch 5  # smoke run
    python -m detr_lite.train --config detr-shapes --output runs/detr-shapes --resume  # continue
    torchrun --nproc_per_node 2 -m detr_lite.train --config detr-shapes ...           # DDP

The data folder is validated before anything heavy is built. Into ``--output`` go
``config.json``, ``checkpoint.pt`` (after every epoch, written atomically), ``log.jsonl`` (one
record per iteration plus one per epoch), ``metrics.json`` and ``loss.png`` (refreshed every
epoch). ``--resume`` continues from ``checkpoint.pt`` exactly: every epoch reseeds all RNGs
from ``(seed, epoch, rank)`` and the sampler from ``(seed, epoch)``, so on CPU with
``--num-workers 0`` a resumed run logs the same losses as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from detr_lite import distributed as D
from detr_lite.checkpoint import (
    describe_mismatch,
    load_state_dict_checked,
    read_checkpoint,
    save_checkpoint,
    state_dict_mismatch,
)
from detr_lite.config import PRESETS, Config, get_config
from detr_lite.engine import (
    ModelEma,
    NonFiniteLossError,
    amp_dtype_for,
    build_lr_scheduler,
    build_optimizer,
    evaluate,
    train_one_epoch,
)
from detr_lite.monitor import JsonlLog, save_progress_plot, write_json_atomic
from detr_lite.utils import (
    AP_KEYS,
    format_ap_table,
    get_rng_state,
    max_memory_mb,
    seed_everything,
    set_rng_state,
)

CLASS_HEAD_PREFIX = "class_embed"


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m detr_lite.train",
        description="Train DETR / Deformable DETR on a COCO-layout folder (default: the bundled shapes data).",
    )
    p.add_argument("--config", default="detr-shapes", help=f"preset ({', '.join(PRESETS)}) or a config .json")
    p.add_argument("--data", help="COCO-layout root ({train,val}2017/ + annotations/); default: the preset's")
    p.add_argument("--output", default=None, help="output folder (default runs/<config name>)")
    p.add_argument("--epochs", type=int, help="total number of epochs (also extends a --resume'd run)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    p.add_argument("--batch-size", type=int, help="images per process and step")
    p.add_argument("--lr", type=float, help="learning rate of the transformer and heads")
    p.add_argument("--lr-backbone", type=float, help="learning rate of the backbone")
    p.add_argument(
        "--lr-drop", type=int,
        help="epoch after which every lr is multiplied by 0.1 (with --resume: allowed while no drop has happened)",
    )  # fmt: skip
    p.add_argument(
        "--ema-decay", type=float,
        help="also keep a moving average of the weights (e.g. 0.998), evaluated and saved as the model; 0: off",
    )  # fmt: skip
    p.add_argument("--num-workers", type=int, help="DataLoader workers")
    p.add_argument("--cached-views", type=int, help=argparse.SUPPRESS)  # removed: a one-line error
    p.add_argument(
        "--num-classes", type=int, help="fix num_classes (default: max category id + 1 of the data)"
    )
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument(
        "--amp", action="store_true", help="mixed precision on CUDA (bf16 if supported, else fp16)"
    )
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format for the CNN")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--pretrained-backbone",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ImageNet backbone weights via torchvision (must already be in the torch cache offline)",
    )
    p.add_argument(
        "--finetune",
        metavar="CKPT",
        help="start from these weights; class head dropped if num_classes differs",
    )
    p.add_argument(
        "--backbone-weights",
        metavar="CKPT",
        help="start the backbone from these weights (python -m detr_lite.pretrain output, or any DETR checkpoint)",
    )
    p.add_argument(
        "--max-iters-per-epoch", type=int, help="smoke mode: stop each train/eval pass after N batches"
    )
    p.add_argument("--eval-every", type=int, help="evaluate every N epochs (and always after the last)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--threads", type=int, help="torch intra-op CPU threads (1 helps on a busy shared CPU)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def load_config(name: str) -> Config:
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"--config {name}: file not found")
        return Config.from_dict(json.loads(path.read_text()))
    return get_config(name)


def apply_overrides(cfg: Config, args: argparse.Namespace) -> Config:
    """Copy the command-line options that were given into the config dataclasses."""
    t, d, m = cfg.train, cfg.data, cfg.model
    for arg, (obj, field) in {
        "epochs": (t, "epochs"),
        "batch_size": (t, "batch_size"),
        "lr": (t, "lr"),
        "lr_backbone": (t, "lr_backbone"),
        "lr_drop": (t, "lr_drop"),
        "eval_every": (t, "eval_every"),
        "seed": (t, "seed"),
        "ema_decay": (t, "ema_decay"),
        "num_workers": (d, "num_workers"),
        "data": (d, "root"),
        "pretrained_backbone": (m, "pretrained_backbone"),
    }.items():
        value = getattr(args, arg)
        if value is not None:
            setattr(obj, field, value)
    if args.amp:
        t.amp = True
    for field in ("epochs", "batch_size", "eval_every"):
        if getattr(t, field) < 1:
            raise ValueError(
                f"--{field.replace('_', '-')}: expected a positive integer, received {getattr(t, field)}"
            )
    return cfg


def dataset_category_ids(root: str, split: str) -> list[int]:
    """Category ids listed in ``root/annotations/instances_<split>.json``."""
    path = Path(root) / "annotations" / f"instances_{split}.json"
    with open(path) as f:
        return sorted(int(c["id"]) for c in json.load(f).get("categories", []))


def resolve_num_classes(cfg: Config, fixed: int | None) -> None:
    """``num_classes = max category id + 1`` of the training data, unless ``--num-classes`` fixes it."""
    ids = dataset_category_ids(cfg.data.root, cfg.data.train_split)
    if not ids:
        raise ValueError(f"{cfg.data.root}: instances_{cfg.data.train_split}.json lists no categories")
    needed = max(ids) + 1
    if fixed is not None:
        if max(ids) >= fixed:
            raise ValueError(
                f"--num-classes {fixed}: the dataset has category id {max(ids)}; "
                f"expected num_classes >= {needed}"
            )
        cfg.model.num_classes = fixed
    else:
        cfg.model.num_classes = needed


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
class EpochSeededBatches:
    """Batches of a shuffled dataset whose order depends only on ``(seed, epoch)``.

    Outside DDP it wraps a ``RandomSampler`` driven by its own ``torch.Generator`` that is
    reseeded at ``set_epoch``; under DDP a ``DistributedSampler`` (seeded the same way by
    ``set_epoch``) shards the data. ``drop_last=True`` as in the official recipe, except that a
    dataset smaller than one batch still yields one (smaller) batch.
    """

    def __init__(self, dataset, batch_size: int, seed: int):
        self.seed = seed
        self.generator = torch.Generator()
        if D.is_dist():
            self.sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=False)
        else:
            self.sampler = RandomSampler(dataset, generator=self.generator)
        n = len(self.sampler)
        self.batches = BatchSampler(self.sampler, batch_size, drop_last=n >= batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def build_loaders(cfg: Config):
    from detr_lite.data.coco import build_dataset, collate_fn

    ds_train = build_dataset(cfg.data.root, cfg.data.train_split, cfg.data, train=True)
    ds_val = build_dataset(cfg.data.root, cfg.data.val_split, cfg.data, train=False)
    batches = EpochSeededBatches(ds_train, cfg.train.batch_size, cfg.train.seed)
    loader_gen = torch.Generator()
    workers = cfg.data.num_workers
    # page-locked host memory lets the host->GPU copies (non_blocking=True in the engine) overlap compute
    pin = torch.cuda.is_available()
    train_loader = DataLoader(
        ds_train,
        batch_sampler=batches,
        collate_fn=collate_fn,
        num_workers=workers,
        generator=loader_gen,
        pin_memory=pin,
    )
    val_sampler = DistributedSampler(ds_val, shuffle=False) if D.is_dist() else SequentialSampler(ds_val)
    val_loader = DataLoader(
        ds_val,
        batch_size=cfg.train.val_batch_size,
        sampler=val_sampler,
        collate_fn=collate_fn,
        num_workers=workers,
        pin_memory=pin,
    )
    return ds_train, ds_val, train_loader, val_loader, batches, loader_gen


def check_late_scale(cfg: Config) -> None:
    """One-line ``ValueError`` for a bad progressive-resizing setting (``data.late_scale``), before heavy work."""
    d = cfg.data
    scale, after = d.late_scale, d.late_scale_after
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"config {cfg.name}: data.late_scale must be a positive number, got {scale!r}")
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise ValueError(f"config {cfg.name}: data.late_scale_after must be an integer >= 0, got {after!r}")


def check_ema(cfg: Config) -> None:
    """One-line ``ValueError`` for a bad ``train.ema_decay`` (0 = off, else in (0, 1)), before heavy work."""
    d = cfg.train.ema_decay
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not (d == 0 or 0 < d < 1):
        raise ValueError(f"config {cfg.name}: train.ema_decay must be 0 (off) or in (0, 1), got {d!r}")


def ema_window(decay: float) -> int:
    """The number of steps a moving average with this decay mostly covers: 1 / (1 - decay)."""
    return round(1.0 / (1.0 - decay))


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return seed + 1000 * (epoch + 1) + 7919 * rank


# --------------------------------------------------------------------------------------------
# model helpers
# --------------------------------------------------------------------------------------------
def load_finetune_weights(model: torch.nn.Module, path: str) -> str:
    """Load weights for fine-tuning; a class head of another size is skipped (left freshly initialised).

    Any other mismatch (missing, unexpected or differently shaped keys) is an error naming the keys.
    """
    ckpt = read_checkpoint(path)
    sd = dict(ckpt["model"])
    missing, unexpected, mismatched = state_dict_mismatch(model, sd)
    head_mismatch = [m for m in mismatched if m[0].startswith(CLASS_HEAD_PREFIX)]
    for key, _, _ in head_mismatch:
        sd.pop(key)
    other = [m for m in mismatched if not m[0].startswith(CLASS_HEAD_PREFIX)]
    if missing or unexpected or other:
        raise ValueError(
            f"--finetune {path}: weights do not fit the model: {describe_mismatch(missing, unexpected, other)}"
        )
    own = model.state_dict()
    sd = {k: (v.to(own[k].dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    model.load_state_dict(sd, strict=False)
    if head_mismatch:
        return f"loaded {path}; class head re-initialised ({len(head_mismatch)} tensors: num_classes differs)"
    return f"loaded {path} (all tensors)"


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from detr_lite.data.coco import validate_coco_folder
    from detr_lite.models import build_criterion, build_model, build_postprocessor

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    output = Path(args.output or f"runs/{Path(args.config).stem}")
    ckpt_path = output / "checkpoint.pt"

    # 1. configuration (cheap) and data validation, before anything heavy is built
    resume_ckpt = None
    if args.cached_views is not None:
        raise ValueError("--cached-views was removed (cached backbone features served no preset); train without it")
    if args.resume:
        resume_ckpt = read_checkpoint(ckpt_path)
        if "optimizer" not in resume_ckpt or "epoch" not in resume_ckpt:
            raise ValueError(f"--resume: {ckpt_path} is not a training checkpoint (no optimizer/epoch state)")
        cfg = Config.from_dict(resume_ckpt["config"])
        for name in ("epochs", "num_workers", "eval_every"):  # the only settings a resume may change
            if getattr(args, name) is not None:
                setattr(cfg.train if name != "num_workers" else cfg.data, name, getattr(args, name))
        if args.lr_drop is not None and args.lr_drop != cfg.train.lr_drop:
            # a new drop epoch (as Deformable DETR's resume allows): exact only while neither the old
            # nor the new schedule has dropped yet, so the resumed run equals a fresh run with it
            done = int(resume_ckpt["epoch"])
            if min(args.lr_drop, cfg.train.lr_drop) <= done:
                raise ValueError(
                    f"--lr-drop {args.lr_drop} with --resume: {ckpt_path} has finished {done} epochs with "
                    f"lr_drop {cfg.train.lr_drop}; both drops must come after epoch {done}"
                )
            cfg.train.lr_drop = args.lr_drop
        if args.data is not None:
            cfg.data.root = args.data
    else:
        cfg = apply_overrides(load_config(args.config), args)
    for split in (cfg.data.train_split, cfg.data.val_split):
        validate_coco_folder(cfg.data.root, split)
    check_late_scale(cfg)
    check_ema(cfg)
    if resume_ckpt is None:
        resolve_num_classes(cfg, args.num_classes)
    starts_from_weights = bool(args.finetune or args.backbone_weights)
    if args.backbone_weights and resume_ckpt is None and not Path(args.backbone_weights).is_file():
        raise ValueError(f"--backbone-weights {args.backbone_weights}: file not found")
    if resume_ckpt is None and not cfg.model.pretrained_backbone and not starts_from_weights:
        # frozen backbone parts that were never trained would stay random for the whole run: the whole
        # backbone when it is frozen, else (FrozenBatchNorm2d: the official rule) conv1, layer1 and BN
        frozen = (
            "the backbone is frozen (model.train_backbone false)"
            if not cfg.model.train_backbone
            else "conv1, layer1 and every BatchNorm are frozen (model.frozen_bn true)"
            if cfg.model.frozen_bn
            else None
        )
        if frozen:
            raise ValueError(
                f"config {cfg.name}: {frozen} and would stay random; pass --backbone-weights FILE "
                "(see python -m detr_lite.pretrain), --finetune FILE or --pretrained-backbone"
            )
    if cfg.model.pretrained_backbone and resume_ckpt is None and not starts_from_weights:
        # a run that asked for ImageNet weights must not silently train from a random backbone:
        # a one-line error naming the cache path (or --no-pretrained-backbone) before anything heavy
        from detr_lite.imagenet import ensure_pretrained_backbone

        ensure_pretrained_backbone(cfg.model.backbone)

    distributed = D.init_distributed(device_name)
    rank, main = D.get_rank(), D.is_main_process()
    device = D.local_device(device_name)
    amp_dtype = amp_dtype_for(device, cfg.train.amp)
    if cfg.train.amp and amp_dtype is None and main:
        print("note: --amp is CUDA-only; training in float32 on CPU", file=sys.stderr)
    progress = main and not args.no_progress
    log = JsonlLog(output / "log.jsonl", enabled=main)
    if main:
        output.mkdir(parents=True, exist_ok=True)
        if resume_ckpt is None:  # a fresh run starts a fresh log (a resumed one appends)
            (output / "log.jsonl").unlink(missing_ok=True)
        write_json_atomic(cfg.to_dict(), output / "config.json")

    # 2. model, loss, optimiser
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model)
    if args.finetune and resume_ckpt is None:
        msg = load_finetune_weights(model, args.finetune)
        if main:
            print(msg)
    provenance: dict[str, Any] = dict(resume_ckpt["meta"].get("backbone_weights", {})) if resume_ckpt else {}
    if args.backbone_weights and resume_ckpt is None:
        from detr_lite.pretrain import backbone_provenance, load_backbone_weights

        msg = load_backbone_weights(model, args.backbone_weights)
        provenance = backbone_provenance(args.backbone_weights)
        if main:
            print(msg)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    criterion = build_criterion(cfg.model).to(device)
    postprocessor = build_postprocessor(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.train)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    n_params = sum(p.numel() for p in model.parameters())

    ds_train, ds_val, train_loader, val_loader, batches, loader_gen = build_loaders(cfg)

    start_epoch, history, wall_before = 0, [], 0.0
    if resume_ckpt is not None:
        if cfg.train.ema_decay and "model_train" not in resume_ckpt:
            raise ValueError(f"--resume: {ckpt_path} has train.ema_decay but no 'model_train' weights")
        load_state_dict_checked(model, resume_ckpt.get("model_train", resume_ckpt["model"]), source=str(ckpt_path))
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        lr_scheduler.load_state_dict(resume_ckpt["lr_scheduler"])
        lr_scheduler.step_size = max(1, cfg.train.lr_drop)  # --lr-drop may have moved it (checked above)
        if scaler is not None and "scaler" in resume_ckpt:
            scaler.load_state_dict(resume_ckpt["scaler"])
        set_rng_state(resume_ckpt["rng"])
        start_epoch = int(resume_ckpt["epoch"])
        history = list(resume_ckpt.get("metrics", []))
        wall_before = float(resume_ckpt["meta"].get("train_wall_time_s", 0.0))
        log.truncate_from(start_epoch)
        if main:
            print(f"resuming {ckpt_path} at epoch {start_epoch}")

    # the moving average of the weights (train.ema_decay), built from the loaded weights; a resumed
    # run continues the checkpoint's average, which is its "model"
    ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    if ema is not None and resume_ckpt is not None:
        load_state_dict_checked(ema.module, resume_ckpt["model"], source=str(ckpt_path))
    if args.compile:
        model = torch.compile(model)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    if main:
        print(
            f"{cfg.name}: {cfg.model.arch}/{cfg.model.backbone}, {n_params / 1e6:.2f} M params, "
            f"num_classes {cfg.model.num_classes}; data {cfg.data.root}: {len(ds_train)} train / "
            f"{len(ds_val)} val images; {cfg.train.epochs} epochs x {len(train_loader)} iters, "
            f"batch {cfg.train.batch_size} x {D.get_world_size()} process(es) on {device}"
        )
        if ema is not None:
            steps_left = (cfg.train.epochs - start_epoch) * len(train_loader)
            if args.max_iters_per_epoch:
                steps_left = (cfg.train.epochs - start_epoch) * min(len(train_loader), args.max_iters_per_epoch)
            window = ema_window(cfg.train.ema_decay)
            if steps_left < 3 * window:
                print(
                    f"note: train.ema_decay {cfg.train.ema_decay:g} averages over ~{window} steps, but this run "
                    f"has {steps_left}: the evaluated and saved average stays close to the starting weights; "
                    "set train.ema_decay 0 (--ema-decay 0) for a short run",
                    file=sys.stderr,
                )

    # 3. epochs
    coco_gt = ds_val.coco
    t_run = time.perf_counter()
    last_eval: dict[str, Any] | None = next((h for h in reversed(history) if "AP" in h), None)
    train_scale = 1.0
    for epoch in range(start_epoch, cfg.train.epochs):
        if cfg.data.scale_at(epoch) != train_scale:  # progressive resizing (data.late_scale)
            from detr_lite.data.transforms import build_transforms, scaled_sizes

            train_scale = cfg.data.scale_at(epoch)
            ds_train.transforms = build_transforms(cfg.data, train=True, scale=train_scale)
            if main:
                sizes = scaled_sizes(cfg.data, train_scale)
                print(
                    f"epoch {epoch + 1}: training sizes x{train_scale:g} from here on (data.late_scale): short "
                    f"side {sizes['train_scales']}, max {sizes['train_max_size']}, crop branch "
                    f"{sizes['crop_resize_scales']} / {list(sizes['crop_size'])}",
                    flush=True,
                )
        seed_everything(epoch_seed(cfg.train.seed, epoch, rank))
        batches.set_epoch(epoch)
        loader_gen.manual_seed(epoch_seed(cfg.train.seed, epoch, rank))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            stats = train_one_epoch(
                model, criterion, train_loader, optimizer, device, epoch,
                clip_max_norm=cfg.train.clip_max_norm, scaler=scaler, amp_dtype=amp_dtype,
                channels_last=args.channels_last, max_iters=args.max_iters_per_epoch,
                log=log.write, progress=progress, ema=ema,
            )  # fmt: skip
        except NonFiniteLossError as e:
            log.write({"type": "error", "epoch": epoch, "message": str(e)})
            if main:
                last = f"{ckpt_path} (after epoch {start_epoch if not history else history[-1]['epoch'] + 1})"
                kept = last if ckpt_path.exists() else "none written yet"
                print(f"error: {e}\nstopping; last good checkpoint: {kept}", file=sys.stderr)
            D.cleanup()
            return 1
        lr_scheduler.step()
        record: dict[str, Any] = {"type": "epoch", "epoch": epoch, "train_loss": stats["loss"]}
        if cfg.data.late_scale != 1.0:
            record["train_scale"] = train_scale
        record.update({f"train_{k}": v for k, v in stats.items() if k.startswith("loss_") or "error" in k})
        record.update(lr=stats["lr"], train_time_s=stats["train_time_s"], images_per_s=stats["images_per_s"])

        is_last = epoch + 1 == cfg.train.epochs
        if (epoch + 1) % cfg.train.eval_every == 0 or is_last:
            metrics = evaluate(
                model if ema is None else ema.module, postprocessor, val_loader, coco_gt, device, criterion=criterion,
                amp_dtype=amp_dtype, channels_last=args.channels_last,
                max_iters=args.max_iters_per_epoch, progress=progress,
            )  # fmt: skip
            record["val_loss"] = metrics["loss"]
            record.update({k: metrics[k] for k in AP_KEYS})
            record["val_images"] = metrics["num_images"]
            if ema is not None:
                record["val_weights"] = f"ema {cfg.train.ema_decay:g}"
            last_eval = record
        record["epoch_time_s"] = time.perf_counter() - t0
        record["max_memory_mb"] = max(D.all_gather_object(max_memory_mb(device)))
        history.append(record)

        if main:
            log.write(record)
            wall = wall_before + time.perf_counter() - t_run
            # with EMA the average is the checkpoint's "model" (evaluated, exported, loaded by every
            # tool); the live weights are "model_train", needed only by --resume
            train_state = {"model_train": D.unwrap_model(model).state_dict()} if ema is not None else {}
            save_checkpoint(
                ckpt_path, model if ema is None else ema.module, cfg,
                meta={"command": " ".join(["python -m detr_lite.train", *sys.argv[1:]]), "train_wall_time_s": wall, "world_size": D.get_world_size(),
                      **({"backbone_weights": provenance} if provenance else {})},
                optimizer=optimizer.state_dict(), lr_scheduler=lr_scheduler.state_dict(),
                epoch=epoch + 1, rng=get_rng_state(), metrics=history,
                sampler_generator=batches.generator.get_state(),
                **({"scaler": scaler.state_dict()} if scaler is not None else {}), **train_state,
            )  # fmt: skip
            write_json_atomic(
                {"history": history, "last_eval": last_eval, "train_wall_time_s": wall},
                output / "metrics.json",
            )
            save_progress_plot(output / "log.jsonl", output / "loss.png")
            ap = f" | val AP {record['AP']:.3f} AP50 {record['AP50']:.3f}" if "AP" in record else ""
            print(
                f"epoch {epoch + 1}/{cfg.train.epochs}: loss {record['train_loss']:.4f}{ap} | "
                f"{record['epoch_time_s']:.1f} s, {record['images_per_s']:.1f} img/s, "
                f"{record['max_memory_mb']:.0f} MiB",
                flush=True,
            )
        D.barrier()

    if main:
        if last_eval is not None:
            print(
                format_ap_table(last_eval, title=f"\nCOCO bbox AP on {cfg.data.root}/{cfg.data.val_split}:")
            )
        print(
            f"checkpoint: {ckpt_path}\nplots:      {output / 'loss.png'}\nlog:        {output / 'log.jsonl'}"
        )
    D.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    from detr_lite.utils import cli_main

    return cli_main("detr_lite.train", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
