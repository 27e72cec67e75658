"""Stage 1: the CNN backbone (a torchvision ResNet) and its downsampled padding masks.

An image batch ``[B, 3, H, W]`` goes through a ResNet; we keep the outputs of the stages named in
``return_layers`` (DETR: only ``layer4`` -> ``[B, 2048, H/32, W/32]`` for ResNet-50; Deformable DETR:
``layer2``, ``layer3``, ``layer4`` -> strides 8, 16, 32). The padding mask ``[B, H, W]`` (True = padded
pixel) is shrunk to every feature map by nearest-neighbour interpolation, exactly like the official code.

Official DETR details reproduced here:

* BatchNorm is *frozen* (``FrozenBatchNorm2d``: fixed statistics and affine, eps 1e-5) when the ResNet
  starts from ImageNet weights; a from-scratch backbone uses ordinary trainable ``BatchNorm2d``.
* Only ``layer2``, ``layer3`` and ``layer4`` are trained; ``conv1``/``bn1``/``layer1`` stay fixed
  (a from-scratch backbone with trainable BatchNorm trains every stage: its stem is random).
* DC5 ("dilated C5") replaces the stride of ``layer4`` by a dilation: stride 16 instead of 32. In general
  ``dilation`` dilates the *last* stage in ``return_layers`` (``layer4`` for every official model; ``layer3``
  for a toy trunk cut after layer3: stride 8 instead of 16). Bottleneck ResNets use torchvision's
  ``replace_stride_with_dilation``; basic-block ResNets (18/34), which torchvision refuses to dilate, get
  the same "a trous" rewrite by hand: the stage's strided convolutions take stride 1, and every 3x3
  convolution after them dilation 2, so the map is the undilated one sampled twice as densely (its even
  rows and columns are exactly the undilated output).
* Speed, same maths: each frozen BN is folded into the convolution before it (``ConvFrozenBN2d``), so
  ``body.conv1`` alone already applies ``bn1`` and ``body.bn1`` passes its input through; the sequence
  ``conv1 -> bn1`` still gives the torchvision result (up to float rounding). Convolutions run channels-last.
* Parameter names: ``body.conv1.weight``, ``body.layer1.0.bn1.running_mean`` ... are torchvision's, so the
  official ``backbone.0.body.*`` keys map to ours by dropping the ``0.``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter

from detr_lite.config import ModelConfig

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
_STAGES = ("layer1", "layer2", "layer3", "layer4")
_TRAINABLE_STAGES = ("layer2", "layer3", "layer4")  # official: conv1 and layer1 stay frozen
_WEIGHT_ENUMS = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet34": "ResNet34_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V1",
    "resnet101": "ResNet101_Weights.IMAGENET1K_V1",
}


class FrozenBatchNorm2d(torchvision.ops.FrozenBatchNorm2d):
    """torchvision's ``FrozenBatchNorm2d`` (same buffers, same eps 1e-5, same maths), computed with one
    fused ``F.batch_norm`` call in inference mode instead of ``x * scale + bias`` (two passes over the
    activation). The statistics and the affine are buffers, so nothing here is ever trained."""

    folded = False  # True once a preceding ConvFrozenBN2d applies this affine itself

    def forward(self, x: Tensor) -> Tensor:
        if self.folded:
            return x
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps
        )


class ConvFrozenBN2d(nn.Conv2d):
    """A ``Conv2d`` followed by a ``FrozenBatchNorm2d``, computed as ONE convolution.

    Frozen BN is a fixed per-channel affine ``y = x * s + t`` with ``s = w / sqrt(var + eps)`` and
    ``t = b - mean * s``; since convolution is linear, ``conv(x, W) * s + t = conv(x, W * s) + t``. The
    folded kernel is recomputed from the current parameters and buffers at every call (cheap: weight-sized),
    so training ``W`` and loading new BN statistics both stay exact. The BN module itself stays in the model
    (same state-dict names as torchvision) but is switched to identity (``bn.folded = True``).
    """

    def attach(self, bn: FrozenBatchNorm2d) -> None:
        self._bn = [bn]  # a list, so that the BN is not registered twice as a submodule
        bn.folded = True

    def forward(self, x: Tensor) -> Tensor:
        bn = self._bn[0]
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
        shift = bn.bias - bn.running_mean * scale
        weight = self.weight * scale.view(-1, 1, 1, 1)
        return F.conv2d(x, weight, shift, self.stride, self.padding, self.dilation, self.groups)


def _fold_frozen_bn(resnet: nn.Module) -> None:
    """Turn every torchvision (conv, frozen BN) pair into a ``ConvFrozenBN2d`` (+ identity BN)."""

    def fold(parent: nn.Module, conv_name: str, bn_name: str) -> None:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        if not isinstance(bn, FrozenBatchNorm2d) or conv.bias is not None:
            return
        conv.__class__ = ConvFrozenBN2d  # same parameters, new forward
        conv.attach(bn)

    fold(resnet, "conv1", "bn1")
    for stage in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4):
        for block in stage:
            for i in (1, 2, 3):
                if hasattr(block, f"conv{i}"):
                    fold(block, f"conv{i}", f"bn{i}")
            if block.downsample is not None:
                fold(block.downsample, "0", "1")


def _dilate_basic_stage(stage: nn.Sequential) -> None:
    """Replace the stride 2 of a basic-block stage by dilation 2 ("a trous"), in place.

    Block 0 samples at stride 2 in ``conv1`` and its ``downsample``; both take stride 1, and every 3x3
    convolution that runs on the (now twice as dense) output of that stride, ``conv2`` of block 0 and both
    convolutions of the later blocks, takes dilation 2 and padding 2. The result at the even rows and
    columns equals the undilated stage's output exactly (zero padding included), so pretrained weights
    keep their meaning.
    """
    first = stage[0]
    first.conv1.stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    convs = [first.conv2] + [conv for block in list(stage)[1:] for conv in (block.conv1, block.conv2)]
    for conv in convs:
        conv.dilation, conv.padding = (2, 2), (2, 2)


def validate_images_and_mask(images: Tensor, mask: Tensor | None) -> None:
    """Raise a one-line ``ValueError`` unless ``images`` is ``[B, 3, H, W]`` and ``mask`` is ``[B, H, W]``
    bool (or None)."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images: expected a 4-D tensor [B, 3, H, W], got shape {got}")
    if images.shape[1] != 3:
        raise ValueError(f"images: expected 3 channels [B, 3, H, W], got shape {tuple(images.shape)}")
    if mask is None:
        return
    b, _, h, w = images.shape
    if not isinstance(mask, Tensor) or tuple(mask.shape) != (b, h, w):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask: expected shape (B, H, W) = {(b, h, w)} matching images, got {got}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask: expected dtype torch.bool (True = padded pixel), got {mask.dtype}")


def _load_imagenet_weights(resnet: nn.Module, name: str) -> bool:
    """Load torchvision's ImageNet weights into ``resnet``: from the torch hub cache when the file is
    there, otherwise by download. Offline and not cached -> one warning line, random init kept."""
    weights = torchvision.models.get_weight(_WEIGHT_ENUMS[name])
    cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        state = torch.hub.load_state_dict_from_url(
            weights.url, map_location="cpu", progress=False, weights_only=True
        )
    except Exception as err:  # offline (URLError, OSError, ...): keep going with random weights
        warnings.warn(
            f"backbone: ImageNet weights for {name} are not cached at {cache} and could not be "
            f"downloaded ({type(err).__name__}); continuing with a randomly initialised backbone",
            stacklevel=3,
        )
        return False
    resnet.load_state_dict(state)
    return True


class Backbone(nn.Module):
    """ResNet trunk returning ``[(feature [B, C, h, w], mask [B, h, w]), ...]`` for ``return_layers``.

    Attributes: ``num_channels`` and ``strides`` (one entry per returned layer), ``body`` (torchvision
    ResNet modules, truncated after the last returned layer, ``fc``/``avgpool`` dropped),
    ``channels_last`` (run convolutions in NHWC memory layout; faster with oneDNN on CPU and with
    tensor cores on GPU, identical maths).
    """

    def __init__(
        self,
        name: str = "resnet50",
        *,
        return_layers: Sequence[str] = ("layer4",),
        train_backbone: bool = True,
        frozen_bn: bool = True,
        dilation: bool = False,
        pretrained: bool = False,
        channels_last: bool = True,
    ):
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"ModelConfig.backbone: expected one of {RESNETS}, got {name!r}")
        bad = [layer for layer in return_layers if layer not in _STAGES]
        if bad or not return_layers:
            raise ValueError(
                f"return_layers: expected a non-empty subset of {_STAGES}, got {tuple(return_layers)}"
            )
        basic = name in ("resnet18", "resnet34")
        order = sorted(return_layers, key=_STAGES.index)
        dilated = order[-1] if dilation else None  # DC5 generalised: the last stage used
        if dilated == "layer1":
            raise ValueError("ModelConfig.dilation: the last backbone stage is layer1, which has no stride to dilate")

        norm_layer = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        replace = [dilated == stage for stage in _STAGES[1:]]
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False] * 3 if basic else replace, norm_layer=norm_layer
        )
        if basic and dilated:
            _dilate_basic_stage(getattr(resnet, dilated))
        self.pretrained_loaded = _load_imagenet_weights(resnet, name) if pretrained else False
        if frozen_bn:
            _fold_frozen_bn(resnet)  # faster, same maths: see ConvFrozenBN2d

        # Official rule: train layer2-4 only (and nothing when train_backbone is False). The rule
        # exists because conv1/layer1 come pretrained; a from-scratch backbone (trainable BatchNorm)
        # would otherwise keep a *random* stem forever, so there every stage trains.
        stages = _TRAINABLE_STAGES if frozen_bn else ("conv1", "bn1", *_STAGES)
        for pname, param in resnet.named_parameters():
            keep = train_backbone and pname.split(".")[0] in stages
            param.requires_grad_(keep)

        self.return_layers = tuple(order)
        self.body = IntermediateLayerGetter(resnet, return_layers={layer: layer for layer in order})

        width = [64, 128, 256, 512] if basic else [256, 512, 1024, 2048]
        stride = [4, 8, 16, 32]
        if dilated:
            i = _STAGES.index(dilated)
            stride[i] = stride[i - 1]
        self.num_channels = [width[_STAGES.index(layer)] for layer in order]
        self.strides = [stride[_STAGES.index(layer)] for layer in order]

        self.channels_last = channels_last
        if channels_last:
            self.body.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor, mask: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
        validate_images_and_mask(images, mask)
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        x = images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        feats = self.body(x)
        out = []
        for layer in self.return_layers:
            feat = feats[layer]
            # nearest-neighbour resize of the padding mask, as the official code does
            small = F.interpolate(mask[None].float(), size=feat.shape[-2:]).to(torch.bool)[0]
            out.append((feat, small))
        return out


def build_backbone(cfg: ModelConfig, return_layers: Sequence[str] = ("layer4",)) -> Backbone:
    """The backbone described by ``cfg`` (name, dilation, frozen BN, pretrained, train_backbone)."""
    return Backbone(
        cfg.backbone,
        return_layers=return_layers,
        train_backbone=cfg.train_backbone,
        frozen_bn=cfg.frozen_bn,
        dilation=cfg.dilation,
        pretrained=cfg.pretrained_backbone,
    )
