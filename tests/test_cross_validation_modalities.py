"""Cross-validation for X-ray and MRI with their trivial baselines (issue 16): the baselines, the MRI
postprocessing, patient-grouped folds whose inner validation never holds a held-out patient, and
`cross_validate` end to end on tiny synthetic sets (config-shrunk)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from medens.errors import ConfigError, DataError
from medens.evaluation.baselines import (
    PixelLogisticRegression,
    choose_flair_threshold,
    downsample_pixels,
    fit_pixel_baseline,
    flair_threshold_segment,
)
from medens.evaluation.cross_validation import cross_validate
from medens.metrics.segmentation import counted_dice, region_dice
from medens.models.mri_postprocess import choose_postprocess, postprocess
from tests.helpers import compose


def _bright_corner_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.5, 0.1, (n, 64, 64)).astype(np.float32)
    y = np.zeros((n, 2), np.float32)
    y[:, 0] = rng.random(n) < 0.4
    x[y[:, 0] == 1, :16, :16] += 0.15  # label 0: a brighter top-left corner; label 1: never present
    return x, y


def test_pixel_baseline_learns_what_32px_pixels_show():
    x, y = _bright_corner_images(240, 0)
    assert downsample_pixels(x[:3]).shape == (3, 32 * 32)
    model = PixelLogisticRegression(c=0.1).fit(x[:160], y[:160])
    p = model.predict_proba(x[160:])
    assert roc_auc_score(y[160:, 0], p[:, 0]) > 0.95
    assert np.all(p[:, 1] == 0.0)  # a label without positives scores its training prevalence
    chosen, table = fit_pixel_baseline(x[:120], y[:120], x[120:160], y[120:160], c_grid=(0.001, 0.1))
    assert set(table) == {"0.001", "0.1"} and chosen.c in (0.001, 0.1)
    assert chosen.c == float(max(table, key=lambda k: table[k]))
    with pytest.raises(ConfigError, match="C must be > 0"):
        PixelLogisticRegression(c=0)


def _brain_case(seed: int, tumour_value: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:24, :24, :24]
    brain = (zz - 12) ** 2 + (yy - 12) ** 2 + (xx - 12) ** 2 < 10**2
    tumour = (zz - 10) ** 2 + (yy - 13) ** 2 + (xx - 12) ** 2 < 4**2
    flair = rng.normal(0.0, 0.2, brain.shape)
    flair[tumour] += tumour_value
    flair[~brain] = 5.0  # bright skull outside the brain mask: never tumour
    return flair, brain, tumour


def test_flair_threshold_is_chosen_on_the_training_cases_only():
    train = [_brain_case(s) for s in (1, 2)]
    thr, table = choose_flair_threshold(*zip(*train, strict=True), grid=(0.2, 1.0, 1.6, 3.0))
    assert thr in (1.0, 1.6) and table["3.00"] < table[f"{thr:.2f}"]
    flair, brain, tumour = _brain_case(3)
    seg = flair_threshold_segment(flair, brain, thr)
    assert counted_dice(seg, tumour) > 0.95 and not seg[~brain].any()
    # a held-out case with another contrast does not move the threshold: only the training cases do
    thr2, _ = choose_flair_threshold(*zip(*train, strict=True), grid=(0.2, 1.0, 1.6, 3.0))
    assert thr2 == thr


def test_postprocess_brain_mask_and_connected_components():
    labels = np.zeros((20, 20, 20), np.int64)
    labels[5:12, 5:12, 5:12] = 2
    labels[7:9, 7:9, 7:9] = 3
    labels[16:18, 16:18, 16:18] = 1  # a small island (8 voxels)
    labels[0, 0, 0:3] = 2  # outside the brain
    brain = np.ones_like(labels, bool)
    brain[0] = False
    assert not postprocess(labels, brain, {"brain_only": True})[0].any()
    small_gone = postprocess(labels, brain, {"min_size": 9})
    assert small_gone[16:18, 16:18, 16:18].sum() == 0 and (small_gone[7:9, 7:9, 7:9] == 3).all()
    largest = postprocess(labels, None, {"largest_only": True})
    assert (largest > 0).sum() == 7**3
    assert np.array_equal(postprocess(labels, brain, {}), labels)
    with pytest.raises(ConfigError, match="unknown key"):
        postprocess(labels, brain, {"min_sise": 3})
    d = region_dice(largest, labels)
    assert d["et"] == 1.0 and 0.9 < d["wt"] < 1.0


def test_choose_postprocess_keeps_what_helps_on_validation():
    truth = np.zeros((20, 20, 20), np.int64)
    truth[5:12, 5:12, 5:12] = 2
    pred = truth.copy()
    pred[0, :, :] = 2  # false positives along the skull edge, outside the brain
    brain = np.ones_like(truth, bool)
    brain[0] = False
    spec, table = choose_postprocess([pred], [truth], [brain], [{}, {"brain_only": True}])
    assert spec["brain_only"] is True and table[1]["wt"] == 1.0 > table[0]["wt"]
    # nothing to remove: ties go to the simpler (first) candidate
    spec, _ = choose_postprocess([truth], [truth], [brain], [{}, {"brain_only": True}])
    assert spec["brain_only"] is False


TINY_XRAY_CV = [
    "experiment=xray",
    "data.source.generator.n_patients=15",
    "data.source.generator.images_per_patient=3",
    "data.source.generator.image_size=32",
    "data.cache.enabled=false",
    "cv.xray.n_folds=3",
    "cv.xray.image_size=16",
    "cv.xray.width=4",
    "cv.xray.epochs=2",
    "cv.xray.seeds=[0]",
    "cv.xray.pretrain=null",  # (pretraining has its own test)
    "cv.xray.min_positives=1",
    "cv.xray.baseline_c=[0.1]",
    "cv.bootstrap=20",
]


@pytest.mark.slow
def test_platt_on_inner_val_puts_two_models_on_one_scale_and_keeps_their_ranking():
    """`cv.xray.calibrate=platt`: two folds' models rank alike but on different probability scales; pooled,
    the AUC drops; after each is Platt-scaled on its own inner validation cases, pooling keeps the per-fold AUC."""
    from medens.evaluation.calibration import apply_calibration, fit_calibration

    names = ["a", "b"]

    def platt_on_inner_val(p_val: np.ndarray, y_val: np.ndarray, p_test: np.ndarray) -> np.ndarray:
        return apply_calibration(p_test, fit_calibration(p_val, y_val, names, "platt"), names)

    rng = np.random.default_rng(0)

    def fold(offset: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        y = (rng.random((400, 2)) < 0.3).astype(float)
        z = 1.5 * y + rng.normal(size=y.shape) + offset  # same signal, shifted logit scale
        p = 1 / (1 + np.exp(-z))
        return p[:200], y[:200], p[200:], y[200:]

    pooled_raw, pooled_cal, ys = [], [], []
    for offset in (-3.0, 3.0):
        p_val, y_val, p_test, y_test = fold(offset)
        y_val[:, 1] = 0.0  # label 1: no positive among the inner validation cases -> left on its scale
        cal = platt_on_inner_val(p_val, y_val, p_test)
        assert np.allclose(cal[:, 1], p_test[:, 1])
        assert roc_auc_score(y_test[:, 0], cal[:, 0]) == pytest.approx(roc_auc_score(y_test[:, 0], p_test[:, 0]))
        pooled_raw.append(p_test[:, 0])
        pooled_cal.append(cal[:, 0])
        ys.append(y_test[:, 0])
    y = np.concatenate(ys)
    raw, cal = roc_auc_score(y, np.concatenate(pooled_raw)), roc_auc_score(y, np.concatenate(pooled_cal))
    assert cal > raw + 0.05, (raw, cal)


def _folds_run_apart_then_merged(recipe: list[str], tmp_path: Path) -> tuple[list[str], dict]:
    """Folds 0 and 1-2 run as two processes would (`cv.folds`), then merged (`cv.merge`) under tmp_path/m."""
    parts = []
    for name, folds in (("a", "[0]"), ("b", "[1,2]")):
        cross_validate(compose("cross_validate", *recipe, f"cv.folds={folds}", root=tmp_path / name))
        parts.append(str(tmp_path / name / "run"))
    merged = cross_validate(compose("cross_validate", *recipe, f"cv.merge=[{','.join(parts)}]", root=tmp_path / "m"))
    return parts, merged


def test_xray_cross_validation_is_patient_grouped_and_merges(tmp_path: Path):
    """Folds partition the patients; each fold's inner validation holds none of its held-out patients;
    two runs over complementary folds merge into the report of the whole."""
    report = cross_validate(compose("cross_validate", *TINY_XRAY_CV, root=tmp_path))
    run = tmp_path / "run"
    pred = pd.read_csv(run / "cv_predictions.csv", dtype={"patient_id": str})
    n = report["n_images"]
    assert len(pred) == n > 30 and len(report["per_fold"]) == 3
    assert (pred.groupby("patient_id")["fold"].nunique() == 1).all()  # a patient in exactly one fold
    for row in report["per_fold"]:
        held_out = set(pred.loc[pred.fold == row["fold"], "patient_id"])
        assert held_out and not held_out & set(row["inner_val_patients"])
        assert row["n_train"] + row["n_inner_val"] + row["n_test"] == n
    assert 0.0 <= report["pooled_auc_model"] <= 1.0 and 0.0 <= report["pooled_auc_pixel_lr"] <= 1.0
    pc = report["paired_mean_auc_difference"]
    assert pc["value"] == pytest.approx(report["pooled_auc_model"] - report["pooled_auc_pixel_lr"])
    assert pc["n_patients"] == 15 and 0.0 <= pc["p_two_sided"] <= 1.0
    assert "| label | positives |" in (run / "cv_report.md").read_text()

    parts, merged = _folds_run_apart_then_merged(TINY_XRAY_CV, tmp_path)
    assert merged["pooled_auc_pixel_lr"] == pytest.approx(report["pooled_auc_pixel_lr"])
    assert merged["pooled_auc_model"] == pytest.approx(report["pooled_auc_model"])
    with pytest.raises(Exception, match="share folds"):
        cross_validate(compose("cross_validate", *TINY_XRAY_CV, f"cv.merge=[{parts[0]},{parts[0]}]",
                               root=tmp_path / "m2"))  # fmt: skip
    torn = tmp_path / "torn"  # a run whose report was cut short: the error names that file
    torn.mkdir()
    (torn / "cv_predictions.csv").write_bytes((Path(parts[1]) / "cv_predictions.csv").read_bytes())
    (torn / "cv_report.json").write_text((Path(parts[1]) / "cv_report.json").read_text()[:200])
    with pytest.raises(DataError, match=r"torn/cv_report\.json: unreadable cross-validation report"):
        cross_validate(compose("cross_validate", *TINY_XRAY_CV, f"cv.merge=[{parts[0]},{torn}]",
                               root=tmp_path / "m3"))  # fmt: skip


def test_stratified_patient_folds_keep_patients_whole_and_share_out_each_findings_positives():
    from medens.data.splits import patient_kfold

    rng = np.random.default_rng(0)
    pids, rows = [], []
    for p in range(60):  # 60 patients, 1-6 images each; finding 1 is rare and clustered in a few patients
        rare = p % 12 == 0
        for _ in range(int(rng.integers(1, 7))):
            pids.append(f"p{p}")
            rows.append([rng.random() < 0.3, rare and rng.random() < 0.8])
    y = np.array(rows, dtype=float)
    spreads = {}
    for name, labels in (("random", None), ("stratified", y)):
        folds = patient_kfold(pids, 5, seed=3, labels=labels)
        held = [set(np.array(pids)[f["val"]]) for f in folds]
        assert sum(len(h) for h in held) == 60 and not set.intersection(*held[:2])  # each patient once
        for f in folds:
            assert not set(np.array(pids)[f["val"]]) & set(np.array(pids)[f["train"]])
        counts = np.array([y[f["val"]].sum(0) for f in folds])
        assert (counts.sum(0) == y.sum(0)).all()
        spreads[name] = counts.max(0) - counts.min(0)
    assert (spreads["stratified"] <= spreads["random"]).all() and spreads["stratified"].sum() < spreads["random"].sum()
    assert patient_kfold(pids, 5, seed=3, labels=y) == patient_kfold(pids, 5, seed=3, labels=y)  # seeded


def _pneumonia_like_npz(path: Path, n: int = 40) -> Path:
    """A MedMNIST-format .npz (uint8 28x28 images, [N, 1] labels) whose label is a bright centre."""
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 120, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 2).astype(np.uint8)[:, None]
    imgs[labels[:, 0] == 1, 10:18, 10:18] = 250
    half = n // 2
    np.savez(path, train_images=imgs[:half], train_labels=labels[:half], val_images=imgs[half:],
             val_labels=labels[half:], test_images=imgs[:2], test_labels=labels[:2])  # fmt: skip
    return path


def test_xray_cnn_fine_tunes_from_a_backbone_pretrained_on_other_chest_xrays(tmp_path: Path):
    import torch

    from medens.errors import DataError
    from medens.evaluation.cv_xray import DEFAULTS, load_pretraining_images, pretrain_backbone, train_cnn

    npz = _pneumonia_like_npz(tmp_path / "pneumonia.npz")
    x, y = load_pretraining_images(npz, 16)
    assert x.shape == (40, 16, 16) and y.shape == (40, 1) and 0.0 <= x.min() < x.max() <= 1.0
    opts = {**DEFAULTS, "image_size": 16, "width": 4, "batch_size": 8, "pretrain": str(npz), "pretrain_epochs": 2}
    backbone = pretrain_backbone(opts, seed=0)
    assert backbone and not any(k.startswith("head.") for k in backbone)
    rng = np.random.default_rng(1)
    xs, ys = rng.random((24, 16, 16), dtype=np.float32), (rng.random((24, 14)) < 0.3).astype(np.float32)
    # learning rate 0: the fine-tuned network is the pretrained one (convolutions), with a new 14-label head
    still = {**opts, "lr": 0.0, "epochs": 1}
    net, _ = train_cnn(xs[:16], ys[:16], xs[16:], ys[16:], still, seed=3, backbone=backbone)
    assert torch.equal(net.stem[0].weight, backbone["stem.0.weight"])
    assert net.head[1].out_features == 14
    fresh, _ = train_cnn(xs[:16], ys[:16], xs[16:], ys[16:], still, seed=3)
    assert not torch.equal(fresh.stem[0].weight, backbone["stem.0.weight"])
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"bad.npz: not a MedMNIST .npz"):
        load_pretraining_images(tmp_path / "bad.npz", 16)


TINY_MRI_CV = [
    "experiment=mri",
    "data.source.generator.n_cases=3",
    "data.source.generator.shape=[40,40,24]",
    "cv.mri.steps=2",
    "cv.mri.batch_size=2",
    "cv.mri.patch=[32,32]",
    "cv.mri.net.channels=[4,8]",
    "cv.mri.net.strides=[2]",
    "cv.mri.flair_grid=[1.0,1.5]",
    "cv.bootstrap=20",
]


@pytest.mark.slow
def test_mri_leave_one_patient_out_against_flair(tmp_path: Path):
    report = cross_validate(compose("cross_validate", *TINY_MRI_CV, root=tmp_path))
    rows = report["per_fold"]
    assert [r["fold"] for r in rows] == [0, 1, 2]
    assert len({r["case_id"] for r in rows}) == 3  # each patient held out once
    for r in rows:
        assert r["case_id"] not in r["train_cases"] and len(r["train_cases"]) == 2
        assert r["flair_threshold"] in (1.0, 1.5)
        assert all(0.0 <= r["dice_model"][k] <= 1.0 for k in ("wt", "tc", "et"))
        assert set(r["postprocess"]) == {"brain_only", "min_size", "largest_only"}
        assert all(0.0 <= r["dice_model_no_tta"][k] <= 1.0 for k in ("wt", "tc", "et"))
    assert report["mean_dice_model_no_tta"]["wt"] == pytest.approx(np.mean([r["dice_model_no_tta"]["wt"] for r in rows]))
    pc = report["paired_wt_dice"]
    assert pc["n_cases"] == 3 and "p_value" in pc["wilcoxon"]
    assert report["objective"] == pytest.approx(np.mean([r["dice_model"]["wt"] for r in rows]))
    saved = json.loads((tmp_path / "run" / "cv_report.json").read_text())
    assert saved["folds_model_better_wt"] == report["folds_model_better_wt"]
    assert "WT FLAIR" in (tmp_path / "run" / "cv_report.md").read_text()
    with pytest.raises(ConfigError, match="cv.mri"):
        cross_validate(compose("cross_validate", *TINY_MRI_CV, "+cv.mri.stepz=3", root=tmp_path / "bad"))
    parts, merged = _folds_run_apart_then_merged(TINY_MRI_CV, tmp_path)
    assert merged["mean_dice_model"] == pytest.approx(report["mean_dice_model"])
    assert merged["merged_from"] == parts and "CPU time" in (tmp_path / "m" / "run" / "cv_report.md").read_text()
    with pytest.raises(DataError, match="hold out the same case twice"):
        cross_validate(compose("cross_validate", *TINY_MRI_CV, f"cv.merge=[{parts[1]},{parts[1]}]",
                               root=tmp_path / "m2"))  # fmt: skip
