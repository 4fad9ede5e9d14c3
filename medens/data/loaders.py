"""DataLoader construction shared by every modality: epoch-seeded, DDP-aware, reproducible."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from medens.data.resumable import ResumableDataLoader
from medens.utils.seeding import EpochShuffleSampler, SeededItems


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    trainer: pl.Trainer | None = None,
    num_workers: int = 0,
    drop_last: bool = False,
    **kwargs: Any,
) -> DataLoader:
    """A DataLoader whose order depends only on (seed, epoch) and which shards itself under DDP.

    medens trainers set `use_distributed_sampler=False`, so this sampler, not Lightning's wrapper, owns
    the sharding and `set_epoch` reaches it directly. Every item is built under its own seed (see
    `EpochShuffleSampler`), so augmentation does not depend on worker count or on resuming.
    `drop_last` drops a ragged final batch (use it for training: BatchNorm fails on a batch of one).
    """
    world = trainer.world_size if trainer is not None else 1
    rank = trainer.global_rank if trainer is not None else 0
    sampler = EpochShuffleSampler(dataset, seed=seed, shuffle=shuffle, num_replicas=world, rank=rank)
    # Dropping a ragged last batch avoids BatchNorm on a single sample; never drop the only batch.
    drop_last = drop_last and len(sampler) > batch_size
    return ResumableDataLoader(  # resumes mid-epoch exactly (medens/data/resumable.py)
        SeededItems(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        drop_last=drop_last,
        **kwargs,
    )
