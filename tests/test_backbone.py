"""Backbone: shapes/strides, mask downsampling, frozen layers and BN, input validation, pretrained loading."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from detr_lite.backbone import Backbone, FrozenBatchNorm2d, build_backbone
from detr_lite.config import ModelConfig


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return Backbone("resnet18", return_layers=("layer1", "layer2", "layer3", "layer4")).eval()


def test_resnet50_layer4_shape():
    torch.manual_seed(0)
    bb = build_backbone(ModelConfig(backbone="resnet50")).eval()
    assert bb.num_channels == [2048] and bb.strides == [32]
    with torch.no_grad():
        ((feat, mask),) = bb(torch.randn(2, 3, 96, 128))
    assert feat.shape == (2, 2048, 96 // 32, 128 // 32)
    assert mask.shape == (2, 3, 4) and mask.dtype == torch.bool and not mask.any()


def test_dc5_and_multiscale_strides():
    bb = Backbone("resnet50", return_layers=("layer4", "layer2", "layer3"), dilation=True).eval()
    assert bb.return_layers == ("layer2", "layer3", "layer4")
    assert bb.num_channels == [512, 1024, 2048] and bb.strides == [8, 16, 16]
    with torch.no_grad():
        outs = bb(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f, _ in outs] == [(1, 512, 8, 12), (1, 1024, 4, 6), (1, 2048, 4, 6)]
    # the dilated stage is the last one used: a trunk cut after layer3 dilates layer3 (stride 8)
    bb3 = Backbone("resnet50", return_layers=("layer3",), dilation=True).eval()
    assert bb3.strides == [8] and bb3.body.layer3[1].conv2.dilation == (2, 2)
    with pytest.raises(ValueError, match="last backbone stage is layer1"):
        Backbone("resnet18", return_layers=("layer1",), dilation=True)


@pytest.mark.parametrize("name, cut", [("resnet18", "layer3"), ("resnet18", "layer4"), ("resnet34", "layer2")])
def test_dilated_basic_block_stage_is_a_trous(name, cut):
    """torchvision refuses to dilate BasicBlock; ours does it by hand, and exactly: the dilated map's even
    rows and columns are the undilated map (same weights, zero padding included), at twice the density."""
    torch.manual_seed(0)
    plain = Backbone(name, return_layers=(cut,)).eval()
    dil = Backbone(name, return_layers=(cut,), dilation=True).eval()
    dil.load_state_dict(plain.state_dict())
    i = ("layer2", "layer3", "layer4").index(cut)
    assert plain.strides == [(8, 16, 32)[i]] and dil.strides == [(4, 8, 16)[i]]
    x = torch.randn(2, 3, 70, 94)  # odd feature sizes on the way down
    mask = torch.zeros(2, 70, 94, dtype=torch.bool)
    mask[1, :, 60:] = True
    with torch.no_grad():
        ((f, m),) = plain(x, mask)
        ((fd, md),) = dil(x, mask)
    assert fd[..., ::2, ::2].shape == f.shape and fd.shape[-1] > f.shape[-1]  # twice as dense
    torch.testing.assert_close(fd[..., ::2, ::2], f, rtol=1e-4, atol=1e-5)
    assert md.shape == fd.shape[:1] + fd.shape[-2:]


def test_mask_nearest_downsampling(r18):
    assert r18.strides == [4, 8, 16, 32] and r18.num_channels == [64, 128, 256, 512]
    h, w = 96, 128
    mask = torch.zeros(2, h, w, dtype=torch.bool)
    mask[0, 70:, :] = True
    mask[1, :, 50:] = True
    with torch.no_grad():
        outs = r18(torch.randn(2, 3, h, w), mask)
    for feat, small in outs:
        fh, fw = feat.shape[-2:]
        rows = (torch.arange(fh) * h / fh).floor().long()  # nearest: source index floor(i * H / h)
        cols = (torch.arange(fw) * w / fw).floor().long()
        assert torch.equal(small, mask[:, rows][:, :, cols])


@pytest.mark.parametrize(
    "images, mask, match",
    [
        (
            torch.zeros(3, 64, 64),
            None,
            r"images: expected a 4-D tensor \[B, 3, H, W\], got shape \(3, 64, 64\)",
        ),
        (torch.zeros(1, 1, 64, 64), None, r"images: expected 3 channels .* got shape \(1, 1, 64, 64\)"),
        (
            torch.zeros(2, 3, 64, 64),
            torch.zeros(2, 64, 60, dtype=torch.bool),
            r"mask: expected shape .*\(2, 64, 64\)",
        ),
        (torch.zeros(2, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool), r"got \(1, 64, 64\)"),
        (torch.zeros(2, 3, 64, 64), torch.zeros(2, 64, 64), r"mask: expected dtype torch.bool"),
    ],
)
def test_bad_input_raises(r18, images, mask, match):
    with pytest.raises(ValueError, match=match):
        r18(images, mask)


def test_only_layer2_to_4_train_and_frozen_bn_stays_fixed():
    torch.manual_seed(0)
    bb = Backbone("resnet18", frozen_bn=True, train_backbone=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bb.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in bb.modules()) == 20
    bn_before = {k: v.clone() for k, v in bb.state_dict().items() if "bn" in k or "downsample.1" in k}
    bb.train()
    ((feat, _),) = bb(torch.randn(2, 3, 64, 64))
    feat.square().mean().backward()
    for name, p in bb.named_parameters():
        trainable = name.split(".")[1] in ("layer2", "layer3", "layer4")
        assert p.requires_grad == trainable, name
        assert (p.grad is not None and p.grad.abs().sum() > 0) == trainable, name
    for k, v in bn_before.items():  # FrozenBN: statistics and affine untouched by a training forward
        assert torch.equal(bb.state_dict()[k], v), k

    frozen = Backbone("resnet18", train_backbone=False)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_trainable_bn_and_state_dict_names():
    bb = Backbone("resnet18", frozen_bn=False)
    assert isinstance(bb.body.bn1, nn.BatchNorm2d) and bb.body.layer2[0].bn1.weight.requires_grad
    # from scratch every stage trains (a random stem must learn); pretrained/frozen-BN keeps the
    # official rule: conv1/layer1 fixed
    assert bb.body.bn1.weight.requires_grad and bb.body.conv1.weight.requires_grad
    frozen = Backbone("resnet18", frozen_bn=True)
    assert not frozen.body.conv1.weight.requires_grad and not frozen.body.layer1[0].conv1.weight.requires_grad
    assert frozen.body.layer2[0].conv1.weight.requires_grad
    keys = Backbone("resnet18").state_dict().keys()
    assert "body.conv1.weight" in keys and "body.layer4.1.bn2.running_var" in keys
    assert not any(k.startswith("body.fc") or k.endswith("num_batches_tracked") for k in keys)


def test_frozen_bn_matches_torchvision_formula():
    bn = FrozenBatchNorm2d(8)
    g = torch.Generator().manual_seed(0)
    for name in ("weight", "bias", "running_mean"):
        getattr(bn, name).copy_(torch.randn(8, generator=g))
    bn.running_var.copy_(torch.rand(8, generator=g) + 0.5)
    x = torch.randn(2, 8, 5, 5, generator=g)
    ref = torchvision.ops.FrozenBatchNorm2d(8)
    ref.load_state_dict(bn.state_dict())
    torch.testing.assert_close(bn(x), ref(x))


def test_channels_last_gives_same_features():
    torch.manual_seed(0)
    a = Backbone("resnet18", channels_last=True).eval()
    b = Backbone("resnet18", channels_last=False).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x)[0][0], b(x)[0][0], atol=1e-4, rtol=1e-4)


def test_pretrained_offline_warns_once_and_continues(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.warns(UserWarning) as record:
        bb = Backbone("resnet18", pretrained=True)
    assert len(record) == 1
    message = str(record[0].message)
    assert "\n" not in message and "resnet18" in message and "checkpoints" in message
    assert not bb.pretrained_loaded


def test_pretrained_uses_cached_weights(monkeypatch):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None).state_dict()
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: reference)
    bb = Backbone("resnet18", pretrained=True)
    assert bb.pretrained_loaded
    assert torch.equal(bb.body.layer3[1].conv2.weight, reference["layer3.1.conv2.weight"])
    assert torch.equal(bb.body.bn1.running_var, reference["bn1.running_var"])


def test_folded_conv_bn_equals_conv_then_frozen_bn():
    """With frozen BN each (conv, BN) pair runs as one convolution with a rescaled kernel: same result."""
    torch.manual_seed(0)
    bb = Backbone("resnet18", channels_last=False)
    g = torch.Generator().manual_seed(3)
    for name, buf in bb.named_buffers():
        buf.copy_(
            0.5 + torch.rand(buf.shape, generator=g) if "var" in name else torch.randn(buf.shape, generator=g)
        )
    reference = torchvision.models.resnet18(norm_layer=torchvision.ops.FrozenBatchNorm2d)
    reference.load_state_dict(bb.body.state_dict(), strict=False)  # fc stays random, unused
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = reference.layer4(reference.layer3(reference.layer2(reference.layer1(
            reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))))))  # fmt: skip
        torch.testing.assert_close(bb(x)[0][0], ref, atol=1e-4, rtol=1e-4)
    assert (
        type(bb.body.layer2[0].downsample[0]).__name__ == "ConvFrozenBN2d"
        and bb.body.layer2[0].downsample[1].folded
    )
