"""Reseeding per training batch so a resumed run draws the same random numbers as an uninterrupted one."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from medens.utils.seeding import seed_all


class BatchReseed(Callback):
    """Seed python, numpy and torch from (seed, epoch, batch, rank) before every training batch.

    Model-side randomness (dropout, stochastic depth) then depends only on where the run is, not on how
    many random numbers earlier code consumed (a resumed run creates its loaders in another order).
    Data-side randomness is seeded per item by the sampler (`EpochShuffleSampler`). Together they make
    `ckpt_path=...epoch_5.pth` end with the same weights as a run that never stopped.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        seed_all(hash((self.seed, trainer.current_epoch, batch_idx, trainer.global_rank)))
