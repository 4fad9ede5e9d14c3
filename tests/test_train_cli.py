"""The Hydra app as users run it: resume by override, DDP on CPU, sweeps, Optuna, evaluation, config errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from medens.checkpoint import load_checkpoint
from tests.helpers import TINY_XRAY, assert_same_training_state, cli_ok, run_cli

BASE = ["experiment=xray", *TINY_XRAY]
pytestmark = pytest.mark.slow  # every test starts the Hydra app as a process (most of them train)


def test_resume_by_cli_override_matches_uninterrupted_run(tmp_path):
    common = [*BASE, "trainer.max_epochs=7", "trainer.deterministic=true", "test=false", "logger=none",
              "callbacks.model_checkpoint_periodic.every_n_epochs=1"]  # fmt: skip
    cli_ok(run_cli("train.py", *common, f"paths.saved_models_dir={tmp_path}/full", root=tmp_path))
    epoch5 = tmp_path / "full" / "xray" / "resnet18_epoch_5.pth"
    assert epoch5.is_file()
    out = cli_ok(run_cli("train.py", *common, f"paths.saved_models_dir={tmp_path}/resumed", f"ckpt_path={epoch5}", root=tmp_path))
    assert "Restored all states from the checkpoint" in out

    resumed = tmp_path / "resumed" / "xray"
    # continued at epoch 6: epochs 1-5 were never re-run, so no files for them
    assert sorted(p.name for p in resumed.glob("*_epoch_*.pth")) == ["resnet18_epoch_6.pth", "resnet18_epoch_7.pth"]
    history = json.loads((resumed / "training_history.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6, 7]
    full_hist = json.loads((tmp_path / "full" / "xray" / "training_history.json").read_text())["epochs"]
    assert [h["train/loss"] for h in history[:5]] == [h["train/loss"] for h in full_hist[:5]]

    a = load_checkpoint(tmp_path / "full" / "xray" / "resnet18_epoch_7.pth")
    b = load_checkpoint(resumed / "resnet18_epoch_7.pth")
    assert_same_training_state(a, b)
    es_a = next(v for k, v in a["lightning"]["callbacks"].items() if k.startswith("EarlyStopping"))
    es_b = next(v for k, v in b["lightning"]["callbacks"].items() if k.startswith("EarlyStopping"))
    assert es_a["wait_count"] == es_b["wait_count"] and float(es_a["best_score"]) == pytest.approx(float(es_b["best_score"]))


def _rank_writes(out: str) -> list[str]:
    return re.findall(r"medens checkpoint written by rank (\d+)", out)


def test_ddp_sim_single_run(tmp_path):
    out = cli_ok(run_cli("train.py", *BASE, "trainer=ddp_sim", "trainer.max_epochs=2", root=tmp_path))
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out
    writes = _rank_writes(out)
    assert writes and set(writes) == {"0"}, "checkpoints must be written by rank 0 only"
    folder = tmp_path / "saved_models" / "xray"
    assert (folder / "resnet18_best.pth").is_file()
    assert len(json.loads((folder / "training_history.json").read_text())["epochs"]) == 2
    runs = list((tmp_path / "outputs" / "xray" / "runs").iterdir())
    assert len(runs) == 1, f"stray output folders: {runs}"
    assert not (tmp_path / "outputs" / "xray" / "multiruns").exists()
    ckpt = load_checkpoint(folder / "resnet18_best.pth")
    assert ckpt["hyperparameters"]["trainer"]["devices"] == 2


def test_ddp_sim_inside_multirun_sweep(tmp_path):
    out = cli_ok(run_cli("train.py", "-m", *BASE, "trainer=ddp_sim", "trainer.max_epochs=1", "test=false",
                      "model.optimizer.lr=0.001,0.0003", root=tmp_path))  # fmt: skip
    assert set(_rank_writes(out)) == {"0"}
    (sweep,) = list((tmp_path / "outputs" / "xray" / "multiruns").iterdir())
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(".")) == ["0", "1", "multirun.yaml"]
    lrs = set()
    for job in ("0", "1"):
        ckpt = load_checkpoint(sweep / job / "saved_models" / "xray" / "resnet18_best.pth")
        lrs.add(ckpt["hyperparameters"]["model"]["optimizer"]["lr"])
    assert lrs == {0.001, 0.0003}
    assert not (tmp_path / "saved_models").exists(), "sweep jobs must not write the top-level saved_models/"
    assert not (tmp_path / "outputs" / "xray" / "runs").exists()


def test_multirun_jobs_do_not_overwrite_each_other(tmp_path):
    cli_ok(run_cli("train.py", "-m", *BASE, "trainer.max_epochs=1", "test=false", "seed=1,2", root=tmp_path))
    (sweep,) = list((tmp_path / "outputs" / "xray" / "multiruns").iterdir())
    a = load_checkpoint(sweep / "0" / "saved_models" / "xray" / "resnet18_best.pth")
    b = load_checkpoint(sweep / "1" / "saved_models" / "xray" / "resnet18_best.pth")
    assert (a["hyperparameters"]["seed"], b["hyperparameters"]["seed"]) == (1, 2)
    assert not torch.equal(a["model_state_dict"]["fc.weight"], b["model_state_dict"]["fc.weight"])


def test_optuna_sweep_two_trials_returns_best_val_auc(tmp_path):
    cli_ok(run_cli("train.py", "hparams_search=xray_optuna", "hydra.sweeper.n_trials=2",
                "hydra.sweeper.sampler.n_startup_trials=2", *BASE, "trainer.max_epochs=1", "test=false",
                root=tmp_path))  # fmt: skip
    (sweep,) = list((tmp_path / "outputs" / "xray" / "multiruns").iterdir())
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    bests = [load_checkpoint(sweep / j / "saved_models" / "xray" / "resnet18_best.pth")["best_metric"] for j in "01"]
    assert result["best_value"] == pytest.approx(max(bests))
    assert 1e-5 <= result["best_params"]["model.optimizer.lr"] <= 1e-2


def test_evaluate_writes_per_class_auc_and_roc(tmp_path):
    out = cli_ok(run_cli("train.py", *BASE, "trainer.max_epochs=2", root=tmp_path))
    ckpt = tmp_path / "saved_models" / "xray" / "resnet18_best.pth"
    test_auc = float(re.search(r"│\s+test/auc\s+│\s+([0-9.]+)", out).group(1))
    cli_ok(run_cli("evaluate.py", f"ckpt_path={ckpt}", root=tmp_path))
    (run,) = list((tmp_path / "outputs" / "evaluate" / "runs").iterdir())
    report = json.loads((run / "metrics.json").read_text())
    assert set(report["auc"]) >= {"Atelectasis", "Hernia"} and report["split"] == "test"
    assert report["mean_auc"] == pytest.approx(test_auc, abs=1e-4)  # same cases, same weights as training's test
    assert (run / "roc_curves.png").stat().st_size > 5000
    assert (run / "predictions.csv").read_text().count("\n") == report["n_cases"] + 1


def test_unknown_key_on_cli_is_an_error(tmp_path):
    proc = run_cli("train.py", *BASE, "model.optimizer.lrr=0.1", root=tmp_path)
    assert proc.returncode != 0 and "model.optimizer.lrr" in proc.stderr


def test_unknown_key_in_a_yaml_file_is_an_error_naming_it(tmp_path):
    extra = tmp_path / "myconf" / "experiment"
    extra.mkdir(parents=True)
    (extra / "typo.yaml").write_text("# @package _global_\nmodel:\n  optimizer:\n    weight_decy: 0.1\n")
    proc = run_cli("train.py", "experiment=typo", *TINY_XRAY, f"hydra.searchpath=[file://{tmp_path}/myconf]", root=tmp_path)
    assert proc.returncode != 0
    assert "unknown config key 'model.optimizer.weight_decy'" in proc.stderr and "weight_decay" in proc.stderr
    (extra / "top.yaml").write_text("# @package _global_\ntrainr:\n  max_epochs: 3\n")
    proc = run_cli("train.py", "experiment=top", *TINY_XRAY, f"hydra.searchpath=[file://{tmp_path}/myconf]", root=tmp_path)
    assert proc.returncode != 0 and "unknown config key 'trainr'" in proc.stderr and "'trainer'" in proc.stderr


def test_debug_fast_dev_run(tmp_path):
    out = cli_ok(run_cli("train.py", *BASE, "debug=fdr", root=tmp_path))
    assert "Running in `fast_dev_run` mode" in out


@pytest.mark.usefixtures("samples_dir")
def test_real_nih_samples_experiment_short(tmp_path, samples_dir: Path):
    out = cli_ok(run_cli("train.py", "experiment=xray_samples", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
                      "data.image_size=64", "trainer.enable_progress_bar=false", root=tmp_path,
                      env={"MEDENS_SAMPLES": str(samples_dir)}))  # fmt: skip
    assert "test/auc" in out
    ckpt = load_checkpoint(tmp_path / "saved_models" / "xray" / "resnet18_best.pth")
    assert ckpt["hyperparameters"]["data"]["root"] == f"{samples_dir}/nih_cxr14"
