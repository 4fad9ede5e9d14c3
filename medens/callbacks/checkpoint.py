"""ModelCheckpoint that writes `.pth` files named by the number of completed epochs."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint


class MedensModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint with medens' naming.

    `{n_epoch}` in `filename` is the number of completed epochs (1-based), so `resnet50_epoch_5.pth`
    holds the state after five epochs and resuming from it continues at epoch 6. Names never contain
    `=` (`auto_insert_metric_name` is off), so every path passes back as a Hydra override. The file
    format itself comes from `MedensCheckpointIO`.
    """

    FILE_EXTENSION = ".pth"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("auto_insert_metric_name", False)
        kwargs.setdefault("save_on_train_epoch_end", True)
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(**kwargs)

    def _monitor_candidates(self, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
        candidates = super()._monitor_candidates(trainer)
        candidates["n_epoch"] = torch.tensor(trainer.current_epoch + 1)
        return candidates
