"""Helpers shared by the test modules: tiny COCO folders, tiny configs, running the CLIs.

Fixtures (``tiny_data``, ``tiny_config``, ``one_thread``) are in ``conftest.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from detr_lite.config import Config, DataConfig, ModelConfig, TrainConfig
from detr_lite.monitor import read_jsonl

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


def iter_losses(out: Path) -> list[tuple[int, int, float]]:
    """``(epoch, iter, loss)`` of every iteration record in ``out/log.jsonl``."""
    return [(r["epoch"], r["iter"], r["loss"]) for r in read_jsonl(out / "log.jsonl") if r["type"] == "iter"]
