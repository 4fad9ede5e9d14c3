"""`training_history.json`: one entry per epoch, rewritten atomically so it is readable while training."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from medens.utils.atomic import atomic_write_text
from medens.utils.jsonio import dumps_strict


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class TrainingHistory(Callback):
    """Record every logged epoch metric (train and val loss, AUC or Dice, learning rate, time) per epoch.

    The history is part of the callback's checkpoint state, so a resumed run continues the same list
    instead of appending to whatever the file held.
    """

    def __init__(self, path: str, extra: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.extra = extra or {}
        self.history: list[dict[str, Any]] = []
        self._epoch_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        entry: dict[str, Any] = {"epoch": trainer.current_epoch + 1, "global_step": trainer.global_step}
        for name, value in sorted(trainer.callback_metrics.items()):
            if name.endswith("_step"):
                continue
            entry[name.removesuffix("_epoch")] = _plain(value)
        for i, opt in enumerate(trainer.optimizers):
            entry["lr" if i == 0 else f"lr_{i}"] = opt.param_groups[0]["lr"]
        entry["epoch_seconds"] = round(time.perf_counter() - self._epoch_start, 3)
        self.history = [h for h in self.history if h["epoch"] < entry["epoch"]] + [entry]
        if trainer.is_global_zero:
            self.write()

    def write(self) -> None:
        doc = {"epochs": self.history, **self.extra}
        atomic_write_text(self.path, dumps_strict(doc))  # strict JSON: an undefined metric is null, never NaN

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
