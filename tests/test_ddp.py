"""DDP smoke test: two CPU processes (gloo) launched by torchrun train and evaluate together."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from detr_lite.checkpoint import load_checkpoint
from detr_lite.monitor import read_jsonl
from tests.helpers import REPO, make_tiny_coco, write_tiny_config


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    root = make_tiny_coco(tmp_path / "data", n_train=8, n_val=3)  # 3 val images: one rank gets a padded copy
    cfg = write_tiny_config(tmp_path / "tiny.json", root)
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
        "-m", "detr_lite.train", "--config", str(cfg), "--device", "cpu", "--epochs", "1",
        "--max-iters-per-epoch", "2", "--output", str(out), "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "batch 2 x 2 process(es)" in r.stdout
    assert r.stdout.count("COCO bbox AP on") == 1  # only rank 0 prints the summary...

    records = read_jsonl(out / "log.jsonl")  # ...and only rank 0 writes files
    iters = [x for x in records if x["type"] == "iter"]
    (epoch,) = [x for x in records if x["type"] == "epoch"]
    assert [x["iter"] for x in iters] == [0, 1]
    # each step saw 2 images per process: throughput counts both processes
    assert all(x["images_per_s"] * x["time_per_iter"] == pytest.approx(4.0) for x in iters)
    # the val detections of both ranks were gathered (the sampler's padded duplicate counted once)
    assert epoch["val_images"] == 3
    model, _, ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["epoch"] == 1 and ck["meta"]["world_size"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
