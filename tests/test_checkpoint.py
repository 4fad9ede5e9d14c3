"""The checkpoint contract (DESIGN.md): plain PyTorch, medens' loader, atomic writes, layout."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
import torch
import torchvision

from medens.checkpoint import atomic_torch_save, load_checkpoint, load_network_weights
from medens.checkpoint import io as ckpt_io
from medens.errors import CheckpointError
from tests.helpers import TINY_XRAY, plain, train_in_process

DESIGN_KEYS = {
    "epoch", "model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "train_loss", "val_loss",
    "val_auc", "best_metric", "hyperparameters", "timestamp",
}  # fmt: skip


def _train(root: Path, *overrides: str):
    return train_in_process(root, "logger=none", *TINY_XRAY, *overrides)


@pytest.fixture(scope="module")
def resnet50_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("r50")
    _train(root, "model.net.arch=resnet50", "trainer.max_epochs=1", "data.source.generator.n_patients=8", "test=false")
    return root / "saved_models" / "xray"


@pytest.fixture(scope="module")
def resnet18_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("r18")
    metrics, objects = _train(
        root, "trainer.max_epochs=5", "callbacks.model_checkpoint_periodic.every_n_epochs=1"
    )
    return root / "saved_models" / "xray", metrics


@pytest.mark.slow
def test_plain_pytorch_loads_resnet50_weights(resnet50_run):
    path = resnet50_run / "resnet50_best.pth"
    ckpt = torch.load(path, weights_only=True)
    assert DESIGN_KEYS <= set(ckpt)
    net = torchvision.models.resnet50(num_classes=14)
    net.load_state_dict(ckpt["model_state_dict"])  # strict: every key matches
    assert torch.equal(net.fc.weight, ckpt["model_state_dict"]["fc.weight"])
    assert plain(ckpt["hyperparameters"]), "hyperparameters must be plain containers"
    assert ckpt["hyperparameters"]["model"]["net"]["arch"] == "resnet50"
    assert ckpt["hyperparameters"]["io_contract"]["label_names"][0] == "Atelectasis"
    datetime.fromisoformat(ckpt["timestamp"])
    assert ckpt["epoch"] == 1 and ckpt["best_metric"] == pytest.approx(ckpt["val_auc"])


@pytest.mark.slow
def test_wrong_architecture_lists_keys_and_strict_false_loads_what_matches(resnet50_run):
    path = resnet50_run / "resnet50_best.pth"
    net = torchvision.models.resnet18(num_classes=14)
    with pytest.raises(CheckpointError) as err:
        load_network_weights(net, path)
    msg = str(err.value)
    assert "resnet50_best.pth" in msg and "unexpected keys" in msg and "layer1.0.conv3.weight" in msg
    assert "shape mismatches" in msg and "strict=False" in msg
    report = load_network_weights(net, path, strict=False)
    ckpt = load_checkpoint(path)
    assert torch.equal(net.conv1.weight, ckpt["model_state_dict"]["conv1.weight"])  # same shape: loaded
    assert any(k.startswith("layer1.0.conv1.weight") for k in report.shape_mismatch)
    assert not torch.equal(net.fc.weight, torch.zeros_like(net.fc.weight))


class Payload:
    """An arbitrary pickled object: medens' loader must refuse to unpickle it."""


@pytest.mark.slow
def test_loader_is_weights_only_and_names_bad_files(tmp_path, resnet18_run):
    evil = tmp_path / "evil.pth"
    torch.save({"model_state_dict": {}, "x": Payload()}, evil)
    with pytest.raises(CheckpointError, match="evil.pth: cannot read checkpoint"):
        load_checkpoint(evil)
    good = resnet18_run[0] / "resnet18_best.pth"
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="missing.pth: checkpoint file not found"):
        load_checkpoint(tmp_path / "missing.pth")
    ckpt = load_checkpoint(good)
    assert all(t.device.type == "cpu" for t in ckpt["model_state_dict"].values())


def test_atomic_save_keeps_previous_file_on_crash(tmp_path, monkeypatch):
    path = tmp_path / "model_best.pth"
    atomic_torch_save({"v": torch.tensor(1)}, path)

    def crash(obj, fh):
        fh.write(b"partial bytes")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(ckpt_io.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"v": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["v"].item() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_best.pth"]


@pytest.mark.slow
def test_layout_periodic_keeps_newest_three_and_history(resnet18_run):
    folder, metrics = resnet18_run
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "resnet18_best.pth", "resnet18_epoch_3.pth", "resnet18_epoch_4.pth", "resnet18_epoch_5.pth",
        "training_history.json",
    ]  # fmt: skip
    assert not any("=" in n for n in names)
    history = json.loads((folder / "training_history.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    for h in history:
        assert {"train/loss", "val/loss", "val/auc", "val/auc_Effusion", "lr"} <= set(h)
    best = load_checkpoint(folder / "resnet18_best.pth")
    assert best["val_auc"] == pytest.approx(max(h["val/auc"] for h in history), abs=1e-6)
    assert metrics["best/val/auc"] == pytest.approx(best["best_metric"])
    epoch4 = load_checkpoint(folder / "resnet18_epoch_4.pth")
    assert epoch4["epoch"] == 4 and epoch4["val_loss"] == pytest.approx(history[3]["val/loss"], rel=1e-5)
    assert "test/auc" in metrics
