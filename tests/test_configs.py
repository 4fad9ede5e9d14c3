"""Every config group composes; the trainer/logger/debug variants do what they say; validation bites."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
import torchvision
from omegaconf import open_dict

from medens.errors import CheckpointError, ConfigError
from medens.models.xray import XRayClassifier, build_resnet
from medens.training.train import train
from medens.training.validation import validate_config
from tests.helpers import CONF, TINY_XRAY

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(compose_train, experiment):
    cfg = compose_train(f"experiment={experiment}")
    validate_config(cfg)
    assert cfg.modality and cfg.monitor and cfg.task_name
    assert cfg.callbacks.model_checkpoint_best.dirpath.endswith(f"saved_models/{cfg.modality}")


def test_default_xray_experiment_is_the_mission(compose_train):
    cfg = compose_train("experiment=xray")
    assert cfg.model.net.arch == "resnet50" and cfg.data.image_size == 224 and cfg.model.net.num_classes == 14
    assert cfg.callbacks.model_checkpoint_periodic.every_n_epochs == 5
    assert cfg.callbacks.model_checkpoint_periodic.save_top_k == 3
    assert cfg.monitor == "val/auc" and cfg.optimized_metric == "best/val/auc"


@pytest.mark.parametrize(
    "trainer, expect",
    [
        ("default", {"accelerator": "auto", "devices": 1}),
        ("cpu", {"accelerator": "cpu", "devices": 1}),
        ("gpu", {"accelerator": "gpu", "precision": "bf16-mixed"}),
        ("ddp", {"accelerator": "gpu", "devices": 4, "sync_batchnorm": True}),
        ("ddp_sim", {"accelerator": "cpu", "devices": 2}),
    ],
)
def test_trainer_group(compose_train, trainer, expect):
    cfg = compose_train(f"trainer={trainer}")
    validate_config(cfg)
    for key, value in expect.items():
        assert cfg.trainer[key] == value
    assert cfg.trainer.use_distributed_sampler is False
    if trainer.startswith("ddp"):
        assert cfg.trainer.strategy._target_ == "medens.training.ddp.MedensDDPStrategy"
        backend = "gloo" if trainer == "ddp_sim" else "nccl"
        assert cfg.trainer.strategy.process_group_backend == backend


def test_ddp_sim_trainer_instantiates_real_ddp_strategy(compose_train):
    from medens.training.ddp import MedensDDPStrategy

    cfg = compose_train("trainer=ddp_sim")
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer.strategy, MedensDDPStrategy) and trainer.num_devices == 2


@pytest.mark.parametrize("logger", ["csv", "tensorboard", pytest.param("mlflow", marks=pytest.mark.slow)])
def test_loggers_record_a_short_run(compose_train, tmp_path, logger):
    if logger == "mlflow":
        pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    cfg = compose_train(*TINY_XRAY, "trainer.max_epochs=1", "trainer.limit_train_batches=2", "test=false",
                        f"logger={logger}")  # fmt: skip
    metrics, objects = train(cfg)
    assert "train/loss" in metrics
    if logger == "csv":
        assert (tmp_path / "run" / "csv" / "metrics.csv").is_file()
    elif logger == "tensorboard":
        assert list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    else:
        assert (tmp_path / "outputs" / "mlflow.db").is_file()


@pytest.mark.slow
def test_overfit_debug_config_drives_loss_down(compose_train):
    cfg = compose_train(*TINY_XRAY, "debug=overfit", "trainer.max_epochs=15", "data.batch_size=4",
                        "model.optimizer.lr=0.003", "logger=none")  # fmt: skip
    metrics, objects = train(cfg)
    assert metrics["train/loss"] < 0.25


def test_validation_names_unknown_keys_anywhere(compose_train):
    cfg = compose_train()
    with open_dict(cfg):
        cfg.data.imagesize = 64
    with pytest.raises(ConfigError, match=r"unknown config key 'data.imagesize'.*Did you mean 'image_size'"):
        validate_config(cfg)
    cfg = compose_train()
    with open_dict(cfg):
        cfg.callbacks.history.pth = "x"
    with pytest.raises(ConfigError, match="callbacks.history.pth"):
        validate_config(cfg)


def test_optimized_metric_missing_is_loud():
    from medens.training.task import get_metric_value

    with pytest.raises(ConfigError, match="'best/val/dice' was not produced"):
        get_metric_value({"best/val/auc": 0.7}, "best/val/dice")
    assert get_metric_value({"best/val/auc": 0.7}, "best/val/auc") == 0.7


def test_pretrained_weights_from_local_file_only(tmp_path):
    imagenet_like = torchvision.models.resnet18(num_classes=1000)
    torch.save(imagenet_like.state_dict(), tmp_path / "resnet18_imagenet.pth")
    net = build_resnet("resnet18", num_classes=14, pretrained_path=str(tmp_path / "resnet18_imagenet.pth"))
    assert torch.equal(net.conv1.weight, imagenet_like.conv1.weight)
    assert net.fc.out_features == 14  # the 1000-class head is not forced in
    with pytest.raises(CheckpointError, match="nothing is downloaded"):
        build_resnet("resnet18", pretrained_path=str(tmp_path / "absent.pth"))
    with pytest.raises(ValueError, match="unknown ResNet architecture 'vgg16'"):
        build_resnet("vgg16")


def test_balanced_positive_weights_follow_training_prevalence(compose_train):
    cfg = compose_train(*TINY_XRAY, "model.pos_weight=balanced")
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    model: XRayClassifier = hydra.utils.instantiate(cfg.model)

    class _T:  # the attributes setup() reads from the trainer
        datamodule = dm

    model._trainer = _T()  # type: ignore[assignment]
    model.setup("fit")
    prevalence = dm.positive_fraction().clamp(1e-3, 1 - 1e-3)
    expected = ((1 - prevalence) / prevalence).clamp(max=20.0)
    torch.testing.assert_close(model.pos_weight, expected)
    assert model.label_names == list(dm.labels)


def test_conf_tree_has_the_documented_groups():
    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    assert {"data", "model", "trainer", "callbacks", "logger", "paths", "hydra", "experiment", "debug",
            "hparams_search"} <= groups  # fmt: skip
    assert {"default", "cpu", "gpu", "ddp", "ddp_sim"} <= {p.stem for p in (CONF / "trainer").glob("*.yaml")}
    assert {"csv", "tensorboard", "mlflow"} <= {p.stem for p in (CONF / "logger").glob("*.yaml")}
    assert {"fdr", "overfit"} <= {p.stem for p in (CONF / "debug").glob("*.yaml")}
    assert Path(CONF / "hparams_search" / "xray_optuna.yaml").is_file()
