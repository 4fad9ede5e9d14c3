"""How much of each training epoch waits for data: `perf/data_wait_fraction` and `perf/images_per_s`.

A GPU fed by too few DataLoader workers, or by PNG decoding instead of the decoded-image cache, sits
idle while the next batch is built. This callback measures, per training epoch, the time between the
end of one batch (or the epoch start) and the start of the next (the loader's fetch, collation and
the transfer to the device) against the epoch's training time, logs both values (so they reach
`training_history.json` and every logger), and warns once per run when the fraction is high.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        batch = batch.get("image", next(iter(batch.values()), None))
    if isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.dim() > 0 else 0


class DataWait(Callback):
    """Log the fraction of each training epoch spent waiting for batches, and training images/s.

    `warn_above`: fraction over which a warning names the knobs (`data.num_workers`, the cache);
    `min_batches`: epochs with fewer batches are logged but never warned about (start-up dominates).
    Must come before `TrainingHistory` in the callback list so the history sees the epoch's values.
    """

    def __init__(self, warn_above: float = 0.2, min_batches: int = 8) -> None:
        if not 0.0 <= float(warn_above) <= 1.0:
            raise ValueError(f"callbacks.data_wait.warn_above={warn_above!r}: must be a fraction in [0, 1]")
        self.warn_above = float(warn_above)
        self.min_batches = int(min_batches)
        self.warned = False
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self._t0 = self._last = now
        self._wait = 0.0
        self._images = 0
        self._batches = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset(time.perf_counter())

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._wait += time.perf_counter() - self._last

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._last = time.perf_counter()
        self._images += _batch_size(batch)
        self._batches += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._batches == 0:
            return
        elapsed = max(self._last - self._t0, 1e-9)  # start of the epoch to the end of its last batch
        fraction = min(1.0, self._wait / elapsed)
        images_per_s = self._images * trainer.world_size / elapsed
        pl_module.log("perf/data_wait_fraction", fraction, on_step=False, on_epoch=True, sync_dist=False)
        pl_module.log("perf/images_per_s", images_per_s, on_step=False, on_epoch=True, sync_dist=False)
        if fraction > self.warn_above and self._batches >= self.min_batches and not self.warned:
            self.warned = True
            loader = trainer.train_dataloader
            workers = getattr(loader, "num_workers", "?")
            cached = getattr(getattr(trainer, "datamodule", None), "cache", None) is not None
            log.warning(
                "epoch %d: %.0f%% of the training time waited for the next batch (%.0f images/s; warn level "
                "callbacks.data_wait.warn_above=%.2f). Raise data.num_workers (now %s)%s.",
                trainer.current_epoch + 1, 100 * fraction, images_per_s, self.warn_above, workers,
                "" if cached else ", or use the decoded-image cache (data.cache.enabled=true) where the data has one",
            )  # fmt: skip
