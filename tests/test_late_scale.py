"""Progressive resizing (``data.late_scale`` / ``data.late_scale_after``): sizes, the switch, resume, errors."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from detr_lite.config import DataConfig, get_config
from detr_lite.data.coco import build_dataset
from detr_lite.data.transforms import build_transforms, scaled_sizes
from detr_lite.monitor import read_jsonl
from tests.helpers import SHAPES, assert_config_error, iter_losses, tiny_cfg, train_main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_scaled_sizes_multiply_every_training_size():
    cfg = get_config("detr-shapes").data
    assert scaled_sizes(cfg, 1.0) == {
        "train_scales": list(cfg.train_scales),
        "train_max_size": cfg.train_max_size,
        "crop_resize_scales": list(cfg.crop_resize_scales),
        "crop_size": tuple(cfg.crop_size),
    }
    assert scaled_sizes(cfg, 1.25) == {
        "train_scales": [120, 130, 140, 150, 160],
        "train_max_size": 240,
        "crop_resize_scales": [120, 140, 160],
        "crop_size": (100, 160),
    }
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="data.late_scale: expected a positive factor"):
            scaled_sizes(cfg, bad)


def test_scale_at_switches_after_late_scale_after_epochs():
    d = DataConfig(late_scale=1.5, late_scale_after=3)
    assert [d.scale_at(e) for e in range(5)] == [1.0, 1.0, 1.0, 1.5, 1.5]
    assert [DataConfig().scale_at(e) for e in range(3)] == [1.0, 1.0, 1.0]  # off by default


def test_preset_trains_small_then_at_the_evaluation_size():
    """detr-shapes: the last training phase's largest short side is the evaluation size (the official rule)."""
    d = get_config("detr-shapes").data
    late = scaled_sizes(d, d.late_scale)
    assert 0 < d.late_scale_after < get_config("detr-shapes").train.epochs
    assert max(late["train_scales"]) == d.val_size and late["train_max_size"] == d.val_max_size


def test_scaled_transforms_produce_scaled_images():
    """Every augmented training image's short side is one of the scaled scales (or its long side is capped)."""
    cfg = dataclasses.replace(get_config("detr-shapes").data, root=str(SHAPES))
    ds = build_dataset(SHAPES, "train2017", cfg, train=True)
    for scale in (1.0, 1.25):
        ds.transforms = build_transforms(cfg, train=True, scale=scale)
        sizes = scaled_sizes(cfg, scale)
        random.seed(0)
        torch.manual_seed(0)
        seen = set()
        for i in range(24):
            image, _ = ds[i]
            h, w = image.shape[-2:]
            # torchvision floors the scaled sides, so a side may be one pixel under its target
            on_scale = any(0 <= t - min(h, w) <= 1 for t in sizes["train_scales"])
            assert on_scale or 0 <= sizes["train_max_size"] - max(h, w) <= 1, (scale, h, w)
            seen.add(min(h, w))
        assert len(seen) > 2  # multi-scale
        assert max(seen) <= max(sizes["train_scales"]) and max(seen) > 128 * (scale > 1)
    # the validation resize ignores the scale
    val = build_transforms(cfg, train=False, scale=1.25)
    assert repr(val) == repr(build_transforms(cfg, train=False))


def _late_config(path, root, **data):
    cfg = tiny_cfg(root).to_dict()
    cfg["data"].update(data)
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.slow
def test_late_scale_switch_is_logged_and_resume_across_it_is_exact(tmp_path, tiny_data, capsys):
    config = _late_config(tmp_path / "late.json", tiny_data, late_scale=1.5, late_scale_after=1)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--config", str(config), "--no-progress", "--device", "cpu", "--num-workers", "0")
    assert train_main(*common, "--epochs", "3", "--output", str(straight)) == 0
    out = capsys.readouterr().out
    assert "epoch 2: training sizes x1.5 from here on (data.late_scale): short side [84, 96, 108]" in out
    epochs = [r for r in read_jsonl(straight / "log.jsonl") if r["type"] == "epoch"]
    assert [r["train_scale"] for r in epochs] == [1.0, 1.5, 1.5]
    # stop after the small-image epoch, resume across the switch: the same losses as the straight run
    assert train_main(*common, "--epochs", "1", "--output", str(resumed)) == 0
    assert train_main(*common, "--epochs", "3", "--output", str(resumed), "--resume") == 0
    assert "training sizes x1.5" in capsys.readouterr().out
    assert iter_losses(straight) == iter_losses(resumed)
    # the larger images really were used: the same data at x1 gives other losses from epoch 2 on
    small = _late_config(tmp_path / "small.json", tiny_data)  # late_scale 1.0
    assert train_main("--config", str(small), "--no-progress", "--device", "cpu", "--epochs", "2",
                      "--output", str(tmp_path / "x1")) == 0  # fmt: skip
    a, b = iter_losses(straight), iter_losses(tmp_path / "x1")
    assert [x for x in a if x[0] == 0] == [x for x in b if x[0] == 0]  # epoch 1 identical
    assert [x for x in a if x[0] == 1] != [x for x in b if x[0] == 1]  # epoch 2 differs


@pytest.mark.parametrize(
    ("data", "train", "message"),
    [
        ({"late_scale": -1.0}, {}, "data.late_scale must be a positive number, got -1.0"),
        ({"late_scale": True}, {}, "data.late_scale must be a positive number, got True"),
        ({"late_scale_after": -2}, {}, "data.late_scale_after must be an integer >= 0, got -2"),
    ],
)
def test_bad_late_scale_is_a_one_line_error_before_training(tmp_path, tiny_data, capsys, data, train, message):
    assert_config_error(tmp_path, tiny_data, capsys, message, data=data, train=train)
