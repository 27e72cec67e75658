"""detr_lite.monitor: the log reader, the progress plot, the status line."""

from __future__ import annotations

import json
import os

import pytest

from detr_lite import jobs, monitor

# ---------------------------------------------------------------------------------------------
# log reader
# ---------------------------------------------------------------------------------------------


def test_read_log_splits_records_and_skips_partial_line(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [
        {"type": "iter", "epoch": 0, "iter": 0, "loss": 5.0},
        {"type": "iter", "epoch": 0, "iter": 1, "loss": 4.0},
        {"type": "epoch", "epoch": 0, "AP": 0.1, "images_per_s": 12.5, "max_mem_mb": 900.0},
    ]
    log.write_text("\n".join(json.dumps(r) for r in lines) + '\n{"type": "iter", "epo')
    its, eps = monitor.read_log(log)
    assert [r["loss"] for r in its] == [5.0, 4.0]
    assert len(eps) == 1 and eps[0]["AP"] == 0.1
    assert monitor.read_log(tmp_path / "missing.jsonl") == ([], [])
    log.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        monitor.read_jsonl(log)


def test_plot_progress_draws_four_panels(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    log = tmp_path / "log.jsonl"
    log.write_text(
        json.dumps({"type": "iter", "epoch": 0, "iter": 0, "loss": 3.0})
        + "\n"
        + json.dumps({"type": "epoch", "epoch": 0, "AP": 0.2, "images_per_s": 3.0})
        + "\n"
    )
    fig = monitor.plot_progress(log)
    assert len(fig.axes) == 4
    assert list(fig.axes[0].lines[0].get_ydata()) == [3.0]
    assert list(fig.axes[2].lines[0].get_ydata()) == [0.2]  # AP
    assert not fig.axes[1].lines  # no val loss logged yet: an empty, labelled panel


def test_progress_plot_before_and_after_the_first_evaluation(tmp_path, recwarn):
    """``loss.png`` is written (atomically, no temp file left) from the first epoch on, also while no
    epoch has been evaluated yet (``eval_every`` > 1), without a matplotlib legend warning."""
    log, png = monitor.JsonlLog(tmp_path / "log.jsonl"), tmp_path / "loss.png"
    log.write({"type": "iter", "epoch": 0, "iter": 0, "loss": 3.0})
    log.write({"type": "epoch", "epoch": 0, "train_loss": 3.0, "images_per_s": 5.0})
    monitor.save_progress_plot(log.path, png)
    assert png.stat().st_size > 1000
    log.write({"type": "iter", "epoch": 1, "iter": 0, "loss": 2.5})
    log.write({"type": "epoch", "epoch": 1, "train_loss": 2.5, "val_loss": 2.7, "AP": 0.1, "AP50": 0.2})
    monitor.save_progress_plot(log.path, png)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl", "loss.png"]
    assert not [w for w in recwarn if "legend" in str(w.message)]


def test_resume_truncation_drops_what_is_logged_again(tmp_path):
    """A run resumed at iteration 2 of epoch 1 logs those iterations and epoch 1's summary again;
    a line cut by a kill goes too."""
    log = monitor.JsonlLog(tmp_path / "log.jsonl")
    for e in range(2):
        for i in range(4):
            log.write({"type": "iter", "epoch": e, "iter": i, "loss": 1.0})
        log.write({"type": "epoch", "epoch": e, "train_loss": 1.0})
    log.path.write_text(log.path.read_text() + '{"type": "iter", "ep')
    log.truncate_from(1, 2)
    kept = [(r["epoch"], r.get("iter")) for r in monitor.read_jsonl(log.path)]
    assert kept == [(0, 0), (0, 1), (0, 2), (0, 3), (0, None), (1, 0), (1, 1)]
    log.truncate_from(1)
    assert [(r["epoch"], r.get("iter")) for r in monitor.read_jsonl(log.path)][-1] == (0, None)


# ---------------------------------------------------------------------------------------------
# status line
# ---------------------------------------------------------------------------------------------
def test_status_line_reports_progress_and_eta(tmp_path):
    log = tmp_path / "log.jsonl"
    recs = [
        {"type": "iter", "epoch": 1, "iter": 7, "loss": 2.5},
        {"type": "epoch", "epoch": 1, "AP": 0.123, "images_per_s": 100.0, "max_memory_mb": 2048.0},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    line = monitor.status_line(tmp_path, epochs=12, train_images=36_000)
    assert line.startswith("not running") and "epoch 1 iter 7 loss 2.500" in line
    assert "AP 12.3 after epoch 2" in line and "100.0 img/s" in line and "peak 2048 MB" in line
    assert "to go" not in line  # no ETA for a job that is not running
    (tmp_path / jobs.PID_FILE).write_text(json.dumps({"pid": os.getpid()}))
    line = monitor.status_line(tmp_path, epochs=12, train_images=36_000)
    assert f"running (pid {os.getpid()})" in line and "about 1.0 h to go" in line  # 10 epochs x 360 s
