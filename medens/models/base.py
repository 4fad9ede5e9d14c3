"""Behaviour every medens LightningModule shares: optimizer plumbing and the checkpoint contract."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from medens.checkpoint.io import MEDENS_KEY
from medens.errors import ConfigError


def seen_patients(datamodule: Any) -> list[str] | None:
    """Patients a model trains or is selected on (train + val), recorded in its checkpoint so that a
    later stage (the stacking ensemble) can prove it never evaluates on them."""
    if not hasattr(datamodule, "split_patient_ids"):
        return None
    seen: set[str] = set()
    for split in ("train", "val"):
        try:
            seen |= {str(p) for p in datamodule.split_patient_ids(split)}
        except (KeyError, RuntimeError, ValueError):
            return None
    return sorted(seen)


class MedensModule(pl.LightningModule):
    """Base LightningModule: holds the bare network as `self.net` and fills the checkpoint keys.

    `monitor`/`monitor_mode` (the logged metric that decides the best checkpoint, e.g. `val/auc`, and
    whether higher is better) come from the config: `conf/model/*.yaml` passes the run's top-level
    `monitor`/`monitor_mode`, the same values the checkpoint and early-stopping callbacks read, so the two
    cannot disagree (any logged metric works, e.g. `monitor=val/loss monitor_mode=min`). The class
    attributes are only the defaults for a module built without them (older checkpoints). `metric_key` is
    the checkpoint key of the modality's headline metric (e.g. `val_auc`). Optimizer and scheduler come from
    Hydra as partials (`_partial_: true`) and are completed with the parameters here. `name` is the
    checkpoint file prefix (`resnet50` -> `resnet50_best.pth`).

    Subclasses declare only their own constructor parameters and pass the rest on as `**base` (the config
    checks follow it here, so a typo under `model.` is still named); they log their epoch metrics in
    `log_epoch_metrics(stage)`, and the base class then tracks the best monitored value, whatever metric
    that is.
    """

    monitor: str = "val/loss"
    monitor_mode: str = "min"
    metric_key: str = "val_metric"

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        compile: bool = False,
        channels_last: bool = False,
        name: str = "model",
        monitor: str | None = None,
        monitor_mode: str | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        if monitor is not None:
            self.monitor = str(monitor)
        if monitor_mode is not None:
            if monitor_mode not in ("min", "max"):
                raise ConfigError(f"monitor_mode must be 'min' or 'max', got {monitor_mode!r}")
            self.monitor_mode = str(monitor_mode)
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.compile_net = compile
        self.channels_last = channels_last
        self.best_metric: float | None = None
        # The resolved experiment config (plain containers), written into every checkpoint.
        self.run_config: dict[str, Any] = {}
        # Facts a model travels with (label order, channels, preprocessing); merged into hyperparameters.
        self.io_contract: dict[str, Any] = {}

    def _eval_step(self, stage: str, batch: Any) -> None:
        """One `stage` (val/test) batch: log its loss and update the stage's metric state (per subclass)."""
        raise NotImplementedError(f"{type(self).__name__} does not evaluate batches")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def log_epoch_metrics(self, stage: str) -> None:
        """Log the `stage` (val/test) epoch's metrics; subclasses compute them from their torchmetrics."""

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_metrics("val")
        if self._trainer is not None and not self.trainer.sanity_checking:
            value = self._metric(self.monitor)
            if value is not None and math.isfinite(value):
                self.update_best(value)

    def on_test_epoch_end(self) -> None:
        self.log_epoch_metrics("test")

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "io_contract"):
            self.io_contract = dm.io_contract()
            seen = seen_patients(dm)
            if seen is not None:
                self.io_contract["seen_patients"] = seen
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if self.compile_net and stage == "fit":
            self.net.compile()  # in place: state-dict keys stay those of the bare network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": self.scheduler_interval,
                "monitor": self.monitor,
            },
        }

    def update_best(self, value: float) -> None:
        """Track the best monitored value seen so far (restored on resume)."""
        better = (
            self.best_metric is None
            or (self.monitor_mode == "max" and value > self.best_metric)
            or (self.monitor_mode == "min" and value < self.best_metric)
        )
        if better:
            self.best_metric = float(value)

    def _metric(self, name: str) -> float | None:
        value = self.trainer.callback_metrics.get(name) if self._trainer is not None else None
        return None if value is None else float(value)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        hyper = dict(self.run_config)
        if self.io_contract:
            hyper["io_contract"] = self.io_contract
        checkpoint[MEDENS_KEY] = {
            "epoch": self.current_epoch + 1,
            "train_loss": self._metric("train/loss"),
            "val_loss": self._metric("val/loss"),
            self.metric_key: self._metric(self.monitor),
            "best_metric": self.best_metric,
            "monitor": self.monitor,
            "hyperparameters": hyper,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        medens = checkpoint.get(MEDENS_KEY, {})
        if medens.get("best_metric") is not None:
            self.best_metric = float(medens["best_metric"])
