"""The training / evaluation CLIs end to end on a tiny subset of the bundled data: outputs, exact
resume (after an epoch and mid-epoch), a kill -9, errors that stop a run before it starts."""

from __future__ import annotations

import json
import time

import pytest
import torch

from detr_lite.checkpoint import load_checkpoint, read_checkpoint
from detr_lite.config import Config
from detr_lite.monitor import read_jsonl
from detr_lite.utils import AP_KEYS
from tests.helpers import SHIPPED_DETR, make_tiny_coco, run_cli, tiny_cfg, train_main

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_train_then_evaluate(tmp_path, tiny_data):
    """The real detr-shapes preset (backbone from the shipped checkpoint, layer2-3 trainable), 1 epoch, 2 iterations;
    every output file; evaluate CLI."""
    out = tmp_path / "run"
    r = run_cli(
        "--config", "detr-shapes", "--data", str(tiny_data), "--epochs", "1",
        "--backbone-weights", str(SHIPPED_DETR),
        "--max-iters-per-epoch", "2", "--output", str(out), "--no-progress",
    )  # fmt: skip
    assert "loaded backbone weights from" in r.stdout
    assert r.returncode == 0, r.stderr
    for name in ("checkpoint.pt", "log.jsonl", "metrics.json", "loss.png", "config.json"):
        assert (out / name).is_file(), name
    assert "|    AP |  AP50 |" in r.stdout and f"checkpoint: {out / 'checkpoint.pt'}" in r.stdout
    assert f"plots:      {out / 'loss.png'}" in r.stdout

    records = read_jsonl(out / "log.jsonl")
    iters = [x for x in records if x["type"] == "iter"]
    epochs = [x for x in records if x["type"] == "epoch"]
    assert [x["iter"] for x in iters] == [0, 1]
    for key in ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "class_error", "lr"):
        assert key in iters[0], key
    assert iters[0]["images_per_s"] > 0 and iters[0]["time_per_iter"] > 0
    # total = sum of weighted terms (ce 1, bbox 5, giou 2 per decoder layer)
    terms = sum(v for k, v in iters[0].items() if k.startswith("loss_"))
    assert abs(terms - iters[0]["loss"]) < 1e-6 * max(1.0, abs(terms))
    (ep,) = epochs
    for key in (*AP_KEYS, "train_loss", "val_loss", "epoch_time_s", "images_per_s", "max_memory_mb"):
        assert key in ep, key
    assert ep["val_images"] == 4  # --max-iters-per-epoch 2 x batch 8 covers the 4 val images
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["name"] == "detr-shapes" and cfg["model"]["num_classes"] == 6

    model, cfg2, ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["epoch"] == 1 and cfg2.data.root == str(tiny_data)

    js = tmp_path / "eval.json"
    r = run_cli(
        "--checkpoint",
        str(out / "checkpoint.pt"),
        "--json",
        str(js),
        "--no-progress",
        module="detr_lite.evaluate",
    )
    assert r.returncode == 0, r.stderr
    assert "|    AP |  AP50 |  AP75 |   APs |   APm |   APl |" in r.stdout and "4 images" in r.stdout
    metrics = json.loads(js.read_text())
    assert set(AP_KEYS) <= set(metrics) and metrics["num_images"] == 4 and len(metrics["stats"]) == 12
    # the same checkpoint evaluated by the trainer at the end of its epoch gives the same AP
    for k in AP_KEYS:
        assert metrics[k] == pytest.approx(ep[k], abs=1e-9), k
    assert metrics["val_size"] == 160 and "at short side 160" in r.stdout  # the preset's val size

    # another evaluation size (the card's table of val sizes): only the val transform changes
    from detr_lite import evaluate

    js96 = tmp_path / "eval96.json"
    assert evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), "--val-size", "96", "--val-max-size", "144",
                          "--json", str(js96), "--no-progress"]) == 0  # fmt: skip
    m96 = json.loads(js96.read_text())
    assert (m96["val_size"], m96["val_max_size"], m96["num_images"]) == (96, 144, 4)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, tiny_config, monkeypatch, capsys):
    import detr_lite.models as models
    from detr_lite import train

    real_build = models.build_criterion

    def poisoned_build(cfg):
        crit = real_build(cfg)
        calls = {"n": 0}
        forward = crit.forward

        def forward_nan(outputs, targets):
            losses = forward(outputs, targets)
            calls["n"] += 1
            if calls["n"] == 7:  # epoch 0 = 4 train iterations + 2 val batches; then epoch 1 iteration 0
                losses["loss_giou"] = losses["loss_giou"] * float("nan")
            return losses

        crit.forward = forward_nan
        return crit

    monkeypatch.setattr(models, "build_criterion", poisoned_build)
    out = tmp_path / "run"
    code = train.main(["--config", str(tiny_config), "--output", str(out), "--no-progress", "--epochs", "3"])
    err = capsys.readouterr().err
    assert code == 1
    assert "non-finite loss nan at epoch 1 iteration 0" in err and "loss_giou=nan" in err
    assert f"last good checkpoint: {out / 'checkpoint.pt'} (after epoch 1)" in err
    ck = read_checkpoint(out / "checkpoint.pt")
    assert ck["epoch"] == 1 and all(
        torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point()
    )
    assert read_jsonl(out / "log.jsonl")[-1]["type"] == "error"


def test_bad_data_folder_fails_fast_with_one_line(tmp_path, capsys):
    t0 = time.perf_counter()
    code = train_main(
        "--config", "detr-shapes", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "o")
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0 and "nope" in err and "folder not found" in err
    assert not (tmp_path / "o").exists()
    assert time.perf_counter() - t0 < 5  # nothing heavy was built


def test_num_classes_too_small_is_an_error(tmp_path, tiny_data, capsys):
    code = train_main(
        "--config", "detr-shapes", "--data", str(tiny_data), "--num-classes", "3", "--output", str(tmp_path)
    )
    assert code == 2
    assert (
        "--num-classes 3: the dataset has category id 5; expected num_classes >= 6" in capsys.readouterr().err
    )


@pytest.mark.slow
def test_finetune_to_other_classes_reinitialises_only_the_class_head(
    tmp_path, tiny_config, tiny_data, capsys
):
    base = tmp_path / "base"
    common = ("--config", str(tiny_config), "--epochs", "1", "--max-iters-per-epoch", "1", "--no-progress")
    assert train_main(*common, "--output", str(base)) == 0
    other = make_tiny_coco(tmp_path / "other", id_map={1: 2, 2: 3, 3: 5, 4: 7, 5: 9})
    ft = tmp_path / "ft"
    ck = str(base / "checkpoint.pt")
    code = train_main(
        *common,
        "--data",
        str(other),
        "--finetune",
        ck,
        "--lr",
        "0",
        "--lr-backbone",
        "0",
        "--output",
        str(ft),
    )
    assert code == 0
    assert "class head re-initialised (2 tensors" in capsys.readouterr().out
    a = read_checkpoint(base / "checkpoint.pt")["model"]
    b = read_checkpoint(ft / "checkpoint.pt")["model"]
    assert b["class_embed.weight"].shape[0] == 11 and a["class_embed.weight"].shape[0] == 7
    # lr 0: every other parameter is exactly the fine-tuning start point (BN statistics do move)
    same = [
        k for k in a if not k.startswith("class_embed") and "running_" not in k and "num_batches" not in k
    ]
    assert all(torch.equal(a[k], b[k]) for k in same)


def test_evaluate_cli_errors(tmp_path, capsys):
    from detr_lite import evaluate

    assert evaluate.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "file not found" in capsys.readouterr().err
    official = tmp_path / "official.pth"
    torch.save({"model": {"w": torch.zeros(1)}}, official)
    assert evaluate.main(["--checkpoint", str(official)]) == 2
    assert "--official-arch" in capsys.readouterr().err
    shipped = ["--checkpoint", str(SHIPPED_DETR)]
    assert evaluate.main([*shipped, "--val-size", "0"]) == 2
    assert "--val-size: expected a positive number of pixels, got 0" in capsys.readouterr().err
    assert evaluate.main([*shipped, "--val-size", "250"]) == 2  # above the config's val_max_size 240
    err = capsys.readouterr().err
    assert "--val-max-size 240 is below --val-size 250" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_evaluate_official_model_zoo_file(tmp_path, tiny_data, capsys):
    """An official-format file ({'model': state_dict} with backbone.0.body.* keys) via --official-arch."""
    from detr_lite import evaluate
    from detr_lite.models import build_model
    from detr_lite.official import official_config

    torch.manual_seed(0)
    ours = build_model(official_config("detr_r50")).state_dict()
    zoo = {
        ("backbone.0." + k[len("backbone.") :] if k.startswith("backbone.") else k): v
        for k, v in ours.items()
    }
    path = tmp_path / "detr-r50-random.pth"
    torch.save({"model": zoo}, path)
    js = tmp_path / "eval.json"
    args = ["--checkpoint", str(path), "--official-arch", "detr_r50", "--data", str(tiny_data)]
    code = evaluate.main([*args, "--batch-size", "1", "--max-iters", "1", "--json", str(js), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "|    AP |  AP50 |" in out and "(1 images at short side 800, 100 detections)" in out
    metrics = json.loads(js.read_text())
    assert metrics["official_arch"] == "detr_r50" and metrics["num_detections"] == 100
    assert evaluate.main(["--checkpoint", str(path), "--official-arch", "detr_r50"]) == 2
    assert "--official-arch needs --data" in capsys.readouterr().err


def test_pretrained_backbone_missing_offline_is_one_line_error(tmp_path, monkeypatch, capsys):
    """Asking for ImageNet weights that are neither cached nor downloadable stops the run before any
    model is built, naming the cache path; --no-pretrained-backbone is the explicit way out."""
    import torch.hub

    from detr_lite import train

    root = make_tiny_coco(tmp_path / "coco", n_train=2, n_val=2)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    built = []
    monkeypatch.setattr("detr_lite.models.build_model", lambda cfg: built.append(cfg))
    rc = train.main(
        [
            "--config",
            "detr-shapes",
            "--data",
            str(root),
            "--output",
            str(tmp_path / "out"),
            "--pretrained-backbone",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc != 0 and not built
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in err and "--no-pretrained-backbone" in err


def test_removed_options_fail_with_one_line_and_old_configs_still_load(tmp_path, tiny_data, capsys):
    out = tmp_path / "run"
    assert train_main("--config", "detr-shapes", "--data", str(tiny_data), "--cached-views", "3",
                      "--output", str(out)) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "--cached-views was removed" in err and len(err.splitlines()) == 1 and not out.exists()
    old = tiny_cfg(tiny_data).to_dict()
    old["train"].update(cached_views=0, log_every=10)  # what configs of earlier versions hold
    assert Config.from_dict(old).train == tiny_cfg(tiny_data).train
    old["train"]["cached_views"] = 4
    with pytest.raises(ValueError, match="train.cached_views 4 was removed; train without it"):
        Config.from_dict(old)
