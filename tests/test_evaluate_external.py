"""Issue 15: external validation in one command, metrics with intervals, calibration stored beside the
checkpoint and applied, subgroups, one self-contained report per evaluation, paired comparison.

One tiny X-ray model is trained once (in-process); the external folder is another NIH-format set
(another generator seed: other patients, other images). The CLI is run as a user would for the
one-command path; the error cases run in-process (same code, no interpreter start-up)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import cli_ok, compose, copy_root, run_cli

pytestmark = pytest.mark.slow
THREADS = {"OMP_NUM_THREADS": "1"}


def _strict(text: str):
    def refuse(name):
        raise AssertionError(f"non-JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _compose(name: str, overrides: list[str]):
    return compose(name, *overrides)


@pytest.fixture(scope="module")
def trained(tiny_models: Path, tmp_path_factory):
    """The session's tiny X-ray model (one epoch, TINY_XRAY) in a copy of its root, and an external set."""
    from medens.data.synthetic_xray import ensure_synthetic_nih

    root = copy_root(tiny_models, tmp_path_factory.mktemp("ext"))
    ckpt = root / "saved_models" / "xray" / "resnet18_best.pth"
    assert ckpt.is_file()
    external = ensure_synthetic_nih(root / "other_hospital", n_patients=14, images_per_patient=2, image_size=48,
                                    seed=11)  # fmt: skip
    return root, ckpt, Path(external)


def _evaluate(root: Path, ckpt: Path, out: str, *overrides: str):
    from medens.evaluation.evaluate import evaluate

    cfg = _compose("evaluate", [f"paths.root_dir={root}", f"paths.output_dir={root}/{out}", f"ckpt_path={ckpt}",
                                "bootstrap.n_resamples=200", *overrides])  # fmt: skip
    return evaluate(cfg), root / out


def test_external_folder_scored_whole_in_the_checkpoints_preprocessing(trained):
    root, ckpt, external = trained
    table = pd.read_csv(next(external.glob("Data_Entry_2017*.csv")))
    proc = run_cli("evaluate.py", f"ckpt_path={ckpt}", f"data.root={external}", "split=all", "calibration=temperature",
                   "subgroups=[Patient Gender,View Position,Patient Age]", "subgroup_min_patients=4",
                   "bootstrap.n_resamples=300", "bootstrap.seed=5", root=root, env=THREADS)  # fmt: skip
    cli_ok(proc)
    (run,) = list((root / "outputs" / "evaluate" / "runs").iterdir())
    report = _strict((run / "metrics.json").read_text())
    # every case of the other folder, nothing of the training folder; the rest of data from the checkpoint
    assert report["split"] == "all" and report["data"] == str(external)
    assert report["n_cases"] == len(table) and report["n_patients"] == table["Patient ID"].nunique()
    pred = pd.read_csv(run / "predictions.csv", dtype={"patient_id": str})
    assert sorted(pred["case_id"]) == sorted(table["Image Index"])
    # intervals on every metric, with resamples and seed recorded
    assert report["bootstrap"]["n_resamples"] == 300 and report["bootstrap"]["seed"] == 5
    m = report["intervals"]["mean_auc"]
    assert m["value"] == pytest.approx(report["mean_auc"]) and m["ci_low"] <= m["value"] <= m["ci_high"]
    atel = report["intervals"]["per_output"]["Atelectasis"]
    assert {"auc", "average_precision", "thresholds"} <= set(atel)
    assert {"sensitivity", "specificity"} <= set(atel["thresholds"][0])
    # calibration: fitted on the checkpoint's own validation split, stored beside it, applied here
    cal_file = ckpt.with_name("resnet18_best.calibration.json")
    stored = json.loads(cal_file.read_text())
    assert stored["method"] == "temperature" and stored["fitted_on"]["split"] == "val"
    assert report["calibration"]["applied"]["method"] == "temperature"
    assert "uncalibrated_prob_Atelectasis" in pred.columns
    assert report["calibration"]["metrics"]["Atelectasis"]["brier"] is not None
    # subgroups: every value of each column, age in bands, small groups not scored
    assert set(report["subgroups"]) == {"Patient Gender", "View Position", "Patient Age"}
    assert set(report["subgroups"]["Patient Gender"]) <= {"F", "M"}
    assert all(" " in g or g.startswith("[") for g in report["subgroups"]["Patient Age"])
    # one self-contained report: figures embedded, no link to a file of the run folder
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and ".png'" not in html and "95%" in html
    for name in ("roc_curves.png", "pr_curves.png", "reliability.png", "subgroups_forest.png"):
        assert (run / name).stat().st_size > 3000, name


def test_split_all_on_the_training_dataset_and_the_stored_calibration_is_applied(trained):
    root, ckpt, _ = trained
    report, out = _evaluate(root, ckpt, "own_all", "split=all")
    from medens.data.synthetic_xray import ensure_synthetic_nih  # noqa: F401  (the training set exists)

    table = pd.read_csv(next((root / "data" / "synthetic_nih_cxr14").glob("Data_Entry_2017*.csv")))
    assert report["n_cases"] == len(table)
    # calibration=auto (default) applies the file the first test stored; none leaves the raw outputs
    if ckpt.with_name("resnet18_best.calibration.json").is_file():
        assert report["calibration"]["applied"]["method"] == "temperature"
    raw, _ = _evaluate(root, ckpt, "own_raw", "split=all", "calibration=none")
    assert raw["calibration"]["applied"] is None and raw["mean_auc"] == pytest.approx(report["mean_auc"])


def test_bad_input_is_refused_with_a_clear_error(trained, tmp_path):
    from medens.errors import ConfigError

    root, ckpt, external = trained
    lidc = tmp_path / "lidc"
    (lidc / "image").mkdir(parents=True)
    (lidc / "labels.csv").write_text("file,patient_id,Diagnosis\n")
    with pytest.raises(ConfigError, match=r"pre-cropped nodule volumes.*trained on NIH ChestX-ray14"):
        _evaluate(root, ckpt, "bad_format", f"+data.root={lidc}", "split=all")
    with pytest.raises(ConfigError, match=r"\['Patient Sex'\].*Patient Gender.*View Position"):
        _evaluate(root, ckpt, "bad_column", f"+data.root={external}", "split=all", "subgroups=[Patient Sex]")
    with pytest.raises(ConfigError, match="split must be one of"):
        _evaluate(root, ckpt, "bad_split", "split=everything")
    with pytest.raises(ConfigError, match="bootstrap.n_resamples='abc'"):
        _evaluate(root, ckpt, "bad_boot", "bootstrap.n_resamples=abc")
    with pytest.raises(ConfigError, match="calibration must be one of"):
        _evaluate(root, ckpt, "bad_cal", "calibration=isotonic")


def test_compare_two_models_on_the_same_cases(trained, tmp_path):
    from medens.errors import DataError
    from medens.evaluation.compare import compare, read_predictions
    from medens.evaluation.statistics import paired_auc_comparison

    root, ckpt, external = trained
    _, out = _evaluate(root, ckpt, "cmp_a", f"+data.root={external}", "split=all", "calibration=none")
    a = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str, "case_id": str})
    b = a.copy()
    b["prob_Effusion"] = 1.0 - b["prob_Effusion"]  # another "model"
    b.to_csv(tmp_path / "b.csv", index=False)
    cfg = _compose("compare", [f"paths.root_dir={root}", f"paths.output_dir={tmp_path}/cmp", f"a={ckpt}",
                               f"b={tmp_path / 'b.csv'}", f"+data.root={external}", "split=all", "calibration=none",
                               "bootstrap.n_resamples=200"])  # fmt: skip
    res = compare(cfg)
    eff = res["outputs"]["Effusion"]
    ref = paired_auc_comparison(a["target_Effusion"], a["prob_Effusion"], b["prob_Effusion"], a["patient_id"], 200, 0)
    assert eff["delong"]["p_value"] == pytest.approx(ref["delong"]["p_value"])
    assert eff["bootstrap_difference"]["ci_low"] == pytest.approx(ref["bootstrap_difference"]["ci_low"])
    assert _strict((tmp_path / "cmp" / "compare.json").read_text())["n_cases"] == len(a)
    assert "DeLong" in (tmp_path / "cmp" / "compare.md").read_text()
    # predictions of different cases: an error naming the unmatched ids
    b.iloc[2:].to_csv(tmp_path / "fewer.csv", index=False)
    with pytest.raises(DataError, match=rf"2 only in a .*{a['case_id'].iloc[0]}"):
        from medens.evaluation.compare import compare_frames

        compare_frames(read_predictions(out / "predictions.csv")[0], read_predictions(tmp_path / "fewer.csv")[0],
                       "classification", 50, 0)  # fmt: skip


def test_promotion_writes_a_model_card_from_metadata_and_evaluation(trained):
    from medens.registry.versioning import promote_checkpoint

    root, ckpt, external = trained
    report, out = _evaluate(root, ckpt, "for_card", f"+data.root={external}", "split=all",
                            "subgroups=[Patient Gender]", "subgroup_min_patients=100")  # fmt: skip
    promoted = promote_checkpoint(ckpt, version="1.0.0", notes="card test", report=out / "metrics.json")
    card = promoted.path.with_name("resnet18_v1.0.0_best.model_card.md").read_text()
    for section in ("## Intended use", "## Data", "## Metrics", "## Subgroups", "## Calibration", "## Known limitations"):
        assert section in card, section
    assert f"{report['intervals']['mean_auc']['value']:.3f} (95% CI" in card
    assert "Patient Gender" in card and "too small" in card and "research use only" in card.lower()
    assert "trained on synthetic data" in card
    if ckpt.with_name("resnet18_best.calibration.json").is_file():  # the version carries its calibration
        assert promoted.path.with_name("resnet18_v1.0.0_best.calibration.json").is_file()
