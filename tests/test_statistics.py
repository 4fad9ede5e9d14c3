"""Issue 15: intervals, DeLong, paired comparisons, calibration, subgroups, strict JSON; issue 14 item 4
(ensemble: no NaN in JSON, a target without labels is an error, every method on the same patients).

References are computed independently: the resamples are rebuilt from the documented recipe
(`default_rng(seed).integers(0, n_patients, (B, n_patients))` over the sorted patient ids), each
resample's case list is concatenated and scored with sklearn, and the interval is numpy's percentile.
DeLong is checked against an O(n^2) implementation written from the definition (DeLong et al. 1988).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from sklearn.metrics import average_precision_score, roc_auc_score

from medens.errors import ConfigError, DataError
from medens.evaluation.statistics import (
    PatientBootstrap,
    classification_intervals,
    delong_test,
    fast_delong,
    paired_auc_comparison,
    paired_dice_comparison,
)


def _data(n=90, n_patients=30, seed=0, ties=True):
    rng = np.random.default_rng(seed)
    pid = np.array([f"p{int(i):03d}" for i in rng.integers(0, n_patients, n)])
    y = rng.integers(0, 2, n)
    s = rng.normal(size=n) + 0.9 * y
    if ties:
        s = np.round(s, 1)  # ties between classes: the half-credit rule matters
    return y, s, pid


def _reference_resamples(pid, n_resamples, seed):
    """The documented recipe, rebuilt here without medens code."""
    patients = sorted(set(pid.tolist()))
    draws = np.random.default_rng(seed).integers(0, len(patients), size=(n_resamples, len(patients)))
    groups = [np.flatnonzero(pid == p) for p in patients]
    return [np.concatenate([groups[i] for i in row]) for row in draws]


def _reference_ci(values):
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)])
    return np.percentile(v, [2.5, 97.5])


def test_bootstrap_intervals_match_a_reference_on_the_same_resamples():
    y, s, pid = _data()
    boot = PatientBootstrap(pid, n_resamples=300, seed=7)
    res = classification_intervals(s[:, None], y[:, None].astype(float), ["x"], boot, thresholds=[0.3])
    out = res["per_output"]["x"]
    ref_auc, ref_ap, ref_sens, ref_spec = [], [], [], []
    for idx in _reference_resamples(pid, 300, 7):
        yy, ss = y[idx], s[idx]
        two = len(np.unique(yy)) == 2
        ref_auc.append(roc_auc_score(yy, ss) if two else None)
        ref_ap.append(average_precision_score(yy, ss) if yy.any() else None)
        ref_sens.append(((ss >= 0.3) & (yy == 1)).sum() / (yy == 1).sum() if (yy == 1).any() else None)
        ref_spec.append(((ss < 0.3) & (yy == 0)).sum() / (yy == 0).sum() if (yy == 0).any() else None)
    for got, ref, full in (
        (out["auc"], ref_auc, roc_auc_score(y, s)),
        (out["average_precision"], ref_ap, average_precision_score(y, s)),
        (out["thresholds"][0]["sensitivity"], ref_sens, ((s >= 0.3) & (y == 1)).sum() / (y == 1).sum()),
        (out["thresholds"][0]["specificity"], ref_spec, ((s < 0.3) & (y == 0)).sum() / (y == 0).sum()),
    ):
        lo, hi = _reference_ci(ref)
        assert got["value"] == pytest.approx(full, abs=1e-12)
        assert got["ci_low"] == pytest.approx(lo, abs=1e-12) and got["ci_high"] == pytest.approx(hi, abs=1e-12)
        assert got["n_resamples"] == 300 and got["seed"] == 7 and got["n_patients"] == len(set(pid))
        assert got["ci_low"] <= got["value"] <= got["ci_high"]
    # replicate by replicate, not only the percentiles
    reps = boot.replicates(lambda w: __import__("medens.evaluation.statistics", fromlist=["x"]).weighted_auc(
        y == 1, s, w))
    ref = np.array([np.nan if v is None else v for v in ref_auc])
    np.testing.assert_allclose(reps, ref, atol=1e-12)


def test_mean_auc_interval_is_the_mean_over_outputs_per_resample():
    rng = np.random.default_rng(3)
    y, s, pid = _data(seed=3)
    y2 = rng.integers(0, 2, len(y)).astype(float)
    y2[:5] = np.nan  # unknown labels of one output are left out of that output only
    s2 = rng.normal(size=len(y)) + y2
    probs = np.stack([s, np.nan_to_num(s2)], 1)
    targets = np.stack([y.astype(float), y2], 1)
    res = classification_intervals(probs, targets, ["a", "b"], PatientBootstrap(pid, 200, 1), thresholds=())
    ref = []
    for idx in _reference_resamples(pid, 200, 1):
        vals = []
        for c in range(2):
            k = idx[np.isfinite(targets[idx, c])]
            if len(np.unique(targets[k, c])) == 2:
                vals.append(roc_auc_score(targets[k, c], probs[k, c]))
        ref.append(np.mean(vals) if vals else None)
    lo, hi = _reference_ci(ref)
    assert res["mean_auc"]["ci_low"] == pytest.approx(lo, abs=1e-12)
    assert res["mean_auc"]["ci_high"] == pytest.approx(hi, abs=1e-12)


def test_bootstrap_on_fewer_than_two_patients_is_an_error():
    with pytest.raises(DataError, match="at least two patients, got 1"):
        PatientBootstrap(["p1", "p1", "p1"], 100, 0)
    with pytest.raises(DataError, match="at least two patients, got 0"):
        PatientBootstrap([], 100, 0)


def _slow_delong(y, scores):
    """DeLong et al. (1988) from the definition: psi over every (positive, negative) pair, O(m*n)."""
    y = np.asarray(y).astype(bool)
    k = len(scores)
    pos = [np.asarray(s)[y] for s in scores]
    neg = [np.asarray(s)[~y] for s in scores]
    m, n = len(pos[0]), len(neg[0])
    v10 = np.zeros((k, m))
    v01 = np.zeros((k, n))
    aucs = np.zeros(k)
    for r in range(k):
        psi = np.array([[1.0 if a > b else 0.5 if a == b else 0.0 for b in neg[r]] for a in pos[r]])
        aucs[r] = psi.mean()
        v10[r] = psi.mean(axis=1)
        v01[r] = psi.mean(axis=0)
    s10 = np.array([[np.sum((v10[i] - aucs[i]) * (v10[j] - aucs[j])) / (m - 1) for j in range(k)] for i in range(k)])
    s01 = np.array([[np.sum((v01[i] - aucs[i]) * (v01[j] - aucs[j])) / (n - 1) for j in range(k)] for i in range(k)])
    return aucs, s10 / m + s01 / n


@pytest.mark.parametrize("ties", [False, True])
def test_fast_delong_equals_the_definition(ties):
    y, s, _ = _data(n=70, seed=11, ties=ties)
    rng = np.random.default_rng(5)
    s2 = np.round(s + rng.normal(0, 1.0, len(s)), 1 if ties else 6)
    aucs, cov = fast_delong(y, np.vstack([s, s2]))
    ref_aucs, ref_cov = _slow_delong(y, [s, s2])
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-10, atol=1e-14)
    assert aucs[0] == pytest.approx(roc_auc_score(y, s))
    t = delong_test(y, s, s2)
    z = (ref_aucs[0] - ref_aucs[1]) / math.sqrt(ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1])
    assert t["z"] == pytest.approx(z, rel=1e-9)
    assert t["p_value"] == pytest.approx(2 * sps.norm.sf(abs(z)), rel=1e-9)


def test_delong_small_example_by_hand():
    # positives 0.9, 0.6; negatives 0.7, 0.2: pairs 1, 1, 0, 1 -> AUC 0.75 for a; b ranks perfectly -> 1.0
    y = np.array([1, 1, 0, 0])
    a = np.array([0.9, 0.6, 0.7, 0.2])
    b = np.array([0.9, 0.8, 0.3, 0.2])
    aucs, cov = fast_delong(y, np.vstack([a, b]))
    assert aucs.tolist() == [0.75, 1.0]
    # structural components of a: V10 = (1, 0.5), V01 = (0.5, 1); var = 0.125/2 + 0.125/2
    assert cov[0, 0] == pytest.approx(0.125)
    assert cov[1, 1] == pytest.approx(0.0) and cov[0, 1] == pytest.approx(0.0)
    with pytest.raises(DataError, match="two positive and two negative"):
        fast_delong([1, 0, 0], np.array([[0.2, 0.1, 0.3]]))


def test_paired_auc_comparison_uses_the_same_resamples_for_both_models():
    y, s, pid = _data(seed=2)
    rng = np.random.default_rng(9)
    s2 = s + rng.normal(0, 1.5, len(s))
    res = paired_auc_comparison(y, s, s2, pid, n_resamples=250, seed=4)
    diffs = []
    for idx in _reference_resamples(pid, 250, 4):
        if len(np.unique(y[idx])) == 2:
            diffs.append(roc_auc_score(y[idx], s[idx]) - roc_auc_score(y[idx], s2[idx]))
    lo, hi = _reference_ci(diffs)
    d = res["bootstrap_difference"]
    assert d["value"] == pytest.approx(roc_auc_score(y, s) - roc_auc_score(y, s2))
    assert d["ci_low"] == pytest.approx(lo, abs=1e-12) and d["ci_high"] == pytest.approx(hi, abs=1e-12)
    assert res["delong"]["difference"] == pytest.approx(d["value"])
    assert 0 <= res["delong"]["p_value"] <= 1


def test_paired_dice_comparison_wilcoxon_and_interval():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.6, 0.9, 25)
    b = a - rng.normal(0.05, 0.05, 25)
    a[3] = np.nan  # an undefined Dice is left out and counted
    ids = [f"c{i}" for i in range(25)]
    res = paired_dice_comparison(a, b, ids, None, n_resamples=200, seed=1)
    ok = np.isfinite(a)
    d = (a - b)[ok]
    assert res["n_cases"] == 24 and res["n_left_out"] == 1
    assert res["wilcoxon"]["p_value"] == pytest.approx(sps.wilcoxon(d).pvalue)
    ref = [d[idx].mean() for idx in _reference_resamples(np.asarray(ids)[ok], 200, 1)]
    lo, hi = _reference_ci(ref)
    assert res["mean_difference"]["ci_low"] == pytest.approx(lo) and res["mean_difference"]["ci_high"] == pytest.approx(hi)


def test_strict_json_writer_never_writes_nan(tmp_path):
    from medens.utils.jsonio import write_json_strict

    path = write_json_strict(tmp_path / "m.json", {"a": float("nan"), "b": [np.float32(1.5), np.inf], "c": np.int64(3),
                                                    "d": {"e": np.array([1.0, np.nan])}})  # fmt: skip

    def refuse(name):
        raise AssertionError(f"non-JSON constant {name}")

    doc = json.loads(path.read_text(), parse_constant=refuse)
    assert doc == {"a": None, "b": [1.5, None], "c": 3, "d": {"e": [1.0, None]}}


# -- calibration -------------------------------------------------------------------------------------
def test_temperature_and_platt_scaling_recover_known_miscalibration(tmp_path):
    from medens.evaluation import calibration as cal

    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(float)
    over = 1 / (1 + np.exp(-3 * z))  # over-confident: true temperature 3
    fitted = cal.fit_calibration(over[:, None], y[:, None], ["x"], "temperature")
    assert fitted["outputs"]["x"]["temperature"] == pytest.approx(3.0, rel=0.1)
    after = cal.apply_calibration(over[:, None], fitted, ["x"])
    assert cal.expected_calibration_error(after[:, 0], y) < cal.expected_calibration_error(over, y)
    assert cal.brier_score(after[:, 0], y) < cal.brier_score(over, y)
    assert cal.brier_score(np.array([0.2, 0.9]), np.array([0, 1])) == pytest.approx((0.04 + 0.01) / 2)
    platt = cal.fit_calibration((1 / (1 + np.exp(-(0.5 * z + 1))))[:, None], y[:, None], ["x"], "platt")
    assert platt["outputs"]["x"]["scale"] == pytest.approx(2.0, rel=0.15)
    assert platt["outputs"]["x"]["bias"] == pytest.approx(-2.0, abs=0.3)
    # stored beside the checkpoint, bound to its SHA-256
    ckpt = tmp_path / "m_best.pth"
    ckpt.write_bytes(b"weights")
    path = cal.save_calibration(ckpt, fitted, {"split": "val"})
    assert path.name == "m_best.calibration.json" and cal.load_calibration(ckpt)["method"] == "temperature"
    assert cal.manifest_entry(ckpt)["outputs"]["x"]["scale"] == pytest.approx(1 / fitted["outputs"]["x"]["temperature"])
    ckpt.write_bytes(b"other weights")
    with pytest.raises(Exception, match="calibration was fitted for SHA-256"):
        cal.load_calibration(ckpt)


# -- subgroups --------------------------------------------------------------------------------------
def test_subgroups_unknown_column_small_groups_and_age_bands():
    from medens.evaluation.subgroups import subgroup_metrics

    rng = np.random.default_rng(1)
    n = 120
    ids = [f"img{i}" for i in range(n)]
    pids = [f"p{i // 2}" for i in range(n)]
    y = rng.integers(0, 2, n).astype(float)
    s = y + rng.normal(0, 1, n)
    sex = np.where(np.arange(n) < 110, "F", "M")  # 'M': 5 patients -> too small
    attrs = pd.DataFrame({"Patient Gender": sex, "Patient Age": (np.arange(n) * 3 // 2) % 90 + 5,
                          "View Position": "PA"}, index=ids)  # fmt: skip
    with pytest.raises(ConfigError, match=r"\['Patient Sex'\].*Patient Gender, Patient Age, View Position"):
        subgroup_metrics(s[:, None], y[:, None], ["x"], ids, pids, attrs, ["Patient Sex"], "table.csv")
    out = subgroup_metrics(s[:, None], y[:, None], ["x"], ids, pids, attrs, ["Patient Gender", "Patient Age"],
                           "table.csv", min_patients=10, n_resamples=100)  # fmt: skip
    assert out["Patient Gender"]["M"]["too_small"] and out["Patient Gender"]["M"]["n_patients"] == 5
    f = out["Patient Gender"]["F"]
    assert not f["too_small"] and f["mean_auc"]["ci_low"] <= f["mean_auc"]["value"] <= f["mean_auc"]["ci_high"]
    female = np.arange(n) < 110
    assert f["mean_auc"]["value"] == pytest.approx(roc_auc_score(y[female], s[female]))
    assert set(out["Patient Age"]) == {"< 18", "[18, 40)", "[40, 60)", "[60, 80)", ">= 80"}


# -- ensemble (issue 14 item 4) ---------------------------------------------------------------------
def test_weighted_average_keeps_all_missing_patients_and_refuses_a_target_without_labels():
    from medens.ensemble.weighted_average import apply_weighted_average, fit_weighted_average

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200).astype(float)
    raw = np.stack([y + rng.normal(0, 1, 200), y + rng.normal(0, 2, 200)], 1)
    fitted = fit_weighted_average(raw, y, "auc", step=0.1, target="malignancy")
    test = np.array([[0.5, np.nan], [np.nan, np.nan]])
    out = apply_weighted_average(test, fitted)
    assert np.isfinite(out).all() and out[1] == pytest.approx(y.mean())
    with pytest.raises(DataError, match="target 'progression' has no label"):
        fit_weighted_average(raw, np.full(200, np.nan), "auc", target="progression")
    # fit patients of one class: the AUC is undefined for every weight (NaN, null in JSON, never a
    # stand-in 0.5), so the weights are chosen by log-loss alone
    one_class = fit_weighted_average(raw, np.zeros(200), "auc", step=0.1, target="malignancy")
    by_log_loss = fit_weighted_average(raw, np.zeros(200), "log_loss", step=0.1, target="malignancy")
    assert math.isnan(one_class["fit_objective_value"])
    grid = {tuple(np.round(w, 6)) for w in np.linspace([0, 1], [1, 0], 11)}
    assert tuple(np.round(one_class["weights"], 6)) in grid
    assert one_class["weights"] @ [1, 0] == pytest.approx(by_log_loss["weights"] @ [1, 0], abs=0.1)


def test_ensemble_methods_are_scored_on_the_same_patients_with_the_same_resamples():
    from medens.callbacks.ensemble_report import score_methods

    y, s, _ = _data(n=60, seed=4)
    pids = np.array([f"p{i}" for i in range(60)])
    yf = y.astype(float)
    yf[:3] = np.nan
    scores = {"xray": s, "meta_learner": s * 2 + 1}  # a monotone transform: identical AUC and interval
    out = score_methods(yf, scores, pids, 200, 0)
    assert out["xray"]["n"] == out["meta_learner"]["n"] == 57
    assert out["xray"]["auc"] == pytest.approx(out["meta_learner"]["auc"])
    assert out["xray"]["ci_low"] == pytest.approx(out["meta_learner"]["ci_low"])
    bad = dict(scores, weighted_average=np.where(np.arange(60) == 10, np.nan, s))
    with pytest.raises(ValueError, match="'weighted_average' has no score for 1 labelled patient"):
        score_methods(yf, bad, pids, 50, 0)


def test_ensemble_report_json_is_strict_even_with_undefined_aucs(tmp_path):
    from medens.ensemble.report import write_report

    nan = float("nan")
    summary = {
        "targets": ["t"], "methods": ["xray", "weighted_average", "meta_learner"],
        "auc": {m: {"t": {"auc": nan, "ci_low": nan, "ci_high": nan, "n": 3}} for m in ("xray", "weighted_average", "meta_learner")},
        "mean_auc": {"xray": nan, "weighted_average": nan, "meta_learner": nan},
        "best_single": {"method": "xray", "mean_auc": nan}, "gain_over_best_single": nan, "n_test": 3,
        "n_bootstrap": 10, "missing_test": {"xray": 0}, "sources": {"t": {"xray": ["xray.a"]}},
        "weighted_average": {"objective": "auc", "targets": {"t": {"weights": {"xray": 1.0}}}}, "vs_best_single": {},
    }  # fmt: skip
    paths = write_report(tmp_path, summary)
    text = paths["json"].read_text()
    assert "NaN" not in text and json.loads(text)["auc"]["xray"]["t"]["auc"] is None


def test_ensemble_report_callback_scores_every_method_on_the_same_patients(tmp_path):
    """The callback end to end on a stand-in stacking stage: a patient with every modality missing stays in
    the weighted average, each method's AUC is over the same patients, the comparison with the best single
    model is written, and report.json / weighted_average.json are strict JSON."""
    from types import SimpleNamespace

    import torch

    from medens.callbacks.ensemble_report import EnsembleReport

    rng = np.random.default_rng(0)

    def frame(n, start):
        y = rng.integers(0, 2, n).astype(float)
        f = pd.DataFrame({"patient_id": [f"p{start + i}" for i in range(n)], "malignancy": y,
                          "xray.mass": y + rng.normal(0, 1, n), "ct.malignancy": y + rng.normal(0, 0.8, n)})  # fmt: skip
        for m, col in (("xray", "xray.mass"), ("ct", "ct.malignancy")):
            gone = rng.random(n) < 0.2
            f.loc[gone, col] = np.nan
            f[f"missing.{m}"] = gone.astype(int)
        return f

    frames = {"train": frame(80, 0), "val": frame(30, 100), "test": frame(60, 200)}
    test = frames["test"]
    test.loc[0, ["xray.mass", "ct.malignancy"]] = np.nan  # every modality missing
    test.loc[0, ["missing.xray", "missing.ct"]] = 1
    (tmp_path / "manifest.csv").write_text("")
    dm = SimpleNamespace(frames=frames, targets=["malignancy"], feature_names=["xray.mass", "ct.malignancy"],
                         base={"xray": SimpleNamespace(path=tmp_path / "x.pth", sha256="a"),
                               "ct": SimpleNamespace(path=tmp_path / "c.pth", sha256="b")},
                         manifest_path=tmp_path / "manifest.csv",
                         inputs=lambda f: np.nan_to_num(f[["xray.mass", "ct.malignancy"]].to_numpy(np.float32)))  # fmt: skip

    class Meta(torch.nn.Module):
        device = torch.device("cpu")

        def predict_proba(self, x):
            return torch.sigmoid(x.sum(1, keepdim=True))

    cb = EnsembleReport(str(tmp_path / "wa.json"), str(tmp_path / "report"),
                        {"malignancy": {"xray": ["mass"], "ct": ["malignancy"]}}, n_bootstrap=100)  # fmt: skip
    cb.on_test_end(SimpleNamespace(is_global_zero=True, datamodule=dm, ckpt_path=None), Meta())
    s = cb.summary
    assert {s["auc"][m]["malignancy"]["n"] for m in s["methods"]} == {60}  # same patients for every method
    pred = pd.read_csv(tmp_path / "report" / "predictions.csv")
    assert pred["malignancy.weighted_average"].notna().all()
    wa = json.loads((tmp_path / "wa.json").read_text())
    prevalence = pd.concat([frames["train"], frames["val"]])["malignancy"].mean()
    assert wa["targets"]["malignancy"]["all_missing_output"] == pytest.approx(prevalence)
    assert pred.loc[0, "malignancy.weighted_average"] == pytest.approx(prevalence)
    vs = s["vs_best_single"]["malignancy"]["meta_learner"]
    assert 0 <= vs["delong"]["p_value"] <= 1 and vs["bootstrap_difference"]["n_resamples"] == 100
    text = (tmp_path / "report" / "report.json").read_text()
    assert "NaN" not in text and "DeLong p" in (tmp_path / "report" / "report.md").read_text()
