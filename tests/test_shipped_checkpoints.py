"""The shipped toy checkpoints: they load, their recipe is the preset, and they score what their card says.

Each ``data/checkpoints/*.pt`` carries its per-epoch ``metrics`` (the training log's evaluations);
re-evaluating the fp16 weights on the bundled val split must reproduce the last logged AP table (fp16
storage moves AP by well under 0.01), so the numbers in the README and the cards are live, not copied.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from detr_lite.checkpoint import load_checkpoint
from detr_lite.config import get_config
from detr_lite.data.coco import build_dataset, collate_fn
from detr_lite.engine import evaluate
from detr_lite.models import build_postprocessor
from detr_lite.utils import AP_KEYS

ROOT = Path(__file__).resolve().parents[1]
CKPTS = ROOT / "data" / "checkpoints"
SHIPPED = {"detr_shapes.pt": "detr-shapes", "deformable_shapes.pt": "deformable-shapes"}


@pytest.fixture(autouse=True)
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(min(2, n))
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_checkpoint_reproduces_its_logged_ap(name):
    model, cfg, ckpt = load_checkpoint(CKPTS / name)
    logged = [m for m in ckpt["metrics"] if "AP" in m][-1]
    assert logged["epoch"] + 1 == cfg.train.epochs  # the weights are the last epoch's
    val = build_dataset(ROOT / "data" / "shapes", "val2017", cfg.data, train=False)
    # the batch size of the logged evaluation: padding to a batch changes the conv borders slightly
    loader = DataLoader(val, batch_size=cfg.train.val_batch_size, collate_fn=collate_fn)
    with torch.no_grad():
        live = evaluate(model, build_postprocessor(cfg.model), loader, val.coco, torch.device("cpu"))
    assert live["num_images"] == 150
    diffs = {k: abs(live[k] - logged[k]) for k in AP_KEYS}
    assert max(diffs.values()) < 0.01, diffs


def test_shipped_detr_is_the_current_preset():
    """``make train`` (= the detr-shapes preset) is the recipe of the shipped detr_shapes.pt."""
    _, cfg, ckpt = load_checkpoint(CKPTS / "detr_shapes.pt")
    preset = get_config("detr-shapes")
    preset.model.num_classes = cfg.model.num_classes  # derived from the data at training time
    assert cfg.to_dict() == preset.to_dict()
    assert "--backbone-weights" in ckpt["meta"]["command"]
