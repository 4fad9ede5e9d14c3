"""MRI calibration (voxel sample, region probabilities, softmax temperature) and subgroups, on tiny synthetic data.

The unit tests use arrays built here; the slow end-to-end test evaluates the session's tiny U-Net with
`calibration=temperature`, a `data.case_table` and `subgroups=`, and exports it.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from medens.data.mri.brats import REGIONS
from medens.errors import ConfigError
from medens.evaluation.calibration import expected_calibration_error
from medens.evaluation.external import merge_data_config, read_case_table
from medens.evaluation.statistics import PatientBootstrap, mean_intervals
from medens.evaluation.subgroups import segmentation_subgroup_metrics
from medens.evaluation.voxel_calibration import (
    VoxelSample,
    fit_temperature,
    region_probabilities,
    region_targets,
    reliability_report,
    softmax,
    temperature_of,
)


def _case(rng: np.random.Generator, shape=(12, 12, 10), classes: int = 4):
    image = np.zeros((4, *shape), np.float32)
    image[:, 2:-2, 2:-2, 1:-1] = rng.normal(size=(4, shape[0] - 4, shape[1] - 4, shape[2] - 2))  # brain box
    label = rng.integers(0, classes, size=shape)
    logits = rng.normal(size=(classes, *shape)).astype(np.float32)
    return logits, label, image


def test_voxel_sample_takes_brain_voxels_only_seeded_per_case_whatever_the_order():
    rng = np.random.default_rng(0)
    cases = {f"c{i}": _case(rng) for i in range(3)}
    brain = (cases["c0"][2] != 0).any(0)
    a, b = VoxelSample(100, seed=3), VoxelSample(100, seed=3)
    for cid in ["c0", "c1", "c2"]:
        a.add(cid, torch.from_numpy(cases[cid][0]), cases[cid][1], torch.from_numpy(cases[cid][2]))
    for cid in ["c2", "c0", "c1"]:
        b.add(cid, *cases[cid])
    b.add("unlabelled", cases["c0"][0], None, cases["c0"][2])  # no ground truth: not sampled
    assert len(a) == len(b) == 300 and a.n_cases == b.n_cases == 3
    rows_a = {tuple(r) for r in np.c_[a.logits, a.labels]}
    rows_b = {tuple(r) for r in np.c_[b.logits, b.labels]}
    assert rows_a == rows_b  # the same voxels of each case, whatever the case order
    # every sampled voxel of c0 is a brain voxel: its logits are among the brain voxels' logits
    brain_rows = {tuple(r) for r in cases["c0"][0].reshape(4, -1)[:, brain.reshape(-1)].T}
    c0 = np.asarray(a.case_ids) == "c0"
    assert {tuple(r) for r in a.logits[c0]} <= brain_rows
    small = VoxelSample(10_000, seed=0)
    small.add("c0", *cases["c0"])
    assert len(small) == int(brain.sum())  # fewer brain voxels than the cap: all of them
    with pytest.raises(ConfigError, match="calibration_voxels_per_case"):
        VoxelSample(0)


def test_region_probabilities_are_one_vs_rest_sums_of_the_softmax():
    logits = np.array([[2.0, 0.0, 1.0, -1.0], [0.0, 0.0, 0.0, 3.0]])
    p = softmax(logits)
    got = region_probabilities(logits, REGIONS)
    np.testing.assert_allclose(got[:, 0], p[:, 1:].sum(1))  # WT = 1, 2, 3
    np.testing.assert_allclose(got[:, 1], p[:, [1, 3]].sum(1))  # TC = 1, 3
    np.testing.assert_allclose(got[:, 2], p[:, 3])  # ET = 3
    np.testing.assert_array_equal(region_targets(np.array([0, 2, 3]), REGIONS), [[0, 0, 0], [1, 0, 0], [1, 1, 1]])


def test_temperature_recovers_overconfidence_and_keeps_every_label():
    rng = np.random.default_rng(1)
    z = rng.normal(scale=2.0, size=(20_000, 4))
    labels = (rng.random((len(z), 1)) > np.cumsum(softmax(z), axis=1)).sum(axis=1).clip(0, 3)  # drawn from softmax(z)
    logits = 2.5 * z  # an over-confident network: the true temperature is 2.5
    fitted = fit_temperature(logits, labels)
    assert fitted["temperature"] == pytest.approx(2.5, rel=0.08)
    assert fitted["nll_after"] < fitted["nll_before"]
    t = fitted["temperature"]
    np.testing.assert_array_equal(softmax(logits / t).argmax(1), logits.argmax(1))  # label map unchanged

    sample = VoxelSample(10**6)
    sample._logits, sample._labels, sample._cases, sample.n_cases = [logits], [labels], ["c"] * len(labels), 1
    probs, targets, before = reliability_report(sample, REGIONS, 1.0)
    after = reliability_report(sample, REGIONS, t)[2]
    for i, r in enumerate(("WT", "TC", "ET")):
        # ECE by the classifiers' own definition (equal-width bins), then a direct numpy reference
        assert before[r]["ece"] == pytest.approx(expected_calibration_error(probs[:, i], targets[:, i]))
        bins = np.clip(np.ceil(probs[:, i] * 10).astype(int) - 1, 0, 9)
        ref = sum(abs(targets[bins == b, i].mean() - probs[bins == b, i].mean()) * (bins == b).sum()
                  for b in range(10) if (bins == b).any()) / len(bins)  # fmt: skip
        assert before[r]["ece"] == pytest.approx(ref, abs=1e-9)
        assert before[r]["brier"] == pytest.approx(np.mean((probs[:, i] - targets[:, i]) ** 2))
        assert after[r]["ece"] < before[r]["ece"]
    with pytest.raises(ConfigError, match="two classes"):
        fit_temperature(logits[:5], np.zeros(5, int))


def test_temperature_of_reads_segmenter_calibrations_and_refuses_classifier_ones():
    assert temperature_of(None) == 1.0
    assert temperature_of({"method": "temperature", "kind": "softmax_temperature", "temperature": 1.7}) == 1.7
    with pytest.raises(ConfigError, match="softmax_temperature"):
        temperature_of({"method": "platt", "outputs": {"WT": {"scale": 1, "bias": 0}}})
    with pytest.raises(ConfigError, match="> 0"):
        temperature_of({"kind": "softmax_temperature", "temperature": -1.0})


def test_segmentation_subgroups_use_patient_bootstrap_and_the_minimum_group_size():
    rng = np.random.default_rng(2)
    cases = [f"c{i}" for i in range(12)]
    patients = [f"p{i // 2}" for i in range(12)]  # two cases per patient
    attrs = pd.DataFrame({"grade": ["HGG"] * 8 + ["LGG"] * 4, "Age": [30, 70] * 6}, index=cases)
    values = {"dice_wt": rng.uniform(0.5, 0.9, 12), "hd95_wt": rng.uniform(1, 9, 12)}
    out = segmentation_subgroup_metrics(values, cases, patients, attrs, ["grade", "Age"], "t.csv",
                                        min_patients=3, n_resamples=200, seed=5)  # fmt: skip
    hgg, lgg = out["grade"]["HGG"], out["grade"]["LGG"]
    assert (hgg["n_patients"], hgg["n_cases"], hgg["too_small"]) == (4, 8, False)
    assert lgg["too_small"] and lgg["n_patients"] == 2 and "fewer than 3 patients" in lgg["reason"]
    m = np.arange(12) < 8
    ref = mean_intervals({k: v[m] for k, v in values.items()}, PatientBootstrap(np.asarray(patients)[m], 200, 5))
    assert hgg["metrics"] == ref  # the same resamples as a direct computation on the group
    assert set(out["Age"]) == {"30", "70"}  # two values: categories, not bands
    with pytest.raises(ConfigError, match="columns: grade, Age"):
        segmentation_subgroup_metrics(values, cases, patients, attrs, ["Sex"], "t.csv")


def test_case_table_matches_cases_or_patients_and_never_reaches_the_datamodule(tmp_path):
    path = tmp_path / "survival.csv"
    pd.DataFrame({"Brats20ID": ["BraTS20_001", "BraTS20_002"], "Age": ["61.2", "48"]}).to_csv(path, index=False)
    table = read_case_table(path, ["BraTS20_002", "BraTS20_001", "BraTS20_003"], ["a", "b", "c"])
    assert table.loc["BraTS20_002", "Age"] == "48" and "BraTS20_003" not in table.index
    by_patient = tmp_path / "patients.csv"
    pd.DataFrame({"patient": ["p1", "p2"], "sex": ["F", "M"]}).to_csv(by_patient, index=False)
    table = read_case_table(by_patient, ["c1", "c2", "c3"], ["p1", "p1", "p2"])
    assert table["sex"].to_dict() == {"c1": "F", "c2": "F", "c3": "M"}
    with pytest.raises(ConfigError, match="no column holds the evaluated case or patient ids.*columns: patient, sex"):
        read_case_table(by_patient, ["x"], ["y"])
    ckpt = {"hyperparameters": {"data": {"_target_": "medens.data.mri.datamodule.BraTSDataModule", "root": "r"}}}
    assert merge_data_config(ckpt, OmegaConf.create({"case_table": str(path)}), "ck.pth", "test") is None
    merged = merge_data_config(ckpt, OmegaConf.create({"case_table": str(path), "val_fraction": 0.5}), "ck.pth", "test")
    assert "case_table" not in merged and merged.val_fraction == 0.5 and merged.root == "r"


# ----------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_mri_evaluation_fits_a_temperature_reports_calibration_and_subgroups_and_exports_it(tiny_models, tmp_path):
    from tests.helpers import cli_ok, copy_root, run_cli

    env = {"OMP_NUM_THREADS": "1"}
    copy_root(tiny_models, tmp_path)  # the session's tiny U-Net (one epoch on a few synthetic cases)
    ckpt = tmp_path / "saved_models" / "mri" / "unet_best.pth"
    cases = sorted(p.name for p in (tmp_path / "data").rglob("*") if p.is_dir() and any(p.glob("*_flair.nii*")))
    table = tmp_path / "cases.csv"
    pd.DataFrame({"case": cases, "site": ["A", "B"] * (len(cases) // 2) + ["A"] * (len(cases) % 2)}).to_csv(
        table, index=False
    )
    cli_ok(run_cli("evaluate.py", f"ckpt_path={ckpt}", "split=all", "calibration=temperature",
                   f"data.case_table={table}", "subgroups=[site]", "subgroup_min_patients=2",
                   "bootstrap.n_resamples=50", "+calibration_voxels_per_case=3000", "hydra.run.dir=outputs/ev",
                   root=tmp_path, env=env))  # fmt: skip
    run = tmp_path / "outputs" / "ev"
    report = json.loads((run / "metrics.json").read_text())
    cal = report["calibration"]
    assert cal["applied"]["kind"] == "softmax_temperature" and cal["applied"]["temperature"] > 0
    assert cal["sampling"]["voxels_per_case"] == 3000 and cal["sampling"]["cases"] == report["n_labelled"]
    assert set(cal["metrics"]) == {"WT", "TC", "ET"} and set(cal["uncalibrated"]) == {"WT", "TC", "ET"}
    assert all(0 <= v["ece"] <= 1 and 0 <= v["brier"] <= 1 for v in cal["metrics"].values())
    stored = json.loads((ckpt.parent / "unet_best.calibration.json").read_text())
    assert stored["temperature"] == cal["applied"]["temperature"] and stored["fitted_on"]["split"] == "val"
    groups = report["subgroups"]["site"]
    assert set(groups) == {"A", "B"} and sum(g["n_cases"] for g in groups.values()) == report["n_labelled"]
    assert all(g["too_small"] or g["metrics"]["dice_wt"]["value"] is not None for g in groups.values())
    pred = pd.read_csv(run / "predictions.csv")
    assert {"case_id", "patient_id", "dice_wt", "hd95_wt", "site"} <= set(pred.columns)
    html = (run / "report.html").read_text()
    for heading in ("Per case", "Voxel calibration per region", "Subgroups: site", "Reliability diagram"):
        assert heading in html
    # the temperature travels to the export manifest (what serving applies)
    cli_ok(run_cli("export.py", "targets=[mri_torchscript]", root=tmp_path, env=env))
    manifest = json.loads((tmp_path / "saved_models" / "exports" / "manifest.json").read_text())
    entry = manifest["exports"]["mri_torchscript"]["calibration"]
    assert entry["kind"] == "softmax_temperature" and entry["temperature"] == stored["temperature"]


def test_model_card_shows_mri_subgroups_by_dice_and_voxel_calibration():
    from medens.evaluation.model_card import render_model_card

    ci = {"value": 0.8, "ci_low": 0.7, "ci_high": 0.9}
    report = {
        "split": "all", "data": "/ext", "n_cases": 12, "n_patients": 12, "intervals": {"dice_wt": ci},
        "subgroups": {"grade": {"HGG": {"n_patients": 10, "n_cases": 10, "too_small": False,
                                        "metrics": {"dice_wt": ci}},
                                "LGG": {"n_patients": 2, "n_cases": 2, "too_small": True}}},
        "calibration": {"metrics": {"WT": {"ece": 0.05, "brier": 0.02}}, "sampling": {"voxels": 240000},
                        "applied": {"method": "temperature", "formula": "p = softmax(logits / T)"}},
    }  # fmt: skip
    card = render_model_card({"model_name": "unet", "version": "1.0.0", "modality": "mri"}, report)
    assert "- grade (Dice WT): HGG: 0.800" in card and "LGG: too small" in card
    assert "240000 sampled brain voxels" in card and "WT: ECE 0.050" in card and "softmax(logits / T)" in card
