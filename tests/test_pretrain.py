"""Backbone pretraining (the toy stand-in for ImageNet weights): targets, loss, CLI, loading into DETR."""

from __future__ import annotations

import json
import random

import pytest
import torch

from detr_lite.checkpoint import read_checkpoint
from detr_lite.models import build_model
from detr_lite.pretrain import DenseHead, dense_targets, load_backbone_weights, pretext_loss
from detr_lite.pretrain import main as pretrain_main
from tests.helpers import make_tiny_coco, tiny_cfg, train_main

pytestmark = pytest.mark.usefixtures("one_thread")

K = 6


def _target(boxes, labels, size=(64, 96)):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "size": torch.tensor(size)}  # fmt: skip


def test_dense_targets_one_box_by_hand():
    # image 64 x 96 (h x w) padded into 64 x 128, grid 4 x 8 (16-px cells); one box centred at
    # pixel (x 40, y 24), 30 wide, 16 high (x 25..55, y 16..32), class 3
    t = _target([[40 / 96, 24 / 64, 30 / 96, 16 / 64]], [3])
    heat, ltrb, inside = dense_targets([t], (4, 8), (64, 128), K)
    assert heat.shape == (1, K, 4, 8) and ltrb.shape == (1, 4, 4, 8) and inside.shape == (1, 4, 8)
    # the centre cell (row 24 // 16 = 1, col 40 // 16 = 2) is exactly 1 in channel 3, nowhere else
    assert heat[0, 3, 1, 2] == 1 and heat.eq(1).sum() == 1
    assert heat[0, :3].abs().sum() == 0 and heat[0, 4:].abs().sum() == 0
    assert 0 < heat[0, 3, 1, 1] < 1  # a Gaussian bump around it
    # cell centres (x 8, 24, 40, ...; y 8, 24, ...) inside the box: x 40 (col 2), y 24 (row 1) only
    assert inside[0].nonzero().tolist() == [[1, 2]]
    # distances from the cell centre (40, 24) to the sides, as fractions of w = 96 and h = 64
    assert torch.allclose(ltrb[0, :, 1, 2], torch.tensor([15 / 96, 8 / 64, 15 / 96, 8 / 64]))


def test_dense_targets_empty_image_and_smaller_box_wins():
    empty = _target([], [])
    big = [48 / 96, 32 / 64, 90 / 96, 60 / 64]
    small = [48 / 96, 32 / 64, 20 / 96, 20 / 64]
    heat, ltrb, inside = dense_targets([empty, _target([big, small], [1, 2])], (4, 6), (64, 96), K)
    assert heat[0].abs().sum() == 0 and not inside[0].any()
    # where both boxes contain the cell centre (the middle cells), ltrb is the small box's
    r, c = 1, 2  # cell centre (40, 24): inside both
    assert inside[1, r, c]
    assert torch.allclose(
        ltrb[1, :, r, c], torch.tensor([(40 - 38) / 96, (24 - 22) / 64, (58 - 40) / 96, (42 - 24) / 64])
    )


def test_pretext_loss_ignores_padded_cells_and_is_finite():
    torch.manual_seed(0)
    t = _target([[0.3, 0.4, 0.2, 0.3]], [1])
    heat, ltrb, inside = dense_targets([t], (4, 8), (64, 128), K)
    valid = torch.zeros(1, 4, 8, dtype=torch.bool)
    valid[:, :, :6] = True  # columns 6-7 are padding
    logits, boxes = torch.randn(1, K, 4, 8), torch.rand(1, 4, 4, 8)
    base = pretext_loss(logits, boxes, heat, ltrb, inside, valid)
    assert all(torch.isfinite(v) for v in base.values())
    logits2, boxes2 = logits.clone(), boxes.clone()
    logits2[..., 6:] = 50.0
    boxes2[..., 6:] = 0.0
    again = pretext_loss(logits2, boxes2, heat, ltrb, inside, valid)
    for k in base:
        assert torch.equal(base[k], again[k]), k
    # a perfect prediction has zero ltrb loss and a smaller heat loss than a random one
    perfect = pretext_loss(torch.logit(heat.clamp(1e-4, 1 - 1e-4)), ltrb, heat, ltrb, inside, valid)
    assert perfect["loss_ltrb"] == 0 and perfect["loss_heat"] < base["loss_heat"]


def test_dense_head_starts_at_low_confidence():
    head = DenseHead(32, K)
    heat, ltrb = head(torch.randn(2, 32, 3, 4))
    assert heat.shape == (2, K, 3, 4) and ltrb.shape == (2, 4, 3, 4)
    assert heat.sigmoid().mean() < 0.05 and 0 < ltrb.min() and ltrb.max() < 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = make_tiny_coco(tmp_path_factory.mktemp("tiny_pre"))
    cfg = tiny_cfg(root, epochs=1)
    cfg.model.backbone_layers = ("layer3",)
    path = tmp_path_factory.mktemp("cfgp") / "tiny.json"
    path.write_text(json.dumps(cfg.to_dict()))
    frozen = cfg.to_dict()
    frozen["model"].update(frozen_bn=True, train_backbone=False, pre_norm=True, pe_temperature=20.0)
    frozen_path = path.with_name("tiny_frozen.json")
    frozen_path.write_text(json.dumps(frozen))
    return root, path, frozen_path


@pytest.mark.slow
def test_pretrain_cli_then_train_with_frozen_backbone(tmp_path, tiny, capsys):
    root, cfg_path, frozen_path = tiny
    bb = tmp_path / "bb" / "backbone.pt"
    assert (
        pretrain_main(["--config", str(cfg_path), "--output", str(bb), "--epochs", "2", "--lr-drop", "1",
                       "--no-progress"]) == 0
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "pretrain epoch 2/2" in out and str(bb) in out
    ckpt = read_checkpoint(bb)
    assert ckpt["model"] and all(k.startswith("backbone.body.") for k in ckpt["model"])
    assert not any("layer4" in k for k in ckpt["model"])  # stops at the config's last backbone layer
    hist = json.loads(bb.with_suffix(".json").read_text())["history"]
    assert len(hist) == 2 and all(h["train_loss_heat"] > 0 for h in hist)
    assert [h["lr"] for h in hist] == pytest.approx([1e-3, 1e-4])  # --lr-drop 1: lr / 10 from epoch 2

    # a frozen backbone with no weights is refused before anything heavy
    assert train_main("--config", str(frozen_path), "--output", str(tmp_path / "x"), "--no-progress") == 2
    err = capsys.readouterr().err
    assert "backbone is frozen" in err and "--backbone-weights" in err and len(err.strip().splitlines()) == 1
    # so is a fine-tuned backbone whose frozen stem (FrozenBatchNorm2d: conv1, layer1, BN) would stay random
    stem = json.loads(frozen_path.read_text())
    stem["model"]["train_backbone"] = True
    stem_path = frozen_path.with_name("tiny_frozen_stem.json")
    stem_path.write_text(json.dumps(stem))
    assert train_main("--config", str(stem_path), "--output", str(tmp_path / "y"), "--no-progress") == 2
    err = capsys.readouterr().err
    assert "conv1, layer1 and every BatchNorm are frozen" in err and "--backbone-weights" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "y").exists()

    run = tmp_path / "run"
    rc = train_main(
        "--config", str(frozen_path), "--backbone-weights", str(bb), "--output", str(run), "--no-progress"
    )
    assert rc == 0
    trained_ckpt = read_checkpoint(run / "checkpoint.pt")
    prov = trained_ckpt["meta"]["backbone_weights"]  # where the backbone came from travels with the model
    assert prov["path"] == str(bb) and prov["epochs"] == 2 and "detr_lite.pretrain" in prov["command"]
    assert prov["lr_drop"] == 1 and prov["lr"] == 1e-3
    assert prov["pretrain_wall_time_s"] > 0 and "train_loss_heat" in prov["last_epoch"]
    trained = trained_ckpt["model"]
    for k, v in ckpt["model"].items():  # the frozen backbone is exactly the pretrained one
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(trained[k], v), k


def test_backbone_weights_errors(tmp_path, tiny, capsys):
    _, cfg_path, frozen_path = tiny
    assert train_main("--config", str(frozen_path), "--backbone-weights", str(tmp_path / "nope.pt"),
                      "--output", str(tmp_path / "r")) == 2  # fmt: skip
    assert "nope.pt: file not found" in capsys.readouterr().err
    cfg = tiny_cfg(tmp_path).model
    model = build_model(cfg)
    other = tiny_cfg(tmp_path).model
    other.backbone = "resnet34"
    path = tmp_path / "r34.pt"
    torch.save({"model": build_model(other).state_dict()}, path)
    with pytest.raises(
        ValueError, match=r"--backbone-weights .*r34.pt: does not fit this backbone: .*unexpected"
    ):
        load_backbone_weights(model, path)
    torch.save({"model": {"query_embed.weight": torch.zeros(6, 32)}}, path)
    with pytest.raises(ValueError, match="no 'backbone.\\*' tensors"):
        load_backbone_weights(model, path)
    assert (
        pretrain_main(["--config", str(cfg_path), "--output", str(tmp_path / "b.pt"), "--epochs", "0"]) == 2
    )
    assert "--epochs: expected >= 1" in capsys.readouterr().err
    assert pretrain_main(["--config", str(cfg_path), "--output", str(tmp_path / "b.pt"), "--epochs", "2",
                          "--lr-drop", "3"]) == 2  # fmt: skip
    assert "--lr-drop: expected 1..--epochs (2), got 3" in capsys.readouterr().err


def test_pretext_deeper_than_the_detr_cut(tmp_path, tiny, capsys):
    """``--layer layer3`` under a config cut after layer2: the pretext trains the trunk through layer3,
    and a DETR on layer2 takes its stem, layer1 and layer2 bit for bit and leaves layer3 out (said so);
    a pretext shallower than the DETR's cut is refused before any training."""
    _, cfg_path, _ = tiny
    cut = json.loads(cfg_path.read_text())
    cut["model"]["backbone_layers"] = ["layer2"]
    cut_path = tmp_path / "cut.json"
    cut_path.write_text(json.dumps(cut))
    bb = tmp_path / "deep.pt"
    args = ["--config", str(cut_path), "--output", str(bb), "--epochs", "1", "--max-iters-per-epoch", "2",
            "--no-progress"]  # fmt: skip
    assert pretrain_main([*args, "--layer", "layer3"]) == 0
    sd = read_checkpoint(bb)["model"]
    assert any(".layer3." in k for k in sd) and not any(".layer4." in k for k in sd)
    from detr_lite.config import Config

    model = build_model(Config.from_dict(cut).model)
    msg = load_backbone_weights(model, bb)
    n3 = sum(".layer3." in k for k in sd)
    assert f"{n3} tensors of layer3 not used (this backbone stops after layer2)" in msg
    own = model.backbone.state_dict()
    assert not any(".layer3." in k for k in own)
    for k, v in own.items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, sd["backbone." + k].to(v.dtype)), k
    # the other way round: a layer3 DETR cannot start from a pretext that stopped at layer2
    capsys.readouterr()
    assert pretrain_main(["--config", str(cfg_path), "--output", str(tmp_path / "s.pt"), "--epochs", "1",
                          "--layer", "layer2"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--layer layer2: shallower than the config's backbone, which goes up to layer3" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "s.pt").exists()
    shallow = tmp_path / "shallow.pt"
    assert pretrain_main(["--config", str(cut_path), "--output", str(shallow), "--epochs", "1",
                          "--max-iters-per-epoch", "1", "--no-progress"]) == 0  # fmt: skip
    deep_model = build_model(Config.from_dict(json.loads(cfg_path.read_text())).model)
    with pytest.raises(ValueError, match=r"shallow.pt: does not fit this backbone: .*missing.*layer3"):
        load_backbone_weights(deep_model, shallow)


@pytest.mark.slow
def test_pretrain_is_reproducible(tmp_path, tiny, capsys):
    """Same config and seed -> the same backbone, bit for bit (every RNG of the augmentation is seeded:
    the random crop draws from Python's ``random``, the rest from torch), however often the val losses
    are computed (``--val-every``: default 5 and after the last epoch)."""
    _, cfg_path, _ = tiny
    outs = []
    for name, extra in (("a.pt", []), ("b.pt", ["--val-every", "1"])):
        random.seed(len(name) + len(outs))  # whatever state the process is in
        torch.manual_seed(len(outs))
        args = ["--config", str(cfg_path), "--output", str(tmp_path / name), "--epochs", "2", "--no-progress"]
        assert pretrain_main(args + extra) == 0
        outs.append(read_checkpoint(tmp_path / name))
    a, b = (o["model"] for o in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = ("train_time_s",)
    ha, hb = ([{k: v for k, v in h.items() if k not in strip} for h in o["meta"]["history"]] for o in outs)
    assert "val_loss_heat" not in ha[0] and "val_loss_heat" in hb[0]  # default: no val after epoch 1 of 2
    assert ha[1] == hb[1]  # the last epoch always has them, identical
    assert ha[0] == {k: v for k, v in hb[0].items() if not k.startswith("val_")}
    out = capsys.readouterr().out
    assert "pretrain epoch 1/2: heat" in out and "(val " in out.split("pretrain epoch 2/2")[1]
    assert pretrain_main(["--config", str(cfg_path), "--output", str(tmp_path / "c.pt"), "--val-every", "0"]) == 2
    err = capsys.readouterr().err
    assert "--val-every: expected >= 1, got 0" in err and len(err.strip().splitlines()) == 1
