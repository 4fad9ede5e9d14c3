"""Preflight round trip (issue 10 item 5): before the first step a checkpoint of the initial state is
written in the run's folder, read back with weights_only=True into a fresh module and compared; an
unwritable folder, a hyperparameter that does not load safely, or a state dict that does not load stops
the run before training with an error naming the cause."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medens.models.base import MedensModule
from medens.training.preflight import Preflight, PreflightError
from tests.helpers import TINY_XRAY, run_cli


class Tiny(MedensModule):
    steps = 0

    def __init__(self, grow_in_setup: bool = False) -> None:
        super().__init__(net=nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)),
                         optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), name="tiny")  # fmt: skip
        self.grow_in_setup = grow_in_setup

    def setup(self, stage: str) -> None:
        if self.grow_in_setup:  # a module that changes its network after construction
            self.net.append(nn.Linear(1, 1))

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        Tiny.steps += 1
        x, y = batch
        return nn.functional.mse_loss(self.net(x).squeeze(-1), y)


class Opaque:
    """Not a plain type: torch.load(weights_only=True) refuses it."""

    def __repr__(self) -> str:
        return "Opaque()"


def fit(module: Tiny, folder: Path, build=None) -> Preflight:  # noqa: ANN001
    Tiny.steps = 0
    pre = Preflight(folder, build or (lambda: Tiny()))
    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randn(8)), batch_size=4)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[pre])  # fmt: skip
    trainer.fit(module, data)
    return pre


def test_preflight_passes_and_leaves_nothing(tmp_path):
    module = Tiny()
    module.run_config = {"model": {"lr": 1e-3, "layers": [4, 3, 1]}, "note": None, "nan": float("nan")}
    pre = fit(module, tmp_path / "sm")
    assert pre.timings and pre.timings["total"] > 0 and Tiny.steps == 2
    assert list((tmp_path / "sm").iterdir()) == []  # the temp file is gone


def test_unloadable_hyperparameter_stops_before_training_naming_the_key(tmp_path):
    module = Tiny()
    module.run_config = {"data": {"root": "/x"}, "model": {"net": {"activation": Opaque()}}}
    with pytest.raises(PreflightError, match=r"hyperparameters\.model\.net\.activation .*Opaque"):
        fit(module, tmp_path)
    assert Tiny.steps == 0 and not list(tmp_path.iterdir())


def test_state_dict_that_does_not_load_into_a_fresh_module_stops_before_training(tmp_path):
    with pytest.raises(
        PreflightError, match=r"does not load into a freshly built module.*unexpected keys: 3\.weight"
    ):
        fit(Tiny(grow_in_setup=True), tmp_path)
    assert Tiny.steps == 0


def test_unwritable_folder_stops_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(
        PreflightError, match=rf"cannot write a checkpoint in {blocker}/sm/xray .*NotADirectoryError"
    ):
        fit(Tiny(), blocker / "sm" / "xray")
    assert Tiny.steps == 0


@pytest.mark.slow
def test_cli_unwritable_saved_models_is_an_error_naming_the_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = run_cli("train.py", "experiment=xray", *TINY_XRAY, f"paths.saved_models_dir={blocker}/sm", root=tmp_path,
                   env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"cannot write the checkpoint folder {blocker}/sm/xray" in out and "NotADirectoryError" in out
    assert "instantiating datamodule" not in out
