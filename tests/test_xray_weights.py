"""Pretrained weights by torchvision name, from a temporary TORCH_HOME; nothing is ever downloaded."""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torchvision

from medens.data.synthetic_xray import ensure_synthetic_nih
from medens.data.xray import IMAGENET_MEAN, XRayDataModule
from medens.errors import CheckpointError, ConfigError
from medens.models.xray import XRayClassifier, build_resnet


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """A temporary TORCH_HOME holding resnet18's IMAGENET1K_V1 file name, and no way to reach a network."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def no_network(*a, **k):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    return home


def _place_weights(home: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    path = home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"  # the name torchvision's URL gives
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def test_weights_by_name_load_from_torch_home_and_keep_a_14_class_head(torch_home):
    state = _place_weights(torch_home)
    net = build_resnet("resnet18", num_classes=14, weights="IMAGENET1K_V1")
    torch.testing.assert_close(net.conv1.weight, state["conv1.weight"])
    torch.testing.assert_close(net.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert net.fc.out_features == 14 and net.medens_weights["crop_size"] == 224
    assert net.medens_weights["mean"] == list(IMAGENET_MEAN)
    # DEFAULT and the enum's printed name resolve too; greyscale input sums the RGB filters
    assert build_resnet("resnet18", weights="ResNet18_Weights.DEFAULT").medens_weights["name"].endswith("IMAGENET1K_V1")
    grey = build_resnet("resnet18", in_channels=1, weights="IMAGENET1K_V1")
    torch.testing.assert_close(grey.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))


def test_missing_file_offline_names_the_file_and_the_folder(torch_home):
    with pytest.raises(CheckpointError) as err:
        build_resnet("resnet18", weights="IMAGENET1K_V1")
    msg = str(err.value)
    assert "resnet18-f37072fd.pth" in msg and str(torch_home / "hub" / "checkpoints") in msg
    assert "allow_download" in msg


def test_unknown_name_lists_the_valid_ones(torch_home):
    with pytest.raises(ConfigError, match=r"IMAGENET1K_V3.*resnet50.*IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
        build_resnet("resnet50", weights="IMAGENET1K_V3")
    with pytest.raises(ConfigError, match="not both"):
        build_resnet("resnet18", weights="IMAGENET1K_V1", pretrained_path="x.pth")


def test_torn_cached_file_is_a_clear_error(torch_home):
    path = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="resnet18-f37072fd.pth.*cannot load"):
        build_resnet("resnet18", weights="IMAGENET1K_V1")


@pytest.mark.slow
def test_checkpoint_io_contract_records_the_weights_preprocessing(torch_home, tmp_path):
    _place_weights(torch_home)
    root = ensure_synthetic_nih(tmp_path / "nih", n_patients=8, images_per_patient=2, image_size=40)
    dm = XRayDataModule(str(root), image_size=32, batch_size=4, cache={"enabled": True, "dir": str(tmp_path / "c"),
                        "workers": 1, "progress": False})  # fmt: skip
    net = build_resnet("resnet18", weights="IMAGENET1K_V1")
    model = XRayClassifier(net, functools.partial(torch.optim.SGD, lr=0.01), name="resnet18")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    pre = model.io_contract["preprocessing"]  # what on_save_checkpoint writes into hyperparameters
    assert pre["weights"]["name"] == "ResNet18_Weights.IMAGENET1K_V1" and pre["weights"]["crop_size"] == 224
    assert pre["mean"] == pre["weights"]["mean"] and pre["std"] == pre["weights"]["std"]
    ckpt: dict = {}
    model.on_save_checkpoint(ckpt)
    assert next(iter(ckpt.values()))["hyperparameters"]["io_contract"]["preprocessing"]["weights"]["file"] == (
        "resnet18-f37072fd.pth"
    )

    bad = XRayDataModule(str(root), image_size=32, batch_size=4, normalize="unit", cache=False)
    model2 = XRayClassifier(build_resnet("resnet18", weights="IMAGENET1K_V1"), functools.partial(torch.optim.SGD, lr=0.01))
    with pytest.raises(ConfigError, match="data.normalize='unit'"):
        pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False, enable_progress_bar=False,
                   enable_checkpointing=False, enable_model_summary=False).fit(model2, datamodule=bad)  # fmt: skip


def test_xray_nih_experiment_defaults(compose_train):
    from medens.training.validation import validate_config

    cfg = compose_train("experiment=xray_nih")
    validate_config(cfg)
    assert cfg.model.net.arch == "resnet50" and cfg.model.net.weights == "IMAGENET1K_V2"
    assert cfg.data.image_size == 224 and cfg.data.cache.enabled and cfg.data.cache.size is None
    assert cfg.data.source.use_official_split and cfg.data.missing_images == "error"
    expected_workers = min(16, len(os.sched_getaffinity(0)))
    assert cfg.data.num_workers == expected_workers
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert cfg.trainer.precision == ("bf16-mixed" if gpu_bf16 else "32-true")
    assert str(cfg.data.root).endswith("data/nih_cxr14")
