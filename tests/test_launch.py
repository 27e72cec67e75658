"""detr_lite.launch: layout check, download verification, torchrun commands, detached launch, log reader."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import zipfile
from pathlib import Path

import pytest

from detr_lite import launch

# ---------------------------------------------------------------------------------------------
# layout check + instructions
# ---------------------------------------------------------------------------------------------


def _make_layout(root: Path, skip: tuple[str, ...] = ()) -> None:
    for rel in launch.REQUIRED_PATHS:
        if rel in skip:
            continue
        p = root / rel
        if rel.endswith(".json"):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("{}")
        else:
            p.mkdir(parents=True, exist_ok=True)
            (p / "000000000139.jpg").write_bytes(b"x")


def test_complete_layout_reports_nothing_missing(tmp_path):
    _make_layout(tmp_path)
    assert launch.check_coco_layout(tmp_path) == []
    launch.require_coco_layout(tmp_path)  # no error
    assert "complete" in launch.download_instructions(tmp_path)


@pytest.mark.parametrize("gone", list(launch.REQUIRED_PATHS))
def test_missing_path_is_named(tmp_path, gone):
    _make_layout(tmp_path, skip=(gone,))
    assert launch.check_coco_layout(tmp_path) == [gone]
    with pytest.raises(ValueError) as e:
        launch.require_coco_layout(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / gone) in msg
    archive = launch.COCO_ARCHIVES[launch.REQUIRED_PATHS[gone]]
    assert archive.url in msg
    text = launch.download_instructions(tmp_path)
    assert gone in text and archive.url in text and archive.md5 in text
    # only the archive that provides the missing path is suggested
    others = [a for a in launch.COCO_ARCHIVES.values() if a is not archive]
    assert all(a.url not in text for a in others)


def test_empty_image_folder_counts_as_missing(tmp_path):
    _make_layout(tmp_path)
    for f in (tmp_path / "val2017").iterdir():
        f.unlink()
    assert launch.check_coco_layout(tmp_path) == ["val2017"]
    assert launch.check_coco_layout(tmp_path / "nowhere") == list(launch.REQUIRED_PATHS)


def test_eval_only_check_ignores_train(tmp_path):
    _make_layout(tmp_path, skip=("train2017", "annotations/instances_train2017.json"))
    assert launch.check_coco_layout(tmp_path, need_train=False) == []
    assert len(launch.check_coco_layout(tmp_path)) == 2


def test_instructions_use_the_official_archives():
    text = launch.download_instructions("/data/coco", missing=list(launch.REQUIRED_PATHS))
    for url in (
        "http://images.cocodataset.org/zips/train2017.zip",
        "http://images.cocodataset.org/zips/val2017.zip",
        "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
    ):
        assert url in text
    assert "18.0 GB" in text and "778 MB" in text and "241 MB" in text


# ---------------------------------------------------------------------------------------------
# verification + (local, file://) download
# ---------------------------------------------------------------------------------------------


def test_verify_file_checks_size_and_md5(tmp_path):
    f = tmp_path / "a.zip"
    f.write_bytes(b"hello coco")
    md5 = hashlib.md5(b"hello coco").hexdigest()
    launch.verify_file(f, 10, md5)
    with pytest.raises(ValueError, match="size 10 bytes, expected 11"):
        launch.verify_file(f, 11, md5)
    with pytest.raises(ValueError, match=f"expected {'0' * 32}"):
        launch.verify_file(f, 10, "0" * 32)
    with pytest.raises(ValueError, match="file not found"):
        launch.verify_file(tmp_path / "nope.zip", 10)


def _local_archive(tmp_path: Path) -> launch.CocoArchive:
    src = tmp_path / "src" / "val2017.zip"
    src.parent.mkdir()
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("val2017/000000000139.jpg", b"jpeg bytes")
    data = src.read_bytes()
    return launch.CocoArchive(
        "val2017.zip", src.as_uri(), len(data), hashlib.md5(data).hexdigest(), ("val2017",)
    )


def test_download_verifies_and_unzips(tmp_path):
    archive = _local_archive(tmp_path)
    root = tmp_path / "coco"
    launch.download_coco(root, parts=("val",), archives={"val": archive})
    assert (root / "val2017" / "000000000139.jpg").read_bytes() == b"jpeg bytes"
    assert not (root / "val2017.zip").exists()  # zip removed after unzipping
    # a second call finds the part in place and downloads nothing
    launch.download_coco(root, parts=("val",), archives={"val": archive})


def test_download_rejects_a_corrupt_archive(tmp_path):
    good = _local_archive(tmp_path)
    bad = launch.CocoArchive(good.name, good.url, good.num_bytes, "f" * 32, good.provides)
    root = tmp_path / "coco"
    with pytest.raises(ValueError, match="md5"):
        launch.download_coco(root, parts=("val",), archives={"val": bad})
    assert not (root / "val2017").exists()  # nothing unzipped from an unverified file
    with pytest.raises(ValueError, match="unknown part 'test'"):
        launch.download_coco(root, parts=("test",))


def test_download_refuses_without_disk_space(tmp_path):
    good = _local_archive(tmp_path)
    huge = launch.CocoArchive(good.name, good.url, 1 << 60, good.md5, good.provides)
    with pytest.raises(ValueError, match="free"):
        launch.download_coco(tmp_path / "coco", parts=("val",), archives={"val": huge})


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------


def test_train_args_and_resume(tmp_path):
    args = launch.train_args(
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
    assert "--resume" not in launch.with_resume(args, tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    resumed = launch.with_resume(args, tmp_path)
    assert resumed[-1] == "--resume" and resumed.count("--resume") == 1
    assert launch.with_resume(resumed, tmp_path).count("--resume") == 1


def test_torchrun_single_node():
    cmd = launch.torchrun_command(["--config", "x"], 1, python="py")
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
    cmd8 = launch.torchrun_command(["--config", "x"], 8, python="py")
    assert cmd8[cmd8.index("--nproc-per-node") + 1] == "8"
    assert launch.shell_line(cmd8).startswith(
        "torchrun --standalone --nnodes 1 --nproc-per-node 8 -m detr_lite.train"
    )


def test_torchrun_multi_node_static_and_elastic():
    static = launch.torchrun_command(
        ["-a"], 8, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29600, python="py"
    )
    s = " ".join(static)
    assert "--nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29600 --nproc-per-node 8" in s
    assert "--standalone" not in s
    elastic = launch.torchrun_command(
        ["-a"], 4, nnodes=3, rdzv_endpoint="head:29400", rdzv_id="job7", python="py"
    )
    e = " ".join(elastic)
    assert "--nnodes 3 --rdzv-backend c10d --rdzv-endpoint head:29400 --rdzv-id job7 --nproc-per-node 4" in e
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        launch.torchrun_command([], 8, nnodes=2)
    with pytest.raises(ValueError, match="node_rank=2"):
        launch.torchrun_command([], 8, nnodes=2, node_rank=2, master_addr="h")
    with pytest.raises(ValueError, match="nproc_per_node=0"):
        launch.torchrun_command([], 0)


def test_torchrun_command_is_accepted_by_torchrun(tmp_path):
    """The flags we build parse under the installed torchrun (checked with its own parser)."""
    from torch.distributed.run import get_args_parser

    for cmd in (
        launch.torchrun_command(["--config", "x"], 2, python="py"),
        launch.torchrun_command(["--config", "x"], 8, nnodes=2, node_rank=0, master_addr="h", python="py"),
        launch.torchrun_command(["--config", "x"], 8, nnodes=2, rdzv_endpoint="h:1", python="py"),
    ):
        ns = get_args_parser().parse_args(cmd[3:])
        assert ns.module and ns.training_script == "detr_lite.train"
        assert ns.training_script_args == ["--config", "x"]


# ---------------------------------------------------------------------------------------------
# detached launch: pid file, no double launch
# ---------------------------------------------------------------------------------------------


def test_detached_launch_and_no_double_launch(tmp_path):
    sleeper = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"]
    pid = launch.launch_detached(sleeper, tmp_path)
    try:
        info = json.loads((tmp_path / launch.PID_FILE).read_text())
        assert info["pid"] == pid and info["cmd"] == sleeper
        assert launch.running_pid(tmp_path) == pid
        assert os.getsid(pid) == pid  # its own session: a kernel restart does not take it down
        again = launch.launch_detached(sleeper, tmp_path)
        assert again == pid  # the running job is reused, not duplicated
        for _ in range(50):
            if "started" in launch.tail(tmp_path / launch.STDOUT_FILE):
                break
            time.sleep(0.1)
        assert "started" in launch.tail(tmp_path / launch.STDOUT_FILE)
    finally:
        assert launch.stop(tmp_path)
    assert launch.wait(tmp_path, timeout=10) is not None
    assert launch.running_pid(tmp_path) is None
    assert not launch.stop(tmp_path)


def test_finished_job_and_stale_pid_are_not_running(tmp_path):
    quick = [sys.executable, "-c", "pass"]
    launch.launch_detached(quick, tmp_path)
    assert launch.wait(tmp_path, timeout=30) == 0
    assert launch.running_pid(tmp_path) is None
    # a pid file whose pid now belongs to another process (different start time) is stale
    info = json.loads((tmp_path / launch.PID_FILE).read_text())
    info.update(pid=os.getpid(), start_time="1")
    (tmp_path / launch.PID_FILE).write_text(json.dumps(info))
    assert launch.running_pid(tmp_path) is None
    (tmp_path / launch.PID_FILE).write_text("garbage")
    assert launch.running_pid(tmp_path) is None


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
    its, eps = launch.read_log(log)
    assert [r["loss"] for r in its] == [5.0, 4.0]
    assert len(eps) == 1 and eps[0]["AP"] == 0.1
    assert launch.read_log(tmp_path / "missing.jsonl") == ([], [])
    log.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        launch.read_jsonl(log)


def test_plot_progress_draws_four_panels(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    log = tmp_path / "log.jsonl"
    log.write_text(
        json.dumps({"type": "iter", "iter": 0, "loss": 3.0})
        + "\n"
        + json.dumps({"type": "epoch", "epoch": 0, "AP": 0.2, "images_per_s": 3.0})
        + "\n"
    )
    fig = launch.plot_progress(log)
    assert len(fig.axes) == 4
    assert list(fig.axes[0].lines[0].get_ydata()) == [3.0]
    assert list(fig.axes[1].lines[0].get_ydata()) == [0.2]


# ---------------------------------------------------------------------------------------------
# pretrained backbone cache
# ---------------------------------------------------------------------------------------------


def test_pretrained_backbone_cache_path_and_offline_error(tmp_path, monkeypatch):
    import torch.hub

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    path, url = launch.pretrained_backbone_cache("resnet50")
    assert path == tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    assert url.endswith("/resnet50-0676ba61.pth")
    with pytest.raises(ValueError) as e:
        launch.ensure_pretrained_backbone("resnet50", download=False)
    assert str(path) in str(e.value) and "--no-pretrained-backbone" in str(e.value)

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ValueError, match="could not be downloaded"):
        launch.ensure_pretrained_backbone("resnet50")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"cached")
    assert launch.ensure_pretrained_backbone("resnet50", download=False) == path
    with pytest.raises(ValueError, match="resnet152"):
        launch.pretrained_backbone_cache("resnet152")


# ---------------------------------------------------------------------------------------------
# "a folder + a JSON" -> COCO layout
# ---------------------------------------------------------------------------------------------


def _flat_dataset(tmp_path: Path, n: int = 10) -> tuple[Path, Path]:
    images = tmp_path / "my_images"
    (images / "sub").mkdir(parents=True)
    ims, anns = [], []
    for i in range(n):
        name = f"sub/img_{i}.png" if i % 3 == 0 else f"img_{i}.png"
        (images / name).write_bytes(b"png")
        ims.append({"id": 100 + i, "file_name": name, "height": 8, "width": 8})
        anns.append({"id": i, "image_id": 100 + i, "category_id": 7, "bbox": [0, 0, 2, 2], "iscrowd": 0})
    ann = tmp_path / "labels.json"
    ann.write_text(json.dumps({"images": ims, "annotations": anns, "categories": [{"id": 7, "name": "cat"}]}))
    return images, ann


def test_arrange_coco_layout_splits_and_links(tmp_path):
    images, ann = _flat_dataset(tmp_path)
    out = tmp_path / "coco"
    counts = launch.arrange_coco_layout(images, ann, out, val_fraction=0.3, seed=1)
    assert counts == {"train2017": 7, "val2017": 3}
    assert launch.check_coco_layout(out) == []
    tr = json.loads((out / "annotations/instances_train2017.json").read_text())
    va = json.loads((out / "annotations/instances_val2017.json").read_text())
    tr_ids, va_ids = {im["id"] for im in tr["images"]}, {im["id"] for im in va["images"]}
    assert not tr_ids & va_ids and len(tr_ids | va_ids) == 10
    assert {a["image_id"] for a in va["annotations"]} == va_ids  # annotations follow their images
    assert tr["categories"] == va["categories"] == [{"id": 7, "name": "cat"}]
    for split, d in (("train2017", tr), ("val2017", va)):
        for im in d["images"]:
            assert (out / split / im["file_name"]).read_bytes() == b"png"
    # deterministic for a seed, and a second call over the same folder works
    assert launch.arrange_coco_layout(images, ann, out, val_fraction=0.3, seed=1) == counts
    assert json.loads((out / "annotations/instances_val2017.json").read_text()) == va


def test_arrange_coco_layout_names_a_missing_image(tmp_path):
    images, ann = _flat_dataset(tmp_path)
    (images / "img_4.png").unlink()
    with pytest.raises(ValueError, match="img_4.png"):
        launch.arrange_coco_layout(images, ann, tmp_path / "coco")
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="'annotations' list"):
        launch.arrange_coco_layout(images, tmp_path / "bad.json", tmp_path / "coco")


# ---------------------------------------------------------------------------------------------
# recipes, run configs, status line
# ---------------------------------------------------------------------------------------------


def test_scaled_lrs_follow_the_linear_rule():
    assert launch.scaled_lrs("detr_r50", 64) == pytest.approx((1e-4, 1e-5))
    assert launch.scaled_lrs("detr_r50", 32) == pytest.approx((5e-5, 5e-6))
    assert launch.scaled_lrs("deformable_detr_r50_two_stage", 32) == pytest.approx((2e-4, 2e-5))
    assert launch.scaled_lrs("deformable_detr_r50", 8) == pytest.approx((5e-5, 5e-6))
    with pytest.raises(ValueError, match="total_batch"):
        launch.scaled_lrs("detr_r50", 0)


def test_run_configs_match_the_official_variants(tmp_path):
    from detr_lite.config import Config

    detr = launch.run_config("detr_r50")
    assert (detr.model.arch, detr.model.backbone, detr.model.num_queries) == ("detr", "resnet50", 100)
    assert detr.model.pretrained_backbone and (detr.train.epochs, detr.train.lr_drop) == (500, 400)
    refine = launch.run_config("deformable_detr_r50_refine")
    assert refine.model.with_box_refine and not refine.model.two_stage
    two = launch.run_config("deformable_detr_r50_two_stage")
    assert two.model.with_box_refine and two.model.two_stage and two.model.num_queries == 300
    smoke = launch.run_config("deformable_detr_r50_two_stage", smoke=True)
    assert smoke.model.two_stage and smoke.model.backbone == "resnet18"
    # the toy DETR preset freezes parts of a pretrained backbone; a smoke run has none, so it all trains
    smoke_detr = launch.run_config("detr_r50", smoke=True)
    assert smoke_detr.model.train_backbone and not smoke_detr.model.frozen_bn
    assert smoke_detr.train.lr_backbone == smoke_detr.train.lr > 0
    # no moving average in any run of the COCO workflow: the official recipes keep none
    assert smoke_detr.train.ema_decay == 0 and detr.train.ema_decay == 0 and two.train.ema_decay == 0
    assert detr.model.train_backbone and detr.model.frozen_bn  # the COCO run is untouched
    path = launch.write_run_config("detr_r50", tmp_path / "c.json", lr=5e-5, epochs=10)
    back = Config.from_dict(json.loads(path.read_text()))
    assert (back.train.lr, back.train.epochs, back.model.backbone) == (5e-5, 10, "resnet50")
    from detr_lite.config import get_config

    for arch, (coco_preset, _, flags) in launch.RUN_ARCHS.items():  # the presets carry the variant flags
        preset = get_config(coco_preset).model
        assert all(getattr(preset, k) == v for k, v in flags.items()), arch
    with pytest.raises(ValueError, match="ARCH"):
        launch.run_config("yolo")
    with pytest.raises(ValueError, match="no field 'lrr'"):
        launch.write_run_config("detr_r50", tmp_path / "d.json", lrr=1)


def test_published_tables_are_consistent():
    from detr_lite.official import available_archs

    assert set(launch.OFFICIAL_CHECKPOINTS) == set(launch.PAPER_AP) == set(available_archs())
    assert set(launch.RUN_ARCHS) <= set(launch.PAPER_AP)
    assert launch.PAPER_AP["detr_r50"] == 42.0 and launch.PAPER_AP["deformable_detr_r50_two_stage"] == 46.9
    assert launch.OFFICIAL_CHECKPOINTS["detr_r50"].endswith("detr-r50-e632da11.pth")


def test_status_line_reports_progress_and_eta(tmp_path):
    log = tmp_path / "log.jsonl"
    recs = [
        {"type": "iter", "epoch": 1, "iter": 7, "loss": 2.5},
        {"type": "epoch", "epoch": 1, "AP": 0.123, "images_per_s": 100.0, "max_memory_mb": 2048.0},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    line = launch.status_line(tmp_path, epochs=12, train_images=36_000)
    assert line.startswith("not running") and "epoch 1 iter 7 loss 2.500" in line
    assert "AP 12.3 after epoch 2" in line and "100.0 img/s" in line and "peak 2048 MB" in line
    assert "to go" not in line  # no ETA for a job that is not running
    (tmp_path / launch.PID_FILE).write_text(json.dumps({"pid": os.getpid()}))
    line = launch.status_line(tmp_path, epochs=12, train_images=36_000)
    assert f"running (pid {os.getpid()})" in line and "about 1.0 h to go" in line  # 10 epochs x 360 s
