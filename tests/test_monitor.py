"""One source of truth for the monitored metric: the config's `monitor` drives the module and the callbacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medens.checkpoint import load_checkpoint
from tests.helpers import TINY_XRAY, compose, train_in_process


@pytest.mark.parametrize("experiment", ["xray", "ct", "mri", "ensemble", "ct_lidc_voi", "cohort_mri"])
def test_every_experiment_takes_its_header_from_its_modality(experiment: str, tmp_path: Path):
    cfg = compose("train", f"experiment={experiment}", root=tmp_path)
    task = compose("train", f"task={cfg.modality}", root=tmp_path)  # the modality's header alone
    assert (cfg.monitor, cfg.monitor_mode, cfg.optimized_metric) == (task.monitor, task.monitor_mode,
                                                                      task.optimized_metric)  # fmt: skip
    assert (cfg.model.monitor, cfg.model.monitor_mode) == (cfg.monitor, cfg.monitor_mode)
    best = cfg.callbacks.model_checkpoint_best
    assert (best.monitor, best.mode) == (cfg.monitor, cfg.monitor_mode)


def test_monitor_override_reaches_the_module_callbacks_and_sweeper(tmp_path: Path):
    cfg = compose("train", "experiment=ct", "monitor=val/loss", "monitor_mode=min", root=tmp_path)
    assert (cfg.model.monitor, cfg.model.monitor_mode) == ("val/loss", "min")
    assert (cfg.callbacks.early_stopping.monitor, cfg.callbacks.early_stopping.mode) == ("val/loss", "min")
    assert cfg.optimized_metric == "best/val/loss"


def test_monitor_val_loss_trains_and_writes_its_best_checkpoint(tmp_path: Path):
    metrics, objects = train_in_process(
        tmp_path, "experiment=xray", *TINY_XRAY, "monitor=val/loss", "monitor_mode=min",
        "trainer.max_epochs=2", "test=false", "logger=none",
    )  # fmt: skip
    model = objects["model"]
    assert (model.monitor, model.monitor_mode) == ("val/loss", "min")
    best = tmp_path / "saved_models" / "xray" / "resnet18_best.pth"
    assert objects["best_checkpoint"] and best.is_file()
    history = json.loads((tmp_path / "saved_models" / "xray" / "training_history.json").read_text())["epochs"]
    lowest = min(h["val/loss"] for h in history)
    assert metrics["best/val/loss"] == pytest.approx(lowest)
    ckpt = load_checkpoint(best)
    assert ckpt["monitor"] == "val/loss" and ckpt["best_metric"] == pytest.approx(lowest)
    assert ckpt["val_loss"] == pytest.approx(lowest)  # the best file is the epoch of the lowest loss
    assert ckpt["hyperparameters"]["model"]["monitor"] == "val/loss"
