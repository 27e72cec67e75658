"""A moving average of the weights (``train.ema_decay``): the update rule, what the checkpoint holds,
evaluation of the average, an exact resume, and one-line errors for bad values."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from detr_lite.checkpoint import export_checkpoint, load_checkpoint, read_checkpoint
from detr_lite.engine import ModelEma
from detr_lite.monitor import read_jsonl
from detr_lite.utils import AP_KEYS
from tests.helpers import assert_config_error, iter_losses, tiny_cfg, train_main

pytestmark = pytest.mark.usefixtures("one_thread")


def _ema_config(path, root, **train):
    path.write_text(json.dumps(tiny_cfg(root, **train).to_dict()))
    return path


def test_update_is_the_exponential_average_of_trainable_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)  # a frozen parameter
    ema = ModelEma(model, 0.9)
    assert not ema.module.training and all(not p.requires_grad for p in ema.module.parameters())
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    steps = []
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
            model[1].running_mean.add_(1.0)  # a buffer: copied, not averaged
        steps.append({k: v.clone() for k, v in model.state_dict().items()})
        ema.update(model)
    got = ema.module.state_dict()
    w = start["0.weight"]
    for s in steps:
        w = 0.9 * w + 0.1 * s["0.weight"]
    torch.testing.assert_close(got["0.weight"], w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["1.running_mean"], steps[-1]["1.running_mean"], rtol=0, atol=0)
    torch.testing.assert_close(got["2.weight"], steps[-1]["2.weight"], rtol=0, atol=0)  # frozen: unchanged
    assert not torch.equal(got["0.weight"], steps[-1]["0.weight"])  # the average lags the live weights
    for bad in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="train.ema_decay must be in"):
            ModelEma(model, bad)


def test_update_lists_tensors_once_and_follows_loads_and_new_models():
    """The tensors are listed on the first update of a live model: later in-place changes (optimiser
    steps, buffer updates, a loaded average) are seen; a different live model is listed afresh."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = ModelEma(model, 0.5)
    ema.update(model)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
        model[1].running_var.add_(3.0)
    before = ema.module[0].weight.clone()
    ema.update(model)
    torch.testing.assert_close(ema.module[0].weight, 0.5 * before + 0.5 * model[0].weight, rtol=0, atol=1e-7)
    assert torch.equal(ema.module[1].running_var, model[1].running_var)
    saved = {k: v.clone() for k, v in ema.state_dict().items()}
    ema.update(model)
    ema.load_state_dict(saved)  # as a resume does: copies into the listed tensors
    ema.update(model)
    torch.testing.assert_close(
        ema.module[0].weight, 0.5 * saved["0.weight"] + 0.5 * model[0].weight, rtol=0, atol=1e-7
    )
    other = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema.update(other)
    torch.testing.assert_close(
        ema.module[0].weight, 0.25 * saved["0.weight"] + 0.25 * model[0].weight + 0.5 * other[0].weight,
        rtol=0, atol=1e-6,
    )
    assert torch.equal(ema.module[1].running_var, other[1].running_var)


@pytest.mark.slow
def test_training_with_ema_checkpoints_and_evaluates_the_average(tmp_path, tiny_data, capsys):
    config = _ema_config(tmp_path / "ema.json", tiny_data, ema_decay=0.5)
    out = tmp_path / "run"
    assert train_main("--config", str(config), "--no-progress", "--device", "cpu", "--output", str(out)) == 0
    assert "averages over" not in capsys.readouterr().err  # a window of ~2 steps: long enough, no note
    ck = read_checkpoint(out / "checkpoint.pt")
    assert ck["config"]["train"]["ema_decay"] == 0.5
    trainable = [k for k in ck["model"] if k.startswith("transformer.") and ck["model"][k].is_floating_point()]
    assert trainable and any(not torch.equal(ck["model"][k], ck["model_train"][k]) for k in trainable)
    last = [r for r in read_jsonl(out / "log.jsonl") if r["type"] == "epoch"][-1]
    assert last["val_weights"] == "ema 0.5"

    # every tool loads "model", the average: evaluating the file reproduces the run's own numbers
    from detr_lite import evaluate

    js = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), "--json", str(js), "--no-progress"]) == 0
    metrics = json.loads(js.read_text())
    for k in AP_KEYS:
        assert metrics[k] == pytest.approx(last[k], abs=1e-9), k

    # the shippable export keeps the average and drops the live training weights
    small = export_checkpoint(out / "checkpoint.pt", tmp_path / "small.pt", half=False)
    exported = read_checkpoint(small)
    assert "model_train" not in exported and "optimizer" not in exported
    for k, v in ck["model"].items():
        assert torch.equal(exported["model"][k], v), k
    model, _, _ = load_checkpoint(small)
    assert not model.training


@pytest.mark.slow
def test_resume_with_ema_is_exact(tmp_path, tiny_data):
    config = _ema_config(tmp_path / "ema.json", tiny_data, ema_decay=0.7)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--config", str(config), "--no-progress", "--device", "cpu", "--num-workers", "0")
    assert train_main(*common, "--epochs", "2", "--output", str(straight)) == 0
    assert train_main(*common, "--epochs", "1", "--output", str(resumed)) == 0
    assert train_main(*common, "--epochs", "2", "--output", str(resumed), "--resume") == 0
    assert iter_losses(straight) == iter_losses(resumed)
    a, b = read_checkpoint(straight / "checkpoint.pt"), read_checkpoint(resumed / "checkpoint.pt")
    for key in ("model", "model_train"):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)


@pytest.mark.slow
def test_ema_off_by_default_keeps_the_plain_checkpoint(tmp_path, tiny_data):
    config = _ema_config(tmp_path / "plain.json", tiny_data, epochs=1)
    out = tmp_path / "run"
    assert train_main("--config", str(config), "--no-progress", "--device", "cpu", "--output", str(out)) == 0
    ck = read_checkpoint(out / "checkpoint.pt")
    assert ck["config"]["train"]["ema_decay"] == 0.0 and "model_train" not in ck
    assert "val_weights" not in [r for r in read_jsonl(out / "log.jsonl") if r["type"] == "epoch"][-1]


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"ema_decay": 1.0}, "train.ema_decay must be 0 (off) or in (0, 1), got 1.0"),
        ({"ema_decay": -0.1}, "train.ema_decay must be 0 (off) or in (0, 1), got -0.1"),
        ({"ema_decay": "0.99"}, "train.ema_decay must be 0 (off) or in (0, 1), got '0.99'"),
    ],
)
def test_bad_ema_decay_is_a_one_line_error_before_training(tmp_path, tiny_data, capsys, train, message):
    assert_config_error(tmp_path, tiny_data, capsys, message, train=train)


@pytest.mark.slow
def test_ema_decay_flag_sets_the_config(tmp_path, tiny_data, capsys):
    config = _ema_config(tmp_path / "plain.json", tiny_data, epochs=1)
    out = tmp_path / "run"
    assert train_main("--config", str(config), "--no-progress", "--device", "cpu", "--ema-decay", "0.9",
                      "--max-iters-per-epoch", "1", "--output", str(out)) == 0  # fmt: skip
    assert json.loads((out / "config.json").read_text())["train"]["ema_decay"] == 0.9
    # a run far shorter than the average's window is told so (one step against ~10)
    assert "train.ema_decay 0.9 averages over ~10 steps, but this run has 1:" in capsys.readouterr().err
    assert train_main("--config", str(config), "--no-progress", "--ema-decay", "2",
                      "--output", str(tmp_path / "bad")) == 2  # fmt: skip
    assert "train.ema_decay must be 0 (off) or in (0, 1), got 2.0" in capsys.readouterr().err
