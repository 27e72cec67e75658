"""CUDA: the same numbers on a GPU as on the CPU, and the GPU-only training paths (AMP, channels_last,
torch.compile) end to end.

Every test here needs a CUDA device and is skipped without one (CI has none). They are run on a GPU
machine by ``benchmarks/gpu/run_checks.sh``, which fails if any of them was skipped there.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from detr_lite.checkpoint import load_checkpoint
from detr_lite.data.coco import build_dataset, collate_fn
from detr_lite.deformable.msda import MSDeformAttn, ms_deform_attn, ms_deform_attn_reference
from detr_lite.engine import Precision, amp_dtype_for, evaluate
from detr_lite.models import build_postprocessor
from detr_lite.monitor import read_jsonl
from detr_lite.utils import AP_KEYS
from tests.helpers import run_cli, train_main, write_tiny_config
from tests.test_msda import _count_core_calls, _module_inputs, random_inputs

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu/run_checks.sh runs these)"
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED_DETR = REPO / "data" / "checkpoints" / "detr_shapes.pt"
CORES = [ms_deform_attn_reference, ms_deform_attn]


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32 in matmuls/convolutions while comparing with the CPU (cuDNN allows it by default)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _forward_backward(core, value, ss, loc, attn, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = core(leaves[0], ss, leaves[1], leaves[2])
    out.backward(grad_out)
    return [out.detach().cpu()] + [t.grad.cpu() for t in leaves]


@pytest.mark.parametrize("core", CORES)
def test_msda_cuda_equals_cpu_float64(core):
    """Forward and all three gradients, with points outside the map (zero padding) included."""
    shapes = [(6, 7), (3, 4), (2, 2)]
    value, ss, loc, attn = random_inputs(shapes, n=2, m=4, d=8, n_points=3, lq=11, seed=11)
    grad_out = torch.randn(2, 11, 4 * 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cpu = _forward_backward(core, value, ss, loc, attn, grad_out)
    gpu = _forward_backward(core, *(t.cuda() for t in (value, ss, loc, attn, grad_out)))
    for name, a, b in zip(("output", "grad value", "grad locations", "grad weights"), cpu, gpu):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("core", CORES)
def test_msda_gradcheck_on_cuda(core):
    shapes = [(3, 4), (2, 2)]
    value, ss, loc, attn = (t.cuda() for t in random_inputs(shapes, n=1, m=2, d=2, n_points=2, lq=3, seed=3))
    for t in (value, loc, attn):
        t.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, p, a: core(v, ss, p, a), (value, loc, attn), eps=1e-6, atol=1e-6
    )


def test_msda_fast_equals_reference_on_cuda_float32_encoder_size():
    """A realistic encoder pass (4 levels, 8 heads, 1k queries): the GPU chunking path."""
    shapes = [(32, 40), (16, 20), (8, 10), (4, 5)]
    value, ss, loc, attn = (
        t.cuda()
        for t in random_inputs(shapes, n=2, m=8, d=32, n_points=4, lq=1000, dtype=torch.float32, spread=1.2)
    )
    grad_out = torch.randn(2, 1000, 8 * 32, device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    ref = _forward_backward(ms_deform_attn_reference, value, ss, loc, attn, grad_out)
    fast = _forward_backward(ms_deform_attn, value, ss, loc, attn, grad_out)
    for name, a, b in zip(("output", "grad value", "grad locations", "grad weights"), ref, fast):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=name)


def test_msdeformattn_auto_is_grid_sample_on_cuda_and_equals_the_fast_path(monkeypatch):
    """On CUDA "auto" runs the grid_sample core (faster there), in float32 also under bf16 autocast."""
    torch.manual_seed(0)
    auto = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2).cuda()
    with torch.no_grad():
        auto.sampling_offsets.weight.normal_(0, 0.2)
    fast = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2, implementation="fast").cuda()
    fast.load_state_dict(auto.state_dict())
    inputs = [t.cuda() for t in _module_inputs()]
    calls = _count_core_calls(monkeypatch)
    for amp, tol in ((False, 1e-5), (True, 2e-2)):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            a, b = auto(*inputs), fast(*inputs)
        assert a.dtype == b.dtype == (torch.bfloat16 if amp else torch.float32)
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    assert calls == {"fast": 2, "reference": 2}


def _shipped_val_ap(device: torch.device, amp: bool = False) -> tuple[dict, dict]:
    model, cfg, ckpt = load_checkpoint(SHIPPED_DETR, map_location=device)
    model.to(device)
    val = build_dataset(REPO / "data" / "shapes", "val2017", cfg.data, train=False)
    loader = DataLoader(val, batch_size=cfg.train.val_batch_size, collate_fn=collate_fn)
    with torch.no_grad():
        live = evaluate(
            model,
            build_postprocessor(cfg.model),
            loader,
            val.coco,
            device,
            precision=Precision(amp_dtype_for(device, amp)),
        )
    logged = [m for m in ckpt["metrics"] if "AP" in m][-1]
    return live, logged


def test_shipped_detr_on_cuda_scores_its_logged_ap():
    """The CPU-trained checkpoint on the GPU: fp32 reproduces the logged AP table; bf16 autocast stays close."""
    fp32, logged = _shipped_val_ap(torch.device("cuda"))
    assert fp32["num_images"] == 150
    diffs = {k: round(abs(fp32[k] - logged[k]), 4) for k in AP_KEYS}
    print("cuda fp32 vs logged:", diffs)
    assert max(diffs.values()) < 0.01, diffs
    amp, _ = _shipped_val_ap(torch.device("cuda"), amp=True)
    diffs = {k: round(abs(amp[k] - fp32[k]), 4) for k in AP_KEYS}
    print("cuda autocast vs fp32:", diffs)
    assert max(diffs.values()) < 0.02, diffs


def _check_run(out: Path, epochs: int) -> list[dict]:
    records = read_jsonl(out / "log.jsonl")
    iters = [r for r in records if r["type"] == "iter"]
    eps = [r for r in records if r["type"] == "epoch"]
    assert [e["epoch"] for e in eps] == list(range(epochs))
    assert iters and all(math.isfinite(r["loss"]) for r in iters)
    assert all(e["max_memory_mb"] > 0 for e in eps)  # measured on the GPU
    assert all(k in eps[-1] for k in AP_KEYS)
    return eps


@pytest.mark.parametrize("config", ["detr-shapes", "deformable-shapes"])
def test_train_cli_on_cuda_with_amp_and_channels_last_then_resume(tmp_path, tiny_data, config):
    """Both toy presets on the GPU with bf16 autocast + channels_last; resume on the GPU; the
    checkpoint then loads and evaluates on the CPU."""
    out = tmp_path / "run"
    common = ["--config", config, "--data", str(tiny_data), "--output", str(out), "--device", "cuda",
              "--amp", "--channels-last", "--max-iters-per-epoch", "3", "--no-progress"]  # fmt: skip
    if config == "detr-shapes":
        common += ["--backbone-weights", str(SHIPPED_DETR)]
    assert train_main(*common, "--epochs", "1") == 0
    _check_run(out, 1)
    assert train_main(*common, "--epochs", "2", "--resume") == 0
    _check_run(out, 2)
    model, cfg, ck = load_checkpoint(out / "checkpoint.pt")  # map_location cpu
    assert ck["epoch"] == 2 and next(model.parameters()).device.type == "cpu"
    r = run_cli(
        "--checkpoint",
        str(out / "checkpoint.pt"),
        "--device",
        "cpu",
        "--no-progress",
        module="detr_lite.evaluate",
    )
    assert r.returncode == 0, r.stderr
    assert "|    AP |  AP50 |" in r.stdout


def test_train_cli_on_cuda_with_torch_compile(tmp_path, tiny_data):
    out = tmp_path / "run"
    cfg = write_tiny_config(tmp_path / "tiny.json", tiny_data)
    r = run_cli("--config", str(cfg), "--output", str(out), "--device", "cuda", "--compile", "--amp", "--epochs", "1",
                "--max-iters-per-epoch", "4", "--no-progress", timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    _check_run(out, 1)
    # a compiled model's checkpoint has the plain module's keys: it loads into an uncompiled model
    model, _, _ = load_checkpoint(out / "checkpoint.pt")
    assert not any("_orig_mod" in k for k in model.state_dict())
