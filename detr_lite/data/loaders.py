"""Batches for training and evaluation whose order depends only on ``(seed, epoch)``.

That one property makes runs reproducible and resumable: the trainer reseeds every RNG at the
start of an epoch, so an epoch's batches (and, with ``num_workers 0``, its augmentations) are the
same in every run; a checkpoint taken after ``k`` batches resumes by skipping exactly those ``k``
(:class:`EpochBatches`, ``start``) without loading them.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    Subset,
)

from detr_lite import distributed as D
from detr_lite.config import Config
from detr_lite.data.coco import build_datasets, collate_fn


class EpochBatches:
    """Batches of a shuffled dataset whose order depends only on ``(seed, epoch)``.

    Outside DDP it wraps a ``RandomSampler`` driven by its own ``torch.Generator`` that is
    reseeded at ``set_epoch``; under DDP a ``DistributedSampler`` (seeded the same way by
    ``set_epoch``) shards the data. ``drop_last=True`` as in the official recipe, except that a
    dataset smaller than one batch still yields one (smaller) batch. ``limit``: at most that many
    batches per epoch (smoke runs); ``start``: the epoch's first batches already trained on (a
    resumed epoch) are skipped, for the current epoch only.
    """

    def __init__(self, dataset, batch_size: int, seed: int, limit: int | None = None):
        self.seed, self.limit, self.start = seed, limit, 0
        self.generator = torch.Generator()
        if D.is_dist():
            self.sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=False)
        else:
            self.sampler = RandomSampler(dataset, generator=self.generator)
        n = len(self.sampler)
        self.batches = BatchSampler(self.sampler, batch_size, drop_last=n >= batch_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.generator.manual_seed(self.seed + epoch)
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        self.start = start

    def per_epoch(self) -> int:
        """Batches in a whole epoch."""
        return len(self.batches) if self.limit is None else min(len(self.batches), self.limit)

    def __iter__(self):
        return itertools.islice(iter(self.batches), self.start, self.per_epoch())

    def __len__(self) -> int:
        return max(0, self.per_epoch() - self.start)


class Loaders(NamedTuple):
    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset
    train: DataLoader
    val: DataLoader
    batches: EpochBatches  # the train loader's batch sampler: set_epoch(epoch, start) before each epoch
    generator: torch.Generator  # the train loader's (worker seeds): reseeded every epoch


def build_loaders(cfg: Config, datasets: tuple | None = None, max_iters: int | None = None) -> Loaders:
    """Train and val loaders of ``cfg`` over ``datasets`` (default: :func:`build_datasets`).

    ``max_iters`` (smoke runs): at most that many batches per training epoch and per evaluation.
    """
    ds_train, ds_val = datasets if datasets is not None else build_datasets(cfg.data)
    batches = EpochBatches(ds_train, cfg.train.batch_size, cfg.train.seed, limit=max_iters)
    loader_gen = torch.Generator()
    workers = cfg.data.num_workers
    # page-locked host memory lets the host->GPU copies (non_blocking=True in the engine) overlap compute
    pin = torch.cuda.is_available()
    train = DataLoader(ds_train, batch_sampler=batches, collate_fn=collate_fn, num_workers=workers,
                       generator=loader_gen, pin_memory=pin)  # fmt: skip
    val_batch = cfg.train.val_batch_size
    val_images = ds_val if max_iters is None else Subset(ds_val, range(min(len(ds_val), max_iters * val_batch)))
    val_sampler = DistributedSampler(val_images, shuffle=False) if D.is_dist() else SequentialSampler(val_images)
    val = DataLoader(val_images, batch_size=val_batch, sampler=val_sampler, collate_fn=collate_fn,
                     num_workers=workers, pin_memory=pin)  # fmt: skip
    return Loaders(ds_train, ds_val, train, val, batches, loader_gen)
