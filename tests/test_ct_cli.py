"""The CT modality as users run it: resume by override, evaluation, cross-validation on lidc_voi, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from medens.checkpoint import load_checkpoint
from medens.data.ct.synthetic import generate_luna16_synthetic
from tests.helpers import TINY_CT, assert_same_training_state, cli_ok, run_cli

BASE = ["experiment=ct", *TINY_CT, "logger=none"]
#: One intra-op thread: tiny 3D nets gain nothing from more, and OpenMP threads spinning on a shared CPU
#: can slow a run tenfold.
THREADS = {"OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.slow  # every test trains (or fails to) through the CLI


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 4-epoch run with a checkpoint every epoch (tested on its best at the end)."""
    root = tmp_path_factory.mktemp("ct_cli")
    out = cli_ok(run_cli("train.py", *BASE, "trainer.max_epochs=4", "trainer.deterministic=true",
                      "callbacks.model_checkpoint_periodic.every_n_epochs=1", f"paths.saved_models_dir={root}/full",
                      root=root, env=THREADS))  # fmt: skip
    return root, out


def test_resume_by_cli_override_matches_uninterrupted_run(full_run):
    root, _ = full_run
    epoch2 = root / "full" / "ct" / "3dcnn_epoch_2.pth"
    assert epoch2.is_file()
    out = cli_ok(run_cli("train.py", *BASE, "trainer.max_epochs=4", "trainer.deterministic=true", "test=false",
                      "callbacks.model_checkpoint_periodic.every_n_epochs=1", f"paths.saved_models_dir={root}/resumed",
                      f"ckpt_path={epoch2}", root=root, env=THREADS))  # fmt: skip
    assert "Restored all states from the checkpoint" in out
    resumed = root / "resumed" / "ct"
    # continued at epoch 3: epochs 1-2 were not re-run
    assert sorted(p.name for p in resumed.glob("*_epoch_*.pth")) == ["3dcnn_epoch_3.pth", "3dcnn_epoch_4.pth"]
    history = json.loads((resumed / "training_history.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    a = load_checkpoint(root / "full" / "ct" / "3dcnn_epoch_4.pth")
    b = load_checkpoint(resumed / "3dcnn_epoch_4.pth")
    assert_same_training_state(a, b)
    assert a["operating_point"]["threshold_at_target_sensitivity"] == pytest.approx(
        b["operating_point"]["threshold_at_target_sensitivity"]
    )


def test_evaluate_writes_auc_roc_and_sensitivity_specificity_table(full_run):
    root, out = full_run
    test_auc = float(re.search(r"│\s+test/auc\s+│\s+([0-9.]+)", out).group(1))
    ckpt = root / "full" / "ct" / "3dcnn_best.pth"
    cli_ok(run_cli("evaluate.py", f"ckpt_path={ckpt}", root=root, env=THREADS))
    (run,) = list((root / "outputs" / "evaluate" / "runs").iterdir())
    report = json.loads((run / "metrics.json").read_text())
    assert list(report["auc"]) == ["malignant"] and report["split"] == "test"
    assert report["mean_auc"] == pytest.approx(
        test_auc, abs=1e-4
    )  # same cases and weights as training's test
    sources = [r["source"] for r in report["operating_points"]]
    assert sources[:2] == ["configured threshold", "90% sensitivity on validation"]
    assert sources[-1] == "90% sensitivity on these cases" and "grid" in sources
    validation_threshold = load_checkpoint(ckpt)["operating_point"]["threshold_at_target_sensitivity"]
    assert report["operating_points"][1]["threshold"] == pytest.approx(validation_threshold)
    assert all(
        0.0 <= r["sensitivity"] <= 1.0 and 0.0 <= r["specificity"] <= 1.0 for r in report["operating_points"]
    )
    assert report["operating_points"][-1]["sensitivity"] >= 0.9
    table = pd.read_csv(run / "operating_points.csv")
    assert list(table.columns) == ["source", "threshold", "sensitivity", "specificity"]
    assert (run / "roc_curves.png").stat().st_size > 5000
    assert (run / "predictions.csv").read_text().count("\n") == report["n_cases"] + 1


@pytest.mark.usefixtures("samples_dir")
def test_cross_validation_short_on_lidc_voi(tmp_path, samples_dir: Path):
    """The pipeline (one fold, a few steps) on the real crops; the figure itself is the full run's."""
    cli_ok(run_cli("cross_validate.py", "experiment=ct_lidc_voi", "cv.folds=[0]", "cv.bootstrap=50",
                "trainer.max_epochs=1", "trainer.limit_train_batches=3", "data.patch_size=16", "model.tta_flips=false",
                "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", root=tmp_path,
                env={"MEDENS_SAMPLES": str(samples_dir), **THREADS}))  # fmt: skip
    (run,) = list((tmp_path / "outputs" / "ct_lidc_voi" / "cv").iterdir())
    report = json.loads((run / "cv_report.json").read_text())
    (fold,) = report["per_fold"]
    assert fold["fold"] == 0 and 0.0 <= fold["auc_model"] <= 1.0
    pred = pd.read_csv(run / "cv_predictions.csv")
    assert len(pred) == fold["n_cases"] == report["n_cases"] > 100
    # the baseline is scored on exactly the held-out cases the model was scored on
    assert fold["auc_diameter_mm"] == pytest.approx(roc_auc_score(pred.label, pred.diameter_mm))
    assert fold["auc_model"] == pytest.approx(roc_auc_score(pred.label, pred.prob))
    # the 90%-sensitivity thresholds come from the inner validation split, for model and baseline alike
    at_target = fold["held_out_at_target_diameter_mm"]
    assert at_target["sensitivity"] == pytest.approx(pred[pred.label == 1].pred_diameter_mm.mean())
    assert set(report["pooled_at_target_model"]) == {"sensitivity", "specificity"}
    ckpt = load_checkpoint(run / "fold_0" / "saved_models" / "ct" / "3dcnn_best.pth")
    data = ckpt["hyperparameters"]["data"]
    assert data["n_folds"] == 5 and data["fold"] == 0 and data["inner_val_fraction"] > 0
    assert ckpt["hyperparameters"]["io_contract"]["channels"] == ["image", "mask"]
    assert "| 0 |" in (run / "cv_report.md").read_text()
    assert not (tmp_path / "saved_models").exists(), "folds write under the run folder, never saved_models/"


@pytest.mark.usefixtures("samples_dir")
def test_cross_validation_seed_ensemble_keeps_the_folds(tmp_path, samples_dir: Path):
    cli_ok(run_cli("cross_validate.py", "experiment=ct_lidc_voi", "cv.folds=[1]", "cv.seeds=[1,2]", "cv.bootstrap=0",
                "trainer.max_epochs=1", "trainer.limit_train_batches=1", "data.patch_size=16", "model.tta_flips=false",
                "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", root=tmp_path,
                env={"MEDENS_SAMPLES": str(samples_dir), **THREADS}))  # fmt: skip
    (run,) = list((tmp_path / "outputs" / "ct_lidc_voi" / "cv").iterdir())
    report = json.loads((run / "cv_report.json").read_text())
    (fold,) = report["per_fold"]
    assert report["seeds"] == [1, 2] and [m["seed"] for m in fold["models"]] == [1, 2]
    a, b = (load_checkpoint(run / "fold_1" / f"seed_{s}" / "saved_models" / "ct" / "3dcnn_best.pth") for s in (1, 2))
    assert (a["hyperparameters"]["seed"], b["hyperparameters"]["seed"]) == (1, 2)
    assert a["hyperparameters"]["data"]["seed"] == b["hyperparameters"]["data"]["seed"] == 42  # same folds
    assert not torch.equal(a["model_state_dict"]["fc.weight"], b["model_state_dict"]["fc.weight"])
    assert "mean probability of 2 seeds" in (run / "cv_report.md").read_text()


def test_bad_luna16_input_fails_clearly_or_is_skipped_and_counted(tmp_path):
    data = generate_luna16_synthetic(tmp_path / "broken", n_patients=8, nodules_per_patient=4, seed=1,
                                     scan_shape=(64, 64, 48))  # fmt: skip
    ann, labels = pd.read_csv(data / "annotations.csv"), pd.read_csv(data / "labels.csv")
    ghost = {**ann.iloc[0].to_dict(), "seriesuid": "1.2.3.no.such.scan"}
    pd.concat([ann, pd.DataFrame([ghost])]).to_csv(data / "annotations.csv", index=False)
    pd.concat([labels, pd.DataFrame([{**labels.iloc[0].to_dict(), "seriesuid": ghost["seriesuid"]}])]).to_csv(
        data / "labels.csv", index=False
    )
    truncated_uid = ann.seriesuid.iloc[-1]
    raw = data / "subset0" / f"{truncated_uid}.raw"
    raw.write_bytes(raw.read_bytes()[: raw.stat().st_size // 3])
    common = [
        *BASE,
        f"data.root={data}",
        "data.source.generate_if_missing=false",
        "trainer.max_epochs=1",
        "test=false",
    ]

    proc = run_cli("train.py", *common, root=tmp_path, env=THREADS)
    assert proc.returncode != 0
    assert "series 1.2.3.no.such.scan (row" in proc.stderr and "has no scan" in proc.stderr

    out = cli_ok(run_cli("train.py", *common, "data.on_error=skip", root=tmp_path, env=THREADS))
    n_truncated = int((ann.seriesuid == truncated_uid).sum())
    skipped = int(re.search(r"(\d+) skipped \(on_error=skip\)", out).group(1))
    assert skipped == 1 + n_truncated
    assert "truncated" in out and "has no scan" in out
