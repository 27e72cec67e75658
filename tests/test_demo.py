"""make demo (python -m detr_lite.demo): both shipped models evaluated, AP side by side, pictures written."""

from __future__ import annotations

import json

import pytest

from detr_lite.demo import main, side_by_side


def test_side_by_side_table():
    rows = [{"title": "DETR", "checkpoint": "a/detr.pt", "metrics": dict(AP=0.5, AP50=0.8, AP75=0.4, APs=-1, APm=0.3, APl=0.7)}]
    table = side_by_side(rows)
    assert "| DETR | detr.pt | 0.500 | 0.800 | 0.400 | n/a | 0.300 | 0.700 |" in table


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["--images", "1", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| DETR | detr_shapes.pt |" in out and "| Deformable DETR | deformable_shapes.pt |" in out
    summary = json.loads((tmp_path / "demo.json").read_text())
    for model in summary["models"]:
        assert model["metrics"]["num_images"] == 150 and 0 <= model["metrics"]["AP"] <= 1
        assert len(model["pictures"]) == 1 and all(p in out for p in model["pictures"])
    assert (tmp_path / "detr_shapes" / "000001.png").is_file()
    assert (tmp_path / "deformable_shapes" / "000001.png").is_file()
