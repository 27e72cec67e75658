"""ONNX export (python -m detr_lite.export): DETR and Deformable DETR, dynamic sizes, parity with PyTorch.

Tiny random models keep the exports to seconds; the shipped models go through the same code in
``python -m detr_lite.export`` (and ``benchmarks/bench_predict.py``).
"""

from __future__ import annotations

import json

import pytest
import torch

from detr_lite.deformable.msda import ms_deform_attn_reference
from detr_lite.deformable.msda_export import ms_deform_attn_gather

TOL = 1e-4


def test_gather_core_equals_grid_sample():
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[7, 9], [4, 5], [2, 3], [1, 2]])
    s = int(shapes.prod(1).sum())
    value = torch.randn(2, s, 4, 8, generator=g, dtype=torch.float64)
    loc = torch.rand(2, 11, 4, 4, 3, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3  # some outside the map
    w = torch.rand(2, 11, 4, 4, 3, generator=g, dtype=torch.float64)
    ref = ms_deform_attn_reference(value, shapes, loc, w)
    assert torch.allclose(ms_deform_attn_gather(value, shapes, loc, w), ref, atol=1e-12)
    got32 = ms_deform_attn_gather(value.float(), shapes, loc.float(), w.float())
    assert got32.dtype == torch.float32 and torch.allclose(got32.double(), ref, atol=1e-5)


def _tiny(preset: str, **model):
    from detr_lite.api import Detector
    from detr_lite.config import get_config
    from detr_lite.models import build_model

    cfg = get_config(preset)
    cfg.model.pretrained_backbone = False
    for k, v in dict(hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=6, **model).items():
        setattr(cfg.model, k, v)
    torch.manual_seed(0)
    return Detector(build_model(cfg.model).eval(), cfg, device="cpu")


@pytest.mark.parametrize(
    "preset,model",
    [
        ("detr-shapes", {}),
        ("deformable-shapes", {"enc_n_points": 2, "dec_n_points": 2}),
        ("deformable-shapes", {"enc_n_points": 2, "dec_n_points": 2, "with_box_refine": True, "two_stage": True}),
    ],
    ids=["detr", "deformable", "deformable-refine-two-stage"],
)
def test_dynamic_onnx_matches_pytorch_at_other_sizes(preset, model, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from detr_lite.export import export_onnx, onnx_session, parity

    det = _tiny(preset, **model)
    g = torch.Generator().manual_seed(1)
    path = export_onnx(det, tmp_path / "m.onnx", torch.randn(1, 3, 64, 80, generator=g), dynamic=True)
    session = onnx_session(path)
    inputs = [torch.randn(1, 3, 64, 80, generator=g), torch.randn(1, 3, 96, 136, generator=g),
              torch.randn(2, 3, 72, 72, generator=g), torch.randn(1, 3, 40, 200, generator=g)]  # fmt: skip
    rows = parity(det, session, inputs)
    assert [r["size"] for r in rows] == [(64, 80), (96, 136), (72, 72), (40, 200)]
    for r in rows:
        assert r["logits"] <= TOL and r["boxes"] <= TOL, r


def test_static_export_cli(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from detr_lite.checkpoint import save_checkpoint
    from detr_lite.export import main

    det = _tiny("detr-shapes")
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(ckpt, det.model, det.cfg)
    out = tmp_path / "tiny.onnx"
    assert main(["--checkpoint", str(ckpt), "--format", "onnx", "--output", str(out), "--check", "2"]) == 0
    text = capsys.readouterr().out
    assert "parity OK" in text and out.is_file()
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["arch"] == "detr" and meta["traced_size"] == [160, 192] and meta["class_names"]["1"] == "circle"
