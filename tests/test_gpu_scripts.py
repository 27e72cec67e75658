"""The GPU check scripts where a CPU can run them: bench_coco_step.py's smoke run, and
run_notebook.py's parameter injection (the GPU runs themselves: benchmarks/gpu/run_checks.sh)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_coco_step_smoke_run_on_cpu():
    r = subprocess.run(
        [sys.executable, "benchmarks/bench_coco_step.py", "--device", "cpu", "--arch", "detr", "--batch", "1",
         "--scale", "64", "--max-size", "96", "--threads", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "detr-r50-coco: batch 1, short side 64-64, max 96; recipe 500 epochs x 118287 images" in r.stdout
    rows = {line.split("  ")[0]: line for line in r.stdout.splitlines() if line.startswith(("fp32", "bf16"))}
    assert set(rows) == {"fp32", "bf16", "bf16 + channels_last"}, r.stdout
    for line in rows.values():  # ms/step, images/s, (nan peak on CPU), ratio, hours: all numbers
        ms, ips = (float(x) for x in re.findall(r"\d+\.\d+", line)[:2])
        assert ms > 0 and ips >= 0  # a busy CPU can take seconds per step: "0.0" images/s
    assert rows["fp32"].rstrip().split()[-2] == "1.00x"


def test_run_notebook_injects_parameters_after_the_parameters_cell():
    rn = _load(REPO / "benchmarks" / "gpu" / "run_notebook.py")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell("A = 1\nB = 'x'"),
                nbformat.v4.new_code_cell("print(A, B)")]  # fmt: skip
    nb.cells[1].metadata["tags"] = ["parameters"]
    rn.inject(nb, ["A=2", "B = 'y'"], prelude="import os")
    assert nb.cells[2].source == "# Injected parameters\nimport os\nA = 2\nB = 'y'"
    assert nb.cells[2].metadata["tags"] == ["injected-parameters"] and nb.cells[3].source == "print(A, B)"
    with pytest.raises(SyntaxError):  # a bad expression fails before anything runs
        rn.inject(nb, ["A=2 +"], None)
    with pytest.raises(SystemExit, match="expected NAME=EXPRESSION"):
        rn.inject(nb, ["2A=1"], None)
    del nb.cells[1].metadata["tags"]
    with pytest.raises(SystemExit, match="no cell tagged 'parameters'"):
        rn.inject(nb, [], None)
