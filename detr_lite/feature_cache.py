"""A fixed pool of augmented views per training image, with a frozen backbone's features cached.

Official DETR draws a fresh random augmentation of every image in every epoch, and runs the backbone on
it. When the backbone is frozen (``model.train_backbone: false`` with FrozenBatchNorm2d) its output is a
fixed function of the augmented image, so on a small CPU budget the same forward is recomputed over and
over: in the toy recipe it is a third of a training step (``benchmarks/bench_train_step.py``).

``train.cached_views: V`` (V > 0) trades augmentation variety for speed: each training image gets ``V``
augmented views, view ``v`` of image ``i`` drawn by the usual train transforms from RNGs seeded by
``(seed, i, v)`` (so it is the same in every run, process and resume). Each epoch picks one view per image
from a generator seeded by ``(seed, epoch)``. The first time a view is used, the backbone runs on it alone
(batch of one, no padding) and its last-stage feature map is kept; later epochs reuse it and only the
transformer, heads and loss run. ``collate_fn`` pads the cached maps exactly as it pads images (zeros,
mask True on padding), and ``DETR.forward(features=...)`` starts from them. Evaluation is unchanged: the
full model on the val images. ``cached_views: 0`` (the default) is the official fresh-augmentation path.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from detr_lite.config import Config


def check_cacheable(cfg: Config) -> None:
    """One-line ``ValueError`` unless ``cfg`` may cache backbone features (checked before any heavy work)."""
    views = cfg.train.cached_views
    if not isinstance(views, int) or isinstance(views, bool) or views < 0:
        raise ValueError(f"config {cfg.name}: train.cached_views must be an integer >= 0, got {views!r}")
    if views == 0:
        return
    if cfg.model.arch != "detr":
        raise ValueError(
            f"config {cfg.name}: train.cached_views {views} is implemented for arch 'detr' only, "
            f"not {cfg.model.arch!r}; set train.cached_views 0"
        )
    if cfg.model.train_backbone or not cfg.model.frozen_bn:
        raise ValueError(
            f"config {cfg.name}: train.cached_views {views} needs a frozen backbone "
            f"(model.train_backbone false and model.frozen_bn true; got {cfg.model.train_backbone} / "
            f"{cfg.model.frozen_bn}): a trained backbone's features change every step"
        )


@contextmanager
def _seeded(seed: int):
    """Seed torch, ``random`` and numpy for the block, then restore the caller's RNG states."""
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


def view_seed(seed: int, index: int, view: int) -> int:
    """The RNG seed of view ``view`` of training image ``index``."""
    return (seed * 1_000_003 + index * 7_919 + view * 104_729 + 17) % 2**63


class CachedViews(Dataset):
    """Items ``(feature [C, h, w], target)``: this epoch's view of each image, through ``backbone``.

    ``dataset`` is the training dataset with its random train transforms; ``backbone`` the model's
    (frozen) backbone; ``device`` where it runs. Features are stored on the CPU in float32.
    """

    def __init__(self, dataset, backbone: nn.Module, views: int, seed: int, device: torch.device | str = "cpu"):
        if views < 1:
            raise ValueError(f"CachedViews: views must be >= 1, got {views}")
        self.dataset = dataset
        self.backbone = backbone
        self.views = views
        self.seed = seed
        self.device = torch.device(device)
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, dict[str, Any]]] = {}
        self._epoch_views = torch.zeros(len(dataset), dtype=torch.long)
        self.computed = 0  # backbone forwards run so far (one per new view)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Choose this epoch's view of every image (a function of ``(seed, epoch)`` only)."""
        g = torch.Generator().manual_seed(self.seed * 7_777 + epoch)
        self._epoch_views = torch.randint(self.views, (len(self.dataset),), generator=g)

    def view(self, index: int, view: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The augmented image ``(image [3, H, W], target)`` of view ``view`` of image ``index``."""
        with _seeded(view_seed(self.seed, index, view)):
            return self.dataset[index]

    @torch.no_grad()
    def features(self, index: int, view: int) -> tuple[torch.Tensor, dict[str, Any]]:
        key = (index, view)
        if key not in self._cache:
            image, target = self.view(index, view)
            image = image[None].to(self.device)
            mask = torch.zeros(1, *image.shape[2:], dtype=torch.bool, device=self.device)
            feat, _ = self.backbone(image, mask)[-1]
            self._cache[key] = (feat[0].float().cpu().contiguous(), target)
            self.computed += 1
        return self._cache[key]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.features(index, int(self._epoch_views[index]))

    def cached_bytes(self) -> int:
        return sum(f.numel() * f.element_size() for f, _ in self._cache.values())
