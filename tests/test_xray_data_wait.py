"""The data-wait callback: fraction of each epoch spent waiting for batches, in the history, warned about."""

from __future__ import annotations

import json
import logging
import time

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from medens.callbacks import TrainingHistory
from medens.callbacks.data_wait import DataWait


class _Data(Dataset):
    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        time.sleep(self.delay)
        return {"image": torch.full((4,), float(i)), "label": torch.tensor([i % 2], dtype=torch.float32)}


class _Model(pl.LightningModule):
    def __init__(self, step_seconds: float) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.step_seconds = step_seconds

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        time.sleep(self.step_seconds)  # a model step of known length
        loss = torch.nn.functional.binary_cross_entropy_with_logits(self.lin(batch["image"]), batch["label"])
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(tmp_path, delay: float, step: float, name: str) -> list[dict]:
    history = tmp_path / f"{name}.json"
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[DataWait(warn_above=0.2, min_batches=4), TrainingHistory(str(history))])  # fmt: skip
    trainer.fit(_Model(step), train_dataloaders=DataLoader(_Data(delay), batch_size=4))
    return json.loads(history.read_text())["epochs"]


@pytest.mark.slow
def test_slow_loader_is_measured_written_and_warned_about_once(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="medens.callbacks.data_wait")
    slow = _fit(tmp_path, delay=0.02, step=0.005, name="slow")  # ~80 ms fetch vs 5 ms step per batch
    assert [e["epoch"] for e in slow] == [1, 2]
    assert all(0 <= e["perf/data_wait_fraction"] <= 1 for e in slow)
    assert slow[-1]["perf/data_wait_fraction"] > 0.5, slow  # (epoch 1 also pays the first step's set-up)
    assert all(0 < e["perf/images_per_s"] < 4 / 0.08 for e in slow)
    assert caplog.text.count("waited for the next batch") == 1 and "data.num_workers" in caplog.text
    caplog.clear()
    fast = _fit(tmp_path, delay=0.0, step=0.15, name="fast")  # no fetch cost, 150 ms step
    assert fast[-1]["perf/data_wait_fraction"] < 0.2, fast
    assert "waited for the next batch" not in caplog.text


def test_bad_warn_level_is_named():
    with pytest.raises(ValueError, match="warn_above=2"):
        DataWait(warn_above=2)
