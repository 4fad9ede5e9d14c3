"""Evaluation's inference through Lightning's `trainer.predict` and the modules' own `predict_step`.

The network is run exactly as the LightningModule defines prediction (CT's flip TTA, the segmenter's
sliding window), on the device that `device=` names, in inference mode, without a loop of evaluation's
own. Per-batch consumers (NIfTI, figures, per-case metrics) get each batch on the CPU as it is
predicted, so nothing of a whole split has to be held in memory.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.callbacks import BasePredictionWriter

from medens.errors import ConfigError

#: Lightning's start-up notes (GPU available / TPU / HPU ...) say nothing to someone evaluating a model.
_QUIET = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric")


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in _QUIET]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():  # the loader's worker count is the data config's, not a prediction issue
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")  # Lightning vs torch pytree API
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def predict_trainer(device: str = "cpu", callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    """A one-device Trainer for prediction only: no logger, checkpoints, progress bar or summary.
    `device` is `cpu`, `cuda`, `cuda:<i>` or `mps`."""
    kind, _, index = str(device).partition(":")
    accelerators = {"cpu": "cpu", "cuda": "gpu", "gpu": "gpu", "mps": "mps"}
    if kind not in accelerators:
        raise ConfigError(f"device={device!r}: expected cpu, cuda, cuda:<index> or mps")
    devices: Any = [int(index)] if index else 1
    with _quiet_lightning():
        return pl.Trainer(accelerator=accelerators[kind], devices=devices, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks or [])  # fmt: skip


class _EachBatch(BasePredictionWriter):
    """Hands every predicted batch (moved to the CPU) to `consume(batch, prediction, seconds)`."""

    def __init__(self, consume: Callable[[dict[str, Any], dict[str, Any], float], None]) -> None:
        super().__init__(write_interval="batch")
        self.consume = consume
        self._t0 = 0.0

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                               batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._t0 = time.perf_counter()

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:  # fmt: skip
        seconds = time.perf_counter() - self._t0
        cpu = lambda x: apply_to_collection(x, torch.Tensor, lambda t: t.detach().cpu())  # noqa: E731
        self.consume(cpu(batch), cpu(prediction), seconds)


def predict_each_batch(
    model: pl.LightningModule,
    loader: Any,
    consume: Callable[[dict[str, Any], dict[str, Any], float], None],
    device: str = "cpu",
) -> None:
    """`trainer.predict` over `loader`; `consume(batch, prediction, seconds)` per batch, on the CPU
    (`seconds`: the batch's prediction time). Predictions are not accumulated."""
    trainer = predict_trainer(device, callbacks=[_EachBatch(consume)])
    with _quiet_lightning():
        trainer.predict(model, dataloaders=loader, return_predictions=False)


def predict_all(model: pl.LightningModule, loader: Any, device: str = "cpu") -> list[dict[str, Any]]:
    """Every batch's `predict_step` output, on the CPU (for small outputs: classifier scores)."""
    trainer = predict_trainer(device)
    with _quiet_lightning():
        outputs = trainer.predict(model, dataloaders=loader, return_predictions=True) or []
    return [apply_to_collection(o, torch.Tensor, lambda t: t.detach().cpu()) for o in outputs]
