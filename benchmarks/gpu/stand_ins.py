"""Stand-ins for what a GPU check machine cannot download, so notebook 09 runs its real code path.

* a COCO-2017-like dataset (``tests/coco_fixture.py``: real category ids with gaps, crowd regions,
  12-digit JPEG names) in the official layout under ``--coco``;
* a **random** ResNet-50 saved where torchvision's ImageNet weights are looked up
  (``$TORCH_HOME/hub/checkpoints/resnet50-0676ba61.pth``): the notebook's ``PRETRAINED_BACKBONE``
  path (``imagenet.ensure_pretrained_backbone`` + the backbone's cache load) then runs as it would with
  the real file. Refuses to run unless ``TORCH_HOME`` is set, and never overwrites an existing file;
* a **random** DETR R50 in the official model-zoo layout (``{'model': state_dict}``, ``backbone.0.body.*``
  keys) at ``--official``, for the notebook's "evaluate an official checkpoint" cell.

None of these is a real weight file: the APs they give are ~0, and the check is that every step runs.

    TORCH_HOME=/tmp/torch_home python benchmarks/gpu/stand_ins.py --coco /tmp/coco --official /tmp/detr-r50-random.pth
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from detr_lite.imagenet import pretrained_backbone_cache  # noqa: E402
from detr_lite.models import build_model  # noqa: E402
from detr_lite.official import official_config  # noqa: E402
from tests.coco_fixture import make_coco_fixture  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="stand-in data and weights for the GPU checks")
    p.add_argument("--coco", type=Path, required=True)
    p.add_argument("--official", type=Path, required=True)
    p.add_argument("--num-train", type=int, default=48)
    p.add_argument("--num-val", type=int, default=16)
    args = p.parse_args(argv)
    if not os.environ.get("TORCH_HOME"):
        raise SystemExit(
            "stand_ins.py: set TORCH_HOME to a scratch folder (the random ResNet-50 goes into its cache)"
        )
    stats = make_coco_fixture(
        args.coco,
        seed=0,
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=(480, 640),
        max_objects=8,
    )
    print(
        "fixture:",
        {s: (v["images"], v["annotations"], v["crowd"]) for s, v in stats.items()},
        "->",
        args.coco,
    )
    torch.manual_seed(0)
    path, _ = pretrained_backbone_cache("resnet50")
    if path.exists():
        print("kept existing", path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torchvision.models.resnet50().state_dict(), path)
        print("random ResNet-50 stand-in ->", path)
    ours = build_model(official_config("detr_r50")).state_dict()
    zoo = {
        ("backbone.0." + k[len("backbone.") :] if k.startswith("backbone.") else k): v
        for k, v in ours.items()
    }
    args.official.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": zoo}, args.official)
    print("random official-layout DETR R50 ->", args.official)
    return 0


if __name__ == "__main__":
    sys.exit(main())
