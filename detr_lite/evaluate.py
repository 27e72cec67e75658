"""COCO box AP of a checkpoint: ``python -m detr_lite.evaluate --checkpoint FILE [options]``.

Examples::

    python -m detr_lite.evaluate --checkpoint data/checkpoints/detr_shapes.pt
    python -m detr_lite.evaluate --checkpoint runs/detr-shapes/checkpoint.pt --json eval.json
    python -m detr_lite.evaluate --checkpoint detr-r50-e632da11.pth --official-arch detr_r50 --data coco

A detr_lite checkpoint carries its config, so the model and the validation transform are
rebuilt from it. An official model-zoo file (``{'model': state_dict}``) needs
``--official-arch``; it is then evaluated at the official validation transform (shorter side
800, longer side at most 1333). Prints AP, AP50, AP75, APs, APm, APl (pycocotools COCOeval,
``stats[0:6]``) as a table; ``--json`` also writes them (plus all 12 stats) to a file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from detr_lite.config import Config, DataConfig
from detr_lite.engine import evaluate
from detr_lite.utils import format_ap_table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m detr_lite.evaluate", description=__doc__.splitlines()[0])
    p.add_argument(
        "--checkpoint", required=True, help="detr_lite checkpoint (.pt) or official model-zoo file"
    )
    p.add_argument(
        "--official-arch", help="treat --checkpoint as an official file of this arch (e.g. detr_r50)"
    )
    p.add_argument("--data", help="COCO-layout root (default: the checkpoint config's data root)")
    p.add_argument("--split", help="split to evaluate (default: the config's val split, val2017)")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument(
        "--val-size", type=int,
        help="short side of the evaluated images (default: the config's data.val_size; 800 for official files)",
    )  # fmt: skip
    p.add_argument("--val-max-size", type=int, help="longest side cap (default: the config's data.val_max_size)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's validation batch size (train.eval_batch_size, else batch_size)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--max-iters", type=int, help="evaluate only the first N batches (smoke test)")
    p.add_argument("--threads", type=int, help="torch intra-op CPU threads")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace) -> dict:
    from detr_lite.checkpoint import model_from_checkpoint, read_checkpoint
    from detr_lite.data.coco import build_dataset, collate_fn
    from detr_lite.models import build_criterion, build_postprocessor

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if not Path(args.checkpoint).is_file():
        raise ValueError(f"--checkpoint {args.checkpoint}: file not found")

    # the config first (cheap), then the data (read and checked once), then the model
    ckpt = None
    if args.official_arch:
        from detr_lite.official import official_config

        if not args.data:
            raise ValueError("--official-arch needs --data (a COCO-layout root such as /path/to/coco)")
        cfg = Config(name=args.official_arch, model=official_config(args.official_arch), data=DataConfig())
    else:
        ckpt = read_checkpoint(args.checkpoint)
        if "config" not in ckpt:
            raise ValueError(
                f"--checkpoint {args.checkpoint}: no 'config' entry (an official model-zoo file?); "
                "pass --official-arch detr_r50 (or another arch) and --data"
            )
        cfg = Config.from_dict(ckpt["config"])
    if args.data:
        cfg.data.root = args.data
    for name in ("val_size", "val_max_size"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected a positive number of pixels, got {value}")
            setattr(cfg.data, name, value)
    if cfg.data.val_max_size < cfg.data.val_size:
        raise ValueError(f"--val-max-size {cfg.data.val_max_size} is below --val-size {cfg.data.val_size}")
    split = args.split or cfg.data.val_split
    dataset = build_dataset(cfg.data.root, split, cfg.data, train=False)

    if args.official_arch:
        from detr_lite.official import load_official_checkpoint

        model = load_official_checkpoint(args.checkpoint, arch=args.official_arch)
    else:
        model, _ = model_from_checkpoint(ckpt, str(args.checkpoint))
    model.to(device).eval()
    criterion = build_criterion(cfg.model).to(device)
    postprocessor = build_postprocessor(cfg.model)

    batch_size = args.batch_size or cfg.train.val_batch_size
    images = dataset if args.max_iters is None else Subset(dataset, range(min(len(dataset), args.max_iters * batch_size)))
    loader = DataLoader(images, batch_size=batch_size, collate_fn=collate_fn, num_workers=args.num_workers)
    metrics = evaluate(model, postprocessor, loader, dataset.coco, device, criterion=criterion, progress=not args.no_progress)
    title = (
        f"COCO bbox AP of {args.checkpoint} on {cfg.data.root}/{split} "
        f"({metrics['num_images']} images at short side {cfg.data.val_size}, {metrics['num_detections']} detections):"
    )
    print(format_ap_table(metrics, title=title))
    if args.json:
        out = {
            "checkpoint": str(args.checkpoint),
            "official_arch": args.official_arch,
            "data": cfg.data.root,
            "split": split,
            "val_size": cfg.data.val_size,
            "val_max_size": cfg.data.val_max_size,
            **metrics,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"metrics written to {args.json}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    from detr_lite.utils import cli_main

    return cli_main("detr_lite.evaluate", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
