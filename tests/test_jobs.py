"""detr_lite.jobs and the run configs of detr_lite.official: torchrun commands, detached launch,
recipes; and every ``jobs.<name>`` the notebooks use still resolves."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from detr_lite import jobs, monitor, official

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------


def test_train_args_and_resume(tmp_path):
    args = jobs.train_args(
        "detr-r50-coco",
        "/data/coco",
        tmp_path,
        epochs=500,
        batch_size=4,
        amp=True,
        channels_last=True,
        num_workers=8,
        pretrained_backbone=False,
    )
    assert args == [
        "--config",
        "detr-r50-coco",
        "--data",
        "/data/coco",
        "--output",
        str(tmp_path),
        "--epochs",
        "500",
        "--batch-size",
        "4",
        "--amp",
        "--channels-last",
        "--num-workers",
        "8",
        "--no-pretrained-backbone",
    ]
    assert "--resume" not in jobs.with_resume(args, tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    resumed = jobs.with_resume(args, tmp_path)
    assert resumed[-1] == "--resume" and resumed.count("--resume") == 1
    assert jobs.with_resume(resumed, tmp_path).count("--resume") == 1


def test_torchrun_single_node():
    cmd = jobs.torchrun_command(["--config", "x"], 1, python="py")
    assert cmd == [
        "py",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "1",
        "-m",
        "detr_lite.train",
        "--config",
        "x",
    ]
    cmd8 = jobs.torchrun_command(["--config", "x"], 8, python="py")
    assert cmd8[cmd8.index("--nproc-per-node") + 1] == "8"
    assert jobs.shell_line(cmd8).startswith(
        "torchrun --standalone --nnodes 1 --nproc-per-node 8 -m detr_lite.train"
    )


def test_torchrun_multi_node_static_and_elastic():
    static = jobs.torchrun_command(
        ["-a"], 8, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29600, python="py"
    )
    s = " ".join(static)
    assert "--nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29600 --nproc-per-node 8" in s
    assert "--standalone" not in s
    elastic = jobs.torchrun_command(
        ["-a"], 4, nnodes=3, rdzv_endpoint="head:29400", rdzv_id="job7", python="py"
    )
    e = " ".join(elastic)
    assert "--nnodes 3 --rdzv-backend c10d --rdzv-endpoint head:29400 --rdzv-id job7 --nproc-per-node 4" in e
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        jobs.torchrun_command([], 8, nnodes=2)
    with pytest.raises(ValueError, match="node_rank=2"):
        jobs.torchrun_command([], 8, nnodes=2, node_rank=2, master_addr="h")
    with pytest.raises(ValueError, match="nproc_per_node=0"):
        jobs.torchrun_command([], 0)


def test_torchrun_command_is_accepted_by_torchrun(tmp_path):
    """The flags we build parse under the installed torchrun (checked with its own parser)."""
    from torch.distributed.run import get_args_parser

    for cmd in (
        jobs.torchrun_command(["--config", "x"], 2, python="py"),
        jobs.torchrun_command(["--config", "x"], 8, nnodes=2, node_rank=0, master_addr="h", python="py"),
        jobs.torchrun_command(["--config", "x"], 8, nnodes=2, rdzv_endpoint="h:1", python="py"),
    ):
        ns = get_args_parser().parse_args(cmd[3:])
        assert ns.module and ns.training_script == "detr_lite.train"
        assert ns.training_script_args == ["--config", "x"]


# ---------------------------------------------------------------------------------------------
# detached launch: pid file, no double launch
# ---------------------------------------------------------------------------------------------


def test_detached_launch_and_no_double_launch(tmp_path):
    sleeper = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"]
    pid = jobs.launch_detached(sleeper, tmp_path)
    try:
        info = json.loads((tmp_path / jobs.PID_FILE).read_text())
        assert info["pid"] == pid and info["cmd"] == sleeper
        assert jobs.running_pid(tmp_path) == pid
        assert os.getsid(pid) == pid  # its own session: a kernel restart does not take it down
        again = jobs.launch_detached(sleeper, tmp_path)
        assert again == pid  # the running job is reused, not duplicated
        for _ in range(50):
            if "started" in monitor.tail(tmp_path / jobs.STDOUT_FILE):
                break
            time.sleep(0.1)
        assert "started" in monitor.tail(tmp_path / jobs.STDOUT_FILE)
    finally:
        assert jobs.stop(tmp_path)
    assert jobs.wait(tmp_path, timeout=10) is not None
    assert jobs.running_pid(tmp_path) is None
    assert not jobs.stop(tmp_path)


def test_finished_job_and_stale_pid_are_not_running(tmp_path):
    quick = [sys.executable, "-c", "pass"]
    jobs.launch_detached(quick, tmp_path)
    assert jobs.wait(tmp_path, timeout=30) == 0
    assert jobs.running_pid(tmp_path) is None
    # a pid file whose pid now belongs to another process (different start time) is stale
    info = json.loads((tmp_path / jobs.PID_FILE).read_text())
    info.update(pid=os.getpid(), start_time="1")
    (tmp_path / jobs.PID_FILE).write_text(json.dumps(info))
    assert jobs.running_pid(tmp_path) is None
    (tmp_path / jobs.PID_FILE).write_text("garbage")
    assert jobs.running_pid(tmp_path) is None


# ---------------------------------------------------------------------------------------------
# recipes, run configs
# ---------------------------------------------------------------------------------------------


def test_scaled_lrs_follow_the_linear_rule():
    assert official.scaled_lrs("detr_r50", 64) == pytest.approx((1e-4, 1e-5))
    assert official.scaled_lrs("detr_r50", 32) == pytest.approx((5e-5, 5e-6))
    assert official.scaled_lrs("deformable_detr_r50_two_stage", 32) == pytest.approx((2e-4, 2e-5))
    assert official.scaled_lrs("deformable_detr_r50", 8) == pytest.approx((5e-5, 5e-6))
    with pytest.raises(ValueError, match="total_batch"):
        official.scaled_lrs("detr_r50", 0)


def test_run_configs_match_the_official_variants(tmp_path):
    from detr_lite.config import Config

    detr = official.run_config("detr_r50")
    assert (detr.model.arch, detr.model.backbone, detr.model.num_queries) == ("detr", "resnet50", 100)
    assert detr.model.pretrained_backbone and (detr.train.epochs, detr.train.lr_drop) == (500, 400)
    refine = official.run_config("deformable_detr_r50_refine")
    assert refine.model.with_box_refine and not refine.model.two_stage
    two = official.run_config("deformable_detr_r50_two_stage")
    assert two.model.with_box_refine and two.model.two_stage and two.model.num_queries == 300
    smoke = official.run_config("deformable_detr_r50_two_stage", smoke=True)
    assert smoke.model.two_stage and smoke.model.backbone == "resnet18"
    # the toy DETR preset freezes parts of a pretrained backbone; a smoke run has none, so it all trains
    smoke_detr = official.run_config("detr_r50", smoke=True)
    assert smoke_detr.model.train_backbone and not smoke_detr.model.frozen_bn
    assert smoke_detr.train.lr_backbone == smoke_detr.train.lr > 0
    # no moving average in any run of the COCO workflow: the official recipes keep none
    assert smoke_detr.train.ema_decay == 0 and detr.train.ema_decay == 0 and two.train.ema_decay == 0
    assert detr.model.train_backbone and detr.model.frozen_bn  # the COCO run is untouched
    path = official.write_run_config("detr_r50", tmp_path / "c.json", lr=5e-5, epochs=10)
    back = Config.from_dict(json.loads(path.read_text()))
    assert (back.train.lr, back.train.epochs, back.model.backbone) == (5e-5, 10, "resnet50")
    for arch in official.RUN_PRESETS:  # each variant's COCO and smoke presets agree on the variant
        big, toy = official.run_config(arch).model, official.run_config(arch, smoke=True).model
        assert (big.arch, big.with_box_refine, big.two_stage) == (toy.arch, toy.with_box_refine, toy.two_stage), arch
    with pytest.raises(ValueError, match="ARCH"):
        official.run_config("yolo")
    with pytest.raises(ValueError, match="no field 'lrr'"):
        official.write_run_config("detr_r50", tmp_path / "d.json", lrr=1)


def test_published_tables_are_consistent():
    from detr_lite.official import available_archs

    assert set(official.OFFICIAL_CHECKPOINTS) == set(official.PAPER_AP) == set(available_archs())
    assert set(official.RUN_PRESETS) <= set(official.PAPER_AP)
    # the recipes are the COCO presets' (plus the papers' total batch and time)
    assert (official.RECIPES["detr"].lr, official.RECIPES["detr"].epochs, official.RECIPES["detr"].lr_drop) == (
        1e-4, 500, 400)  # fmt: skip
    assert official.RECIPES["deformable_detr"].lr_backbone == 2e-5 and official.RECIPES["detr"].total_batch == 64
    assert official.PAPER_AP["detr_r50"] == 42.0 and official.PAPER_AP["deformable_detr_r50_two_stage"] == 46.9
    assert official.OFFICIAL_CHECKPOINTS["detr_r50"].endswith("detr-r50-e632da11.pth")


def test_launch_keeps_every_name_the_notebooks_use():
    """``detr_lite.launch`` re-exports the names notebooks call as ``launch.<name>``."""
    from detr_lite import launch

    used = {m for nb in sorted((REPO / "notebooks").glob("*.py")) for m in re.findall(r"\blaunch\.(\w+)", nb.read_text())}
    assert used and not [name for name in sorted(used) if not hasattr(launch, name)]
