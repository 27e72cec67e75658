"""Resuming a run: after an epoch, mid-epoch (``--checkpoint-every``), after a kill -9, under a
torchrun group restart (``--max-restarts``); from checkpoints of earlier versions; what a resume
may change. "Exact" means the same logged losses and the same final weights as an uninterrupted
run (CPU, ``--num-workers 0``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import detr_lite.train as train
from detr_lite.checkpoint import load_checkpoint, read_checkpoint
from detr_lite.monitor import read_jsonl
from tests.helpers import REPO, iter_losses, make_tiny_coco, run_cli, train_main, write_tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
COMMON = ("--no-progress", "--device", "cpu", "--num-workers", "0")


def _same_weights(a: Path, b: Path) -> None:
    ca, cb = read_checkpoint(a / "checkpoint.pt"), read_checkpoint(b / "checkpoint.pt")
    for key in ("model", "model_train"):
        assert (key in ca) == (key in cb), key
        if key in ca:
            assert ca[key].keys() == cb[key].keys() and all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key]), key
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert all(torch.equal(sa[i][n], sb[i][n]) for i in sa for n in sa[i])


def _epochs(out: Path) -> list[dict]:
    drop = ("train_time_s", "images_per_s", "epoch_time_s", "max_memory_mb")
    return [{k: v for k, v in r.items() if k not in drop} for r in read_jsonl(out / "log.jsonl") if r["type"] == "epoch"]


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run_exactly(tmp_path, tiny_config, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--config", str(tiny_config), "--no-progress", "--device", "cpu", "--num-workers", "0")
    assert train_main(*common, "--epochs", "2", "--output", str(straight)) == 0
    assert train_main(*common, "--epochs", "1", "--output", str(resumed)) == 0
    torch.manual_seed(12345)  # whatever state the process is in, resume restores its own
    assert train_main(*common, "--epochs", "2", "--output", str(resumed), "--resume") == 0
    assert "resuming" in capsys.readouterr().out

    a, b = iter_losses(straight), iter_losses(resumed)
    assert len(a) == 8 and [x[:2] for x in a] == [x[:2] for x in b]  # 2 epochs x 4 iterations, no duplicates
    assert a == b  # bit-identical losses, including the resumed epoch
    ea = [r for r in read_jsonl(straight / "log.jsonl") if r["type"] == "epoch"]
    eb = [r for r in read_jsonl(resumed / "log.jsonl") if r["type"] == "epoch"]
    assert [r["train_loss"] for r in ea] == [r["train_loss"] for r in eb]
    assert [r["AP"] for r in ea] == [r["AP"] for r in eb]
    sa = read_checkpoint(straight / "checkpoint.pt")["model"]
    sb = read_checkpoint(resumed / "checkpoint.pt")["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
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
    assert iter_losses(straight) == iter_losses(resumed)
    ea = [r for r in read_jsonl(straight / "log.jsonl") if r["type"] == "epoch"]
    eb = [r for r in read_jsonl(resumed / "log.jsonl") if r["type"] == "epoch"]
    assert [r["lr"] for r in ea] == [r["lr"] for r in eb] == pytest.approx([1e-4, 1e-4, 1e-5])
    ckpt = read_checkpoint(resumed / "checkpoint.pt")
    assert ckpt["config"]["train"]["lr_drop"] == 2 and ckpt["lr_scheduler"]["step_size"] == 2


@pytest.mark.slow
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
    keys = [(e, i) for e, i, _ in iter_losses(out)]
    assert len(keys) == len(set(keys)) == 4 * (done + 1)


@pytest.mark.slow
def test_resume_mid_epoch_is_exact(tmp_path, tiny_data, monkeypatch, capsys):
    """``--checkpoint-every 3`` (4 iterations per epoch, EMA on): stopped right after the mid-epoch
    checkpoint of epoch 2, the resumed run logs the same losses and ends with the same weights,
    moving average and optimiser state as an uninterrupted one."""
    cfg = write_tiny_config(tmp_path / "tiny.json", tiny_data, ema_decay=0.9)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    args = ("--config", str(cfg), "--epochs", "2", "--checkpoint-every", "3", *COMMON)
    assert train_main(*args, "--output", str(straight)) == 0

    saves = []
    real_save = train.save_training_checkpoint

    def save_then_stop(*a, **k):  # the 3rd save is epoch 2's mid-epoch one: stop right after it
        real_save(*a, **k)
        saves.append(a[1].iteration)
        if len(saves) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_training_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_main(*args, "--output", str(stopped))
    monkeypatch.undo()
    assert saves == [3, 0, 3]  # epoch 1 at iteration 3, end of epoch 1, epoch 2 at iteration 3
    ck = read_checkpoint(stopped / "checkpoint.pt")
    assert (ck["epoch"], ck["iteration"], ck["epoch_totals"]["iters"]) == (1, 3, 3)
    capsys.readouterr()
    assert train_main(*args, "--output", str(stopped), "--resume") == 0
    assert f"resuming {stopped / 'checkpoint.pt'} at epoch 1, iteration 3" in capsys.readouterr().out
    assert iter_losses(straight) == iter_losses(stopped) and len(iter_losses(stopped)) == 8
    assert _epochs(straight) == _epochs(stopped)  # the split epoch's means cover all of its iterations
    _same_weights(straight, stopped)


@pytest.mark.slow
def test_resume_from_a_checkpoint_of_an_earlier_version(tmp_path, tiny_config):
    """A checkpoint as earlier versions wrote it (no ``iteration`` / ``epoch_totals``, a sampler
    generator state, retired config keys) resumes exactly."""
    straight, old = tmp_path / "straight", tmp_path / "old"
    assert train_main("--config", str(tiny_config), "--epochs", "2", "--output", str(straight), *COMMON) == 0
    assert train_main("--config", str(tiny_config), "--epochs", "1", "--output", str(old), *COMMON) == 0
    ck = torch.load(old / "checkpoint.pt", weights_only=True)
    for key in ("iteration", "epoch_totals"):
        del ck[key]
    ck["sampler_generator"] = torch.Generator().get_state()
    ck["config"]["train"].update(cached_views=0, log_every=10)
    del ck["config"]["train"]["checkpoint_every"]
    torch.save(ck, old / "checkpoint.pt")
    assert train_main("--config", str(tiny_config), "--epochs", "2", "--output", str(old), "--resume", *COMMON) == 0
    assert iter_losses(straight) == iter_losses(old)
    _same_weights(straight, old)


@pytest.mark.slow
def test_what_a_resume_may_change(tmp_path, tiny_config, capsys):
    """A resumed run keeps how it learns: the options it was started with are fine again (a relaunch
    passes them all), another value of one outside the resumable list is a one-line error."""
    out = tmp_path / "run"
    started = ("--config", str(tiny_config), "--output", str(out), "--lr", "2e-4", *COMMON)
    assert train_main(*started, "--epochs", "1") == 0
    capsys.readouterr()
    assert train_main(*started, "--epochs", "1", "--lr", "5e-4", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert "--lr 0.0005 with --resume: the run was trained with train.lr 0.0002" in err and len(err.splitlines()) == 1
    assert "--epochs, --lr-drop, --eval-every, --checkpoint-every, --num-workers, --data" in err
    assert train_main(*started, "--epochs", "2", "--eval-every", "2", "--checkpoint-every", "2", "--resume") == 0
    assert read_checkpoint(out / "checkpoint.pt")["config"]["train"]["checkpoint_every"] == 2
    assert train_main(*started, "--epochs", "3", "--checkpoint-every", "-1", "--resume") == 2
    assert "train.checkpoint_every must be an integer >= 0, got -1" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through /proc")
def test_torchrun_restart_after_a_killed_worker_resumes_mid_epoch_exactly(tmp_path):
    """``torchrun --nproc-per-node 2 --max-restarts 1`` (gloo): SIGKILL one worker mid-epoch; torchrun
    restarts the group, which resumes from the last (mid-epoch) checkpoint by itself and ends with the
    weights, optimiser state and logged losses of an uninterrupted run."""
    root = make_tiny_coco(tmp_path / "data", n_train=16, n_val=2)
    cfg = write_tiny_config(tmp_path / "tiny.json", root, batch_size=1, checkpoint_every=2, epochs=1)  # 8 iterations
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(out: Path, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
               *extra, "-m", "detr_lite.train", "--config", str(cfg), "--output", str(out), *COMMON]  # fmt: skip
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    straight, faulted = tmp_path / "straight", tmp_path / "faulted"
    job = torchrun(faulted, "--max-restarts", "1")
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # until the epoch is past its first mid-epoch checkpoint (iteration 2)
            if any(r.get("iter", 0) >= 3 for r in read_jsonl(faulted / "log.jsonl")):
                break
            assert job.poll() is None, job.stdout.read()
            time.sleep(0.05)
        workers = _children(job.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        out, _ = job.communicate(timeout=300)
    finally:
        job.kill()
    assert job.returncode == 0, out[-3000:]
    assert "resuming" in out and ", iteration " in out, out[-3000:]  # the restarted group resumed mid-epoch
    ref = torchrun(straight)
    ref_out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_out[-3000:]
    assert iter_losses(straight) == iter_losses(faulted) and len(iter_losses(faulted)) == 8
    assert _epochs(straight) == _epochs(faulted)
    _same_weights(straight, faulted)
