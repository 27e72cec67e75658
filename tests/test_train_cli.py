"""The training / evaluation CLIs end to end on a tiny subset of the bundled data.

Helpers here (``make_tiny_coco``, ``tiny_model_cfg``, ``tiny_cfg``, ``write_tiny_config``,
``assert_config_error``, the ``one_thread`` fixture; ``tiny_data`` is in conftest.py) are reused by test_ddp.py, test_engine.py, test_checkpoint.py and
test_coco_data.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detr_lite.checkpoint import load_checkpoint, read_checkpoint
from detr_lite.config import Config, DataConfig, ModelConfig, TrainConfig
from detr_lite.utils import AP_KEYS, read_jsonl

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "data" / "shapes"
SHIPPED_DETR = REPO / "data" / "checkpoints" / "detr_shapes.pt"


def make_tiny_coco(dst: Path, n_train: int = 8, n_val: int = 4, id_map: dict[int, int] | None = None) -> Path:
    """Copy the first images (with objects) of each bundled split + their annotations into ``dst``."""
    for split, n in (("train2017", n_train), ("val2017", n_val)):
        data = json.loads((SHAPES / "annotations" / f"instances_{split}.json").read_text())
        with_objects = {a["image_id"] for a in data["annotations"]}
        images = [im for im in data["images"] if im["id"] in with_objects][:n]
        keep = {im["id"] for im in images}
        anns = [a for a in data["annotations"] if a["image_id"] in keep]
        cats = data["categories"]
        if id_map:
            cats = [{**c, "id": id_map[c["id"]]} for c in cats]
            anns = [{**a, "category_id": id_map[a["category_id"]]} for a in anns]
        (dst / split).mkdir(parents=True, exist_ok=True)
        for im in images:
            shutil.copy(SHAPES / split / im["file_name"], dst / split / im["file_name"])
        (dst / "annotations").mkdir(parents=True, exist_ok=True)
        out = {**data, "images": images, "annotations": anns, "categories": cats}
        (dst / "annotations" / f"instances_{split}.json").write_text(json.dumps(out))
    return dst


def tiny_model_cfg(**overrides) -> ModelConfig:
    """A DETR small enough to train a few iterations in about a second on a CPU."""
    m = dict(
        num_classes=6,
        backbone="resnet18",
        frozen_bn=False,
        hidden_dim=32,
        nheads=2,
        enc_layers=1,
        dec_layers=2,
        dim_feedforward=64,
        dropout=0.1,  # dropout on: resume must restore the RNG too
        num_queries=6,
    )
    m.update(overrides)
    return ModelConfig(**m)


def tiny_cfg(root: Path, **train) -> Config:
    """:func:`tiny_model_cfg` + tiny images from ``root``."""
    model = tiny_model_cfg()
    data = DataConfig(
        root=str(root),
        train_scales=(56, 64, 72),
        train_max_size=96,
        crop_resize_scales=(64, 72),
        crop_size=(48, 64),
        val_size=64,
        val_max_size=96,
        num_workers=0,
    )
    t = dict(lr=1e-4, lr_backbone=1e-4, epochs=2, lr_drop=100, batch_size=2, seed=7)
    t.update(train)
    return Config(name="tiny", model=model, data=data, train=TrainConfig(**t))


def write_tiny_config(path: Path, root: Path, **train) -> Path:
    path.write_text(json.dumps(tiny_cfg(root, **train).to_dict()))
    return path


def run_cli(*args: str, module: str = "detr_lite.train", timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # a busy shared CPU: 2 threads/process thrash
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_config_error(tmp_path: Path, root: Path, capsys, message: str, **sections: dict) -> None:
    """A tiny config with ``sections`` (e.g. ``train={...}``) merged in fails with one stderr line holding
    ``message`` (exit code 2), before any checkpoint is written."""
    cfg = tiny_cfg(root).to_dict()
    for name, values in sections.items():
        cfg[name].update(values)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    assert train_main("--config", str(path), "--no-progress", "--output", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (out / "checkpoint.pt").exists()


def train_main(*args: str) -> int:
    """``python -m detr_lite.train ARGS`` in this process (saves the interpreter start-up)."""
    from detr_lite import train

    return train.main(list(args))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy shared CPU two threads per process thrash."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory, tiny_data) -> Path:
    return write_tiny_config(tmp_path_factory.mktemp("cfg") / "tiny.json", tiny_data)


# --------------------------------------------------------------------------------------------
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


def _iter_losses(out: Path) -> list[tuple[int, int, float]]:
    return [(r["epoch"], r["iter"], r["loss"]) for r in read_jsonl(out / "log.jsonl") if r["type"] == "iter"]


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path, tiny_config, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--config", str(tiny_config), "--no-progress", "--device", "cpu", "--num-workers", "0")
    assert train_main(*common, "--epochs", "2", "--output", str(straight)) == 0
    assert train_main(*common, "--epochs", "1", "--output", str(resumed)) == 0
    torch.manual_seed(12345)  # whatever state the process is in, resume restores its own
    assert train_main(*common, "--epochs", "2", "--output", str(resumed), "--resume") == 0
    assert "resuming" in capsys.readouterr().out

    a, b = _iter_losses(straight), _iter_losses(resumed)
    assert len(a) == 8 and [x[:2] for x in a] == [x[:2] for x in b]  # 2 epochs x 4 iterations, no duplicates
    assert a == b  # bit-identical losses, including the resumed epoch
    ea = [r for r in read_jsonl(straight / "log.jsonl") if r["type"] == "epoch"]
    eb = [r for r in read_jsonl(resumed / "log.jsonl") if r["type"] == "epoch"]
    assert [r["train_loss"] for r in ea] == [r["train_loss"] for r in eb]
    assert [r["AP"] for r in ea] == [r["AP"] for r in eb]
    sa = read_checkpoint(straight / "checkpoint.pt")["model"]
    sb = read_checkpoint(resumed / "checkpoint.pt")["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_with_a_new_lr_drop_equals_a_fresh_run_with_it(tmp_path, tiny_config, capsys):
    """``--resume --lr-drop N`` (shorten or lengthen a schedule before its drop) == a fresh run with N."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--config", str(tiny_config), "--no-progress", "--device", "cpu", "--num-workers", "0")
    assert train_main(*common, "--epochs", "3", "--lr-drop", "2", "--output", str(straight)) == 0
    assert train_main(*common, "--epochs", "1", "--output", str(resumed)) == 0  # lr_drop 100 in the config
    # the drop must still be ahead of the finished epochs: a one-line error, nothing written
    assert train_main(*common, "--epochs", "3", "--lr-drop", "1", "--output", str(resumed), "--resume") == 2
    err = capsys.readouterr().err
    assert "--lr-drop 1 with --resume" in err and "finished 1 epochs" in err and len(err.strip().splitlines()) == 1
    assert train_main(*common, "--epochs", "3", "--lr-drop", "2", "--output", str(resumed), "--resume") == 0
    assert _iter_losses(straight) == _iter_losses(resumed)
    ea = [r for r in read_jsonl(straight / "log.jsonl") if r["type"] == "epoch"]
    eb = [r for r in read_jsonl(resumed / "log.jsonl") if r["type"] == "epoch"]
    assert [r["lr"] for r in ea] == [r["lr"] for r in eb] == pytest.approx([1e-4, 1e-4, 1e-5])
    ckpt = read_checkpoint(resumed / "checkpoint.pt")
    assert ckpt["config"]["train"]["lr_drop"] == 2 and ckpt["lr_scheduler"]["step_size"] == 2


def test_kill_9_mid_epoch_then_resume(tmp_path, tiny_config):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "detr_lite.train", "--config", str(tiny_config), "--epochs", "30",
         "--output", str(out), "--no-progress", "--device", "cpu"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 180
        log = out / "log.jsonl"
        while time.time() < deadline:  # wait until epoch 1 (after checkpoint 1) is under way
            if log.exists() and any(r["type"] == "iter" and r["epoch"] >= 1 for r in read_jsonl(log)):
                break
            assert proc.poll() is None, "trainer exited early"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _, _, ck = load_checkpoint(out / "checkpoint.pt")  # intact, whatever moment the kill hit
    done = ck["epoch"]
    assert done >= 1
    r = run_cli(
        "--config",
        str(tiny_config),
        "--epochs",
        str(done + 1),
        "--output",
        str(out),
        "--resume",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] == done + 1
    # the half-finished epoch's records were dropped on resume: every (epoch, iter) once
    keys = [(e, i) for e, i, _ in _iter_losses(out)]
    assert len(keys) == len(set(keys)) == 4 * (done + 1)


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
