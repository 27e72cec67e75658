"""Train DETR / Deformable DETR: ``python -m detr_lite.train --config NAME [options]``.

Examples::

    python -m detr_lite.train --config detr-shapes --output runs/detr-shapes        # the toy recipe
    python -m detr_lite.train --config detr-shapes --epochs 2 --max-iters-per-epoch 5  # smoke run
    python -m detr_lite.train --config detr-shapes --output runs/detr-shapes --resume  # continue
    torchrun --nproc_per_node 2 --max-restarts 1 -m detr_lite.train --config detr-shapes ...  # DDP

``run`` reads top to bottom: config -> data -> model -> epochs (train, evaluate, checkpoint, log).
The config and the data are checked before anything heavy is built. Into ``--output`` go
``config.json``, ``checkpoint.pt`` (after every epoch and, with ``--checkpoint-every N``, every N
iterations; written atomically), ``log.jsonl`` (one record per iteration plus one per epoch),
``metrics.json`` and ``loss.png`` (refreshed every epoch). ``--resume`` continues from
``checkpoint.pt`` exactly, mid-epoch too: every epoch reseeds all RNGs from ``(seed, epoch, rank)``
and the batch order from ``(seed, epoch)``, a mid-epoch checkpoint holds every process's RNG
state, so on CPU with ``--num-workers 0`` a resumed run logs the same losses and ends with the
same weights as an uninterrupted one. Under ``torchrun --max-restarts N`` a group restarted
after a failure resumes by itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from detr_lite import distributed as D
from detr_lite import models
from detr_lite.checkpoint import (
    TrainState,
    backbone_provenance,
    load_backbone_weights,
    load_finetune_weights,
    read_checkpoint,
    restore_training_state,
    save_training_checkpoint,
)
from detr_lite.config import PRESETS, Config, apply_overrides, load_config, validate
from detr_lite.data.coco import build_datasets, resolve_num_classes
from detr_lite.data.loaders import build_loaders
from detr_lite.engine import (
    ModelEma,
    NonFiniteLossError,
    Precision,
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

# options that set a config field (the rest choose how this process runs)
OVERRIDES = {
    "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.lr", "lr_backbone": "train.lr_backbone",
    "lr_drop": "train.lr_drop", "ema_decay": "train.ema_decay", "eval_every": "train.eval_every",
    "checkpoint_every": "train.checkpoint_every", "seed": "train.seed", "amp": "train.amp",
    "num_workers": "data.num_workers", "data": "data.root", "pretrained_backbone": "model.pretrained_backbone",
}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.cached_views is not None:
        raise ValueError("--cached-views was removed (cached backbone features served no preset); train without it")
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    output = Path(args.output or f"runs/{Path(args.config).stem}")
    ckpt_path = output / "checkpoint.pt"

    # 1. the config: a preset or .json (a resumed run's: its checkpoint's) + the command line, checked
    resume_ckpt = read_resume_checkpoint(ckpt_path) if resuming(args, ckpt_path) else None
    overrides = {key: getattr(args, arg) for arg, key in OVERRIDES.items()}
    overrides["train.amp"] = True if args.amp else None  # a switch: only on when given
    if resume_ckpt is None:
        cfg = apply_overrides(load_config(args.config), overrides)
    else:
        cfg = apply_overrides(Config.from_dict(resume_ckpt["config"]), overrides, int(resume_ckpt["epoch"]))
    validate(cfg)

    # 2. the data, each split read and checked once; a fresh run's classes and starting weights
    datasets = build_datasets(cfg.data)
    if resume_ckpt is None:
        cfg.model.num_classes = resolve_num_classes(datasets[0], args.num_classes)
        check_starting_weights(cfg, args)

    # 3. processes, output folder
    D.init_distributed(device_name)
    rank, main = D.get_rank(), D.is_main_process()
    device = D.local_device(device_name)
    precision = Precision(amp_dtype_for(device, cfg.train.amp), channels_last=args.channels_last)
    if cfg.train.amp and precision.amp_dtype is None and main:
        print("note: --amp is CUDA-only; training in float32 on CPU", file=sys.stderr)
    log = JsonlLog(output / "log.jsonl", enabled=main)
    if main:
        output.mkdir(parents=True, exist_ok=True)
        if resume_ckpt is None:  # a fresh run starts a fresh log (a resumed one appends)
            (output / "log.jsonl").unlink(missing_ok=True)
        write_json_atomic(cfg.to_dict(), output / "config.json")

    # 4. model, loss, optimiser; a resumed run's state from its checkpoint
    seed_everything(cfg.train.seed)
    model = models.build_model(cfg.model)
    if resume_ckpt is None:
        provenance = load_starting_weights(model, args, main)
    else:
        provenance = dict(resume_ckpt["meta"].get("backbone_weights", {}))
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    criterion = models.build_criterion(cfg.model).to(device)
    postprocessor = models.build_postprocessor(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    if precision.amp_dtype == torch.float16:
        precision = Precision(precision.amp_dtype, torch.amp.GradScaler("cuda"), precision.channels_last)
    state = TrainState(model, optimizer, build_lr_scheduler(optimizer, cfg.train), precision.scaler,
                       ModelEma(model, cfg.train.ema_decay) if cfg.train.ema_decay else None)  # fmt: skip
    loaders = build_loaders(cfg, datasets, max_iters=args.max_iters_per_epoch)
    rng = None
    if resume_ckpt is not None:
        rng = restore_training_state(state, resume_ckpt, str(ckpt_path), rank)
        state.lr_scheduler.step_size = max(1, cfg.train.lr_drop)  # --lr-drop may have moved it (checked above)
        log.truncate_from(state.epoch, state.iteration)
        if main:
            at = f", iteration {state.iteration}" if state.iteration else ""
            print(f"resuming {ckpt_path} at epoch {state.epoch}{at}")
    if args.compile:
        state.model = torch.compile(state.model)
    if D.is_dist():
        state.model = torch.nn.parallel.DistributedDataParallel(
            state.model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if main:
        describe_run(cfg, state, loaders, device)

    # 5. epochs: train, evaluate, checkpoint, log
    meta = {"command": " ".join(["python -m detr_lite.train", *sys.argv[1:]]), "world_size": D.get_world_size(),
            **({"backbone_weights": provenance} if provenance else {})}  # fmt: skip
    t_run, saved = time.perf_counter(), (state.epoch, state.iteration) if resume_ckpt else None

    def checkpoint() -> None:  # every process's RNG state, then rank 0 writes
        nonlocal saved
        rngs = D.all_gather_object(get_rng_state())
        if main:
            wall = state.wall_s + time.perf_counter() - t_run
            save_training_checkpoint(ckpt_path, state, cfg, {**meta, "train_wall_time_s": wall}, rngs)
        saved = (state.epoch, state.iteration)

    def after_step(record: dict[str, Any]) -> None:
        log.write(record)
        done, every = record["iter"] + 1, cfg.train.checkpoint_every
        if every and done % every == 0 and done < loaders.batches.per_epoch():
            checkpoint()

    last_eval = next((h for h in reversed(state.history) if "AP" in h), None)
    train_scale = 1.0
    for epoch in range(state.epoch, cfg.train.epochs):
        train_scale = set_train_scale(loaders.train_set, cfg, epoch, train_scale, main)
        if state.iteration:  # a mid-epoch checkpoint: the RNG streams where it left them
            set_rng_state(rng)
        else:
            seed_everything(epoch_seed(cfg.train.seed, epoch, rank))
        loaders.batches.set_epoch(epoch, start=state.iteration)
        loaders.generator.manual_seed(epoch_seed(cfg.train.seed, epoch, rank))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            stats = train_one_epoch(
                state.model, criterion, loaders.train, state.optimizer, device, epoch, cfg.train.clip_max_norm,
                precision=precision, ema=state.ema, log=after_step, progress=main and not args.no_progress,
                totals=state.epoch_totals,
            )  # fmt: skip
        except NonFiniteLossError as e:
            log.write({"type": "error", "epoch": epoch, "message": str(e)})
            if main:
                kept = f"{ckpt_path} ({position(*saved)})" if saved and ckpt_path.exists() else "none written yet"
                print(f"error: {e}\nstopping; last good checkpoint: {kept}", file=sys.stderr)
            D.cleanup()
            return 1
        state.lr_scheduler.step()
        record = epoch_record(epoch, stats, cfg, train_scale)
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            weights = state.model if state.ema is None else state.ema.module
            metrics = evaluate(weights, postprocessor, loaders.val, loaders.val_set.coco, device, criterion=criterion,
                               precision=precision, progress=main and not args.no_progress)  # fmt: skip
            record.update(val_loss=metrics["loss"], **{k: metrics[k] for k in AP_KEYS}, val_images=metrics["num_images"])
            if state.ema is not None:
                record["val_weights"] = f"ema {cfg.train.ema_decay:g}"
            last_eval = record
        record["epoch_time_s"] = time.perf_counter() - t0
        record["max_memory_mb"] = max(D.all_gather_object(max_memory_mb(device)))
        state.history.append(record)
        state.epoch, state.epoch_totals = epoch + 1, {}
        log.write(record)
        checkpoint()
        if main:
            report_epoch(output, cfg, state, last_eval, wall=state.wall_s + time.perf_counter() - t_run)
        D.barrier()

    if main:
        if last_eval is not None:
            print(format_ap_table(last_eval, title=f"\nCOCO bbox AP on {cfg.data.root}/{cfg.data.val_split}:"))
        print(f"checkpoint: {ckpt_path}\nplots:      {output / 'loss.png'}\nlog:        {output / 'log.jsonl'}")
    D.cleanup()
    return 0


# --------------------------------------------------------------------------------------------
# the steps of run()
# --------------------------------------------------------------------------------------------
def resuming(args: argparse.Namespace, ckpt_path: Path) -> bool:
    """``--resume``, or torchrun restarting a failed group (``--max-restarts``) of a run that has
    written a checkpoint (torchrun starts the same command again, without ``--resume``)."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    return args.resume or (restarted and ckpt_path.is_file())


def read_resume_checkpoint(path: Path) -> dict[str, Any]:
    ckpt = read_checkpoint(path)
    if "optimizer" not in ckpt or "epoch" not in ckpt:
        raise ValueError(f"--resume: {path} is not a training checkpoint (no optimizer/epoch state)")
    return ckpt


def check_starting_weights(cfg: Config, args: argparse.Namespace) -> None:
    """One-line errors, before anything heavy, for a fresh run whose starting weights cannot work."""
    from_weights = bool(args.finetune or args.backbone_weights)
    if args.backbone_weights and not Path(args.backbone_weights).is_file():
        raise ValueError(f"--backbone-weights {args.backbone_weights}: file not found")
    if not cfg.model.pretrained_backbone and not from_weights:
        # frozen backbone parts that were never trained would stay random for the whole run: the whole
        # backbone when it is frozen, else (FrozenBatchNorm2d: the official rule) conv1, layer1 and BN
        frozen = (
            "the backbone is frozen (model.train_backbone false)" if not cfg.model.train_backbone
            else "conv1, layer1 and every BatchNorm are frozen (model.frozen_bn true)" if cfg.model.frozen_bn
            else None
        )  # fmt: skip
        if frozen:
            raise ValueError(
                f"config {cfg.name}: {frozen} and would stay random; pass --backbone-weights FILE "
                "(see python -m detr_lite.pretrain), --finetune FILE or --pretrained-backbone"
            )
    if cfg.model.pretrained_backbone and not from_weights:
        # a run that asked for ImageNet weights must not silently train from a random backbone
        from detr_lite.imagenet import ensure_pretrained_backbone

        ensure_pretrained_backbone(cfg.model.backbone)


def load_starting_weights(model: torch.nn.Module, args: argparse.Namespace, main: bool) -> dict[str, Any]:
    """``--finetune`` / ``--backbone-weights`` into a fresh model; returns the backbone's provenance."""
    for path, load in ((args.finetune, load_finetune_weights), (args.backbone_weights, load_backbone_weights)):
        if path:
            msg = load(model, path)
            if main:
                print(msg)
    return backbone_provenance(args.backbone_weights) if args.backbone_weights else {}


def describe_run(cfg: Config, state: TrainState, loaders, device: torch.device) -> None:
    """What is about to train, on what, for how long (and a note when EMA cannot fill its window)."""
    n_params = sum(p.numel() for p in D.unwrap_model(state.model).parameters())
    per_epoch = loaders.batches.per_epoch()
    print(
        f"{cfg.name}: {cfg.model.arch}/{cfg.model.backbone}, {n_params / 1e6:.2f} M params, "
        f"num_classes {cfg.model.num_classes}; data {cfg.data.root}: {len(loaders.train_set)} train / "
        f"{len(loaders.val_set)} val images; {cfg.train.epochs} epochs x {per_epoch} iters, "
        f"batch {cfg.train.batch_size} x {D.get_world_size()} process(es) on {device}"
    )
    steps_left = (cfg.train.epochs - state.epoch) * per_epoch - state.iteration
    window = round(1.0 / (1.0 - cfg.train.ema_decay)) if cfg.train.ema_decay else 0
    if state.ema is not None and steps_left < 3 * window:
        print(
            f"note: train.ema_decay {cfg.train.ema_decay:g} averages over ~{window} steps, but this run "
            f"has {steps_left}: the evaluated and saved average stays close to the starting weights; "
            "set train.ema_decay 0 (--ema-decay 0) for a short run",
            file=sys.stderr,
        )


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return seed + 1000 * (epoch + 1) + 7919 * rank


def set_train_scale(ds_train, cfg: Config, epoch: int, current: float, main: bool) -> float:
    """Progressive resizing (``data.late_scale``): the training transforms of ``epoch``'s sizes."""
    scale = cfg.data.scale_at(epoch)
    if scale == current:
        return current
    from detr_lite.data.transforms import build_transforms, scaled_sizes

    ds_train.transforms = build_transforms(cfg.data, train=True, scale=scale)
    if main:
        sizes = scaled_sizes(cfg.data, scale)
        print(
            f"epoch {epoch + 1}: training sizes x{scale:g} from here on (data.late_scale): short "
            f"side {sizes['train_scales']}, max {sizes['train_max_size']}, crop branch "
            f"{sizes['crop_resize_scales']} / {list(sizes['crop_size'])}",
            flush=True,
        )
    return scale


def epoch_record(epoch: int, stats: dict[str, float], cfg: Config, train_scale: float) -> dict[str, Any]:
    """The epoch's log record from ``train_one_epoch``'s averages (evaluation adds to it)."""
    record: dict[str, Any] = {"type": "epoch", "epoch": epoch, "train_loss": stats["loss"]}
    if cfg.data.late_scale != 1.0:
        record["train_scale"] = train_scale
    record.update({f"train_{k}": v for k, v in stats.items() if k.startswith("loss_") or "error" in k})
    record.update(lr=stats["lr"], train_time_s=stats["train_time_s"], images_per_s=stats["images_per_s"])
    return record


def report_epoch(output: Path, cfg: Config, state: TrainState, last_eval: dict | None, wall: float) -> None:
    """After an epoch: ``metrics.json``, ``loss.png`` and one line on stdout."""
    record = state.history[-1]
    write_json_atomic({"history": state.history, "last_eval": last_eval, "train_wall_time_s": wall},
                      output / "metrics.json")  # fmt: skip
    save_progress_plot(output / "log.jsonl", output / "loss.png")
    ap = f" | val AP {record['AP']:.3f} AP50 {record['AP50']:.3f}" if "AP" in record else ""
    print(f"epoch {record['epoch'] + 1}/{cfg.train.epochs}: loss {record['train_loss']:.4f}{ap} | "
          f"{record['epoch_time_s']:.1f} s, {record['images_per_s']:.1f} img/s, {record['max_memory_mb']:.0f} MiB",
          flush=True)  # fmt: skip


def position(epoch: int, iteration: int) -> str:
    return f"after epoch {epoch}" if not iteration else f"epoch {epoch + 1}, after iteration {iteration}"


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
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt (also mid-epoch)")
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
        "--max-iters-per-epoch", type=int, help="smoke mode: at most N batches per train epoch and evaluation"
    )
    p.add_argument("--eval-every", type=int, help="evaluate every N epochs (and always after the last)")
    p.add_argument(
        "--checkpoint-every", type=int,
        help="also write the checkpoint every N iterations (0: after every epoch only)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--threads", type=int, help="torch intra-op CPU threads (1 helps on a busy shared CPU)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    from detr_lite.utils import cli_main

    return cli_main("detr_lite.train", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
