"""Checkpoints: atomic writes, weights_only loads, fp16 storage, clear errors on mismatch."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from detr_lite.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from detr_lite.config import Config
from detr_lite.models import build_model
from detr_lite.utils import get_rng_state, set_rng_state
from tests.helpers import tiny_model_cfg


def checkpoint_cfg(**model_overrides) -> Config:
    m = dict(dec_layers=1, dropout=0.0, num_queries=5)
    m.update(model_overrides)
    return Config(name="tiny", model=tiny_model_cfg(**m))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = checkpoint_cfg()
    return cfg, build_model(cfg.model).eval()


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_roundtrip_weights_only(tiny, tmp_path):
    cfg, model = tiny
    path = tmp_path / "ck.pt"
    save_checkpoint(path, model, cfg, meta={"note": "hello"}, epoch=3)
    raw = torch.load(path, weights_only=True)  # must not need the unsafe unpickler
    assert set(raw) >= {"model", "config", "meta", "epoch"}
    assert raw["meta"]["note"] == "hello" and raw["meta"]["dtype"] == "float32"
    assert Config.from_dict(raw["config"]) == cfg
    loaded, cfg2, ck = load_checkpoint(path)
    assert cfg2 == cfg and ck["epoch"] == 3 and not loaded.training
    _same_state(model, loaded)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model(x)["pred_boxes"], loaded(x)["pred_boxes"])


def test_half_storage_loads_back_as_float32(tiny, tmp_path):
    cfg, model = tiny
    full, half = tmp_path / "full.pt", tmp_path / "half.pt"
    save_checkpoint(full, model, cfg)
    save_checkpoint(half, model, cfg, half=True)
    raw = torch.load(half, weights_only=True)
    floats = [v for v in raw["model"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert raw["meta"]["dtype"] == "float16"
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded, _, _ = load_checkpoint(half)
    for k, v in loaded.state_dict().items():
        ref = model.state_dict()[k]
        assert v.dtype == ref.dtype, k
        if v.is_floating_point():
            torch.testing.assert_close(v, ref, rtol=1e-3, atol=1e-4)
        else:
            assert torch.equal(v, ref), k


def _listing(d):
    return sorted(p.name for p in d.iterdir())


def test_crash_between_write_and_rename_keeps_old_checkpoint(tiny, tmp_path, monkeypatch):
    cfg, model = tiny
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, cfg, epoch=1)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, model, cfg, epoch=2)
    monkeypatch.undo()
    assert path.read_bytes() == before  # old file untouched
    assert _listing(tmp_path) == ["checkpoint.pt"]  # no temp file left behind
    assert read_checkpoint(path)["epoch"] == 1


def test_crash_while_writing_keeps_old_checkpoint(tiny, tmp_path, monkeypatch):
    cfg, model = tiny
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, cfg, epoch=1)
    before = path.read_bytes()
    real_save = torch.save

    def half_written(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial bytes")  # the first bytes of a zip, then death
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, cfg, epoch=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert _listing(tmp_path) == ["checkpoint.pt"]


@pytest.mark.slow
def test_kill_9_during_repeated_saves_leaves_a_loadable_file(tmp_path):
    """A process saving in a loop is SIGKILLed at a random moment; the file must still load."""
    path = tmp_path / "checkpoint.pt"
    script = textwrap.dedent(
        f"""
        import torch
        from detr_lite.checkpoint import atomic_torch_save
        i = 0
        while True:
            atomic_torch_save({{"model": {{"w": torch.full((1_000_000,), float(i))}}, "epoch": i}}, {str(path)!r})
            i += 1
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not path.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3 + random.random() * 0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ck = read_checkpoint(path)
    assert torch.equal(ck["model"]["w"], torch.full((1_000_000,), float(ck["epoch"])))


def test_wrong_architecture_names_the_keys(tiny, tmp_path):
    cfg, model = tiny
    path = tmp_path / "ck.pt"
    save_checkpoint(path, model, cfg)
    other = build_model(checkpoint_cfg(hidden_dim=48, num_queries=7, enc_layers=2).model)
    with pytest.raises(ValueError) as err:
        load_checkpoint(path, model=other)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert "missing key" in msg and "transformer.encoder.layers.1" in msg  # the extra encoder layer
    assert "shape mismatch" in msg and "query_embed.weight: checkpoint (5, 32) vs model (7, 48)" in msg


def test_tampered_config_names_the_keys(tiny, tmp_path):
    cfg, model = tiny
    raw = {
        "model": {k: v for k, v in model.state_dict().items() if not k.startswith("class_embed")},
        "config": cfg.to_dict(),
        "meta": {},
    }
    raw["model"]["not_a_param"] = torch.zeros(2)
    path = tmp_path / "bad.pt"
    torch.save(raw, path)
    with pytest.raises(ValueError, match=r"2 missing keys \[class_embed.weight, class_embed.bias\]"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match=r"1 unexpected key \[not_a_param\]"):
        load_checkpoint(path)


class NotAllowed:  # a pickled custom object: weights_only refuses it
    pass


def test_unsafe_or_garbage_files_are_refused(tmp_path):
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": {}, "obj": NotAllowed()}, unsafe)
    with pytest.raises(ValueError, match="weights_only"):
        read_checkpoint(unsafe)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        read_checkpoint(garbage)
    with pytest.raises(ValueError, match="file not found"):
        read_checkpoint(tmp_path / "missing.pt")
    official_like = tmp_path / "official.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, official_like)
    with pytest.raises(ValueError, match="load_official_checkpoint"):
        load_checkpoint(official_like)


def test_rng_state_roundtrip_through_weights_only(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    state = get_rng_state()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.normal())
    torch.save({"rng": state}, tmp_path / "rng.pt")
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.normal())
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3]
