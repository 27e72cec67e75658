"""python -m detr_lite.predict: annotated PNGs, one COCO-results JSON, unreadable files reported, not fatal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from detr_lite.predict import image_id_for, main

VAL = Path(__file__).resolve().parent.parent / "data" / "shapes" / "val2017"
ANN = VAL.parent / "annotations" / "instances_val2017.json"


@pytest.fixture(autouse=True)
def two_threads():
    torch.set_num_threads(2)


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    for name in ("000001.png", "000002.png"):
        shutil.copy(VAL / name, d / name)
    grey16 = (np.asarray(PIL.Image.open(VAL / "000003.png").convert("L")).astype(np.uint16) * 257)
    PIL.Image.fromarray(grey16).save(d / "000003.png")  # a 16-bit grey PNG
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    (d / "notes.txt").write_text("not an image, not listed")
    return d


def test_folder_with_a_broken_file(folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main([str(folder), "--output", str(out)])
    captured = capsys.readouterr()
    assert rc == 1
    errors = [line for line in captured.err.splitlines() if "error" in line]
    assert len(errors) == 1 and "broken.png" in errors[0] and "cannot read image" in errors[0]
    assert "1 of 4 inputs could not be read" in captured.err
    assert sorted(p.name for p in out.glob("*.png")) == ["000001.png", "000002.png", "000003.png"]
    dets = json.loads((out / "detections.json").read_text())
    assert dets and {d["image_id"] for d in dets} <= {1, 2, 3}
    assert set(dets[0]) == {"image_id", "category_id", "bbox", "score", "file_name"}
    assert all(d["score"] >= 0.5 for d in dets)
    # the JSON is COCO results: pycocotools reads it against the val annotations
    from pycocotools.coco import COCO

    gt = COCO(str(ANN))
    res = gt.loadRes([{k: v for k, v in d.items() if k != "file_name"} for d in dets])
    assert len(res.getAnnIds()) == len(dets)
    assert "3 images" in captured.out


def test_explain_json_and_deformable(folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main([str(folder / "000001.png"), "--checkpoint", "deformable_shapes", "--threshold", "0.05",
               "--explain", "--json", "--output", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0
    printed = json.loads(captured.out)
    assert printed == json.loads((out / "detections.json").read_text()) and len(printed) > 0
    im = PIL.Image.open(out / "000001.png")
    assert im.width > 2 * 192  # the detection panels beside the image


def test_explain_detr_png(folder, tmp_path):
    out = tmp_path / "out"
    assert main([str(folder / "000002.png"), "--explain", "--output", str(out)]) == 0
    assert (out / "000002.png").is_file()


def test_usage_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing.png"), "--output", str(tmp_path / "o")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main([str(VAL / "000001.png"), "--threshold", "2", "--output", str(tmp_path / "o")]) == 2
    assert main([str(VAL / "000001.png"), "--checkpoint", str(tmp_path / "x.pt")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_image_ids():
    assert image_id_for(Path("a/000123.png"), 5) == 123
    assert image_id_for(Path("a/cat.jpg"), 5) == 5
