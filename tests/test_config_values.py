"""Config values are checked by type and range before any work starts (issue 14 item 5): each bad override
ends in a `ConfigError` naming the key, the value and what is allowed, before any data is generated or any
file is written under saved_models/."""

from __future__ import annotations

from pathlib import Path

import pytest

from medens.errors import ConfigError
from medens.training.validation import validate_config
from tests.helpers import CONF, TINY_XRAY, compose, run_cli

#: (override(s), fragment the error must contain)
BAD = [
    ("trainer.max_epochs=abc", "trainer.max_epochs='abc': expected an integer >= -1 (or null) (Trainer.max_epochs)"),
    ("data.batch_size=abc", "data.batch_size='abc': expected an integer >= 1"),
    ("data.batch_size=-4", "data.batch_size=-4: expected an integer >= 1"),
    ("model.optimizer.lr=-1", "model.optimizer.lr=-1: expected a number > 0 (AdamW.lr)"),
    ("model.optimizer.lr=0", "model.optimizer.lr=0: expected a number > 0"),
    ("trainer.devices=0", "trainer.devices=0: expected an integer >= 1, -1 (all), 'auto'"),
    ("data.num_workers=-1", "data.num_workers=-1: expected an integer >= 0"),
    ("trainer.precision=17", "trainer.precision=17: expected one of [64, 32, 16,"),
    ("data.image_size=0", "data.image_size=0: expected an integer >= 1"),
    ("data.val_fraction=1.5", "data.val_fraction=1.5: expected a number in [0, 1]"),
    ("data.test_fraction=-0.1", "data.test_fraction=-0.1: expected a number in [0, 1]"),
    ("data.val_fraction=0.6 data.test_fraction=0.5", "val_fraction=0.6 + data.test_fraction=0.5 = 1.1: expected a sum < 1"),
    ("trainer.accelerator=quantum", "trainer.accelerator='quantum': expected one of ['auto', 'cpu'"),
    ("trainer.limit_train_batches=1.5", "trainer.limit_train_batches=1.5: expected an integer >= 0 (batches) or a fraction"),
    ("trainer.deterministic=maybe", "trainer.deterministic='maybe': expected one of ['warn'] or true or false or null"),
    ("seed=-3", "seed=-3: expected an integer in [0, 4294967295]"),
    ("model.net.num_classes=0", "model.net.num_classes=0: expected an integer >= 1 (build_resnet.num_classes)"),
    ("callbacks.early_stopping.patience=-2", "callbacks.early_stopping.patience=-2: expected an integer >= 0"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1: expected a number >= 0"),
    ("data.channels=abc", "data.channels='abc': expected an integer (XRayDataModule.channels)"),
    ("model.optimizer.weight_decay=-0.1", "model.optimizer.weight_decay=-0.1: expected a number >= 0"),
    ("data.source.use_official_split=perhaps", "data.source.use_official_split='perhaps': expected true or false"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0: expected an integer >= 1"),
    ("callbacks.model_checkpoint_periodic.save_top_k=-5", "save_top_k=-5: expected an integer >= -1"),
    ("experiment=ct data.patch_size=0", "data.patch_size=0: expected an integer >= 1 or a list of them"),
    ("experiment=ct data.spacing_mm=-1", "data.spacing_mm=-1: expected a number > 0 or a list of them"),
    ("experiment=mri model.inferer.overlap=1.5", "model.inferer.overlap=1.5: expected a number in [0, 1)"),
    ("experiment=mri data.samples_per_volume=0", "data.samples_per_volume=0: expected an integer >= 1"),
    ("experiment=ensemble data.modality_dropout=2", "data.modality_dropout=2: expected a number in [0, 1)"),
    # the meta-learner passes **kwargs to MedensModule: its base's parameters are checked too
    ("experiment=ensemble +model.compile=maybe", "model.compile='maybe': expected true or false (MetaLearner.compile)"),
    ("experiment=ensemble +model.modality_dropuot=0.2", "unknown config key 'model.modality_dropuot'"),
]  # fmt: skip


def _compose(root: Path, *overrides: str):
    return compose("train", "logger=none", *overrides, root=root)


def _nothing_written(root: Path) -> None:
    assert not (root / "saved_models").exists()
    assert not (root / "data").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_refused_before_any_work(overrides: str, message: str, tmp_path: Path):
    from medens.training.train import train

    cfg = _compose(tmp_path, *overrides.split())
    with pytest.raises(ConfigError) as info:
        train(cfg)  # the real entry: validation comes before data, model and files
    assert message in str(info.value), str(info.value)
    _nothing_written(tmp_path)


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=xray"], ["experiment=ct"], ["experiment=mri"], ["experiment=ensemble"],
        ["experiment=cohort_xray"], ["experiment=cohort_ct"], ["experiment=cohort_mri"], ["experiment=ct_lidc_voi"],
        ["experiment=mri_brats2015"], ["experiment=xray_samples"], ["trainer=ddp_sim"], ["trainer=gpu"],
        ["trainer=ddp"], ["debug=fdr"], ["debug=overfit"], ["data=chestmnist"], ["data=nodulemnist3d", "model=ct"],
        ["logger=mlflow"], ["logger=tensorboard"], ["trainer.devices=auto"], ["trainer.devices=[0,1]"],
        ["trainer.precision=bf16-mixed"], ["trainer.precision=16"], ["trainer.max_epochs=-1"],
        ["trainer.limit_train_batches=0.25"], ["trainer.limit_train_batches=3"], *[[o] for o in TINY_XRAY],
    ],  # fmt: skip
)
@pytest.mark.slow
def test_valid_configs_pass(overrides: list[str], tmp_path: Path):
    validate_config(_compose(tmp_path, *overrides))


def test_evaluate_export_and_main_check_values_first(tmp_path: Path):
    import hydra

    import medens  # noqa: F401
    from medens.evaluation.evaluate import evaluate
    from medens.export import export_checkpoints
    from medens.pipeline import run_pipeline

    # inside Hydra's initialisation: run_pipeline composes each stage's config itself, as under @hydra.main
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        ev = hydra.compose("evaluate", overrides=[f"paths.root_dir={tmp_path}", "ckpt_path=missing.pth", "data=xray",
                                                  "data.batch_size=-4", f"paths.output_dir={tmp_path}/ev"])  # fmt: skip
        with pytest.raises(ConfigError, match=r"data\.batch_size=-4: expected an integer >= 1"):
            evaluate(ev)
        ex = hydra.compose("export", overrides=[f"paths.root_dir={tmp_path}", "verify.batch_sizes=[1,0]",
                                                f"paths.output_dir={tmp_path}/ex"])  # fmt: skip
        with pytest.raises(ConfigError, match=r"verify\.batch_sizes=\[1, 0\]: expected a list of an integer >= 1"):
            export_checkpoints(ex)
        main = hydra.compose("main", overrides=[f"paths.root_dir={tmp_path}", "common_overrides=['data.batch_size=-4']",
                                                "pipeline=tiny", f"paths.output_dir={tmp_path}/main"])  # fmt: skip
        with pytest.raises(ConfigError, match=r"data\.batch_size=-4"):
            run_pipeline(main)  # refused before the cohort is generated
    _nothing_written(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_epochs=abc", "trainer.max_epochs='abc': expected an integer >= -1"),
        ("data.batch_size=-4", "data.batch_size=-4: expected an integer >= 1"),
    ],
)
def test_train_cli_refuses_bad_values(override: str, message: str, tmp_path: Path):
    proc = run_cli("train.py", *TINY_XRAY, "logger=none", override, root=tmp_path, timeout=300,
                   env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "ConfigError" in out and message in out, out[-3000:]
    _nothing_written(tmp_path)
