"""The README's main job, shrunk by config: stages run in order, base models are evaluated, the
summary is written, and a bad stage list is refused (the full pipeline runs in test_ensemble.py)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import cli_ok, run_cli

pytestmark = pytest.mark.slow  # the main job as a process


def test_main_job_runs_selected_stages_and_writes_summary(tmp_path):
    out = cli_ok(
        run_cli(
            "main.py", "pipeline=tiny", "stages=[cohort,xray]", root=tmp_path, env={"OMP_NUM_THREADS": "1"}
        )
    )
    assert "[1/2] cohort: ready" in out and "[2/2] xray: training" in out and "[2/2] xray: done" in out
    (summary_path,) = list((tmp_path / "outputs" / "main" / "runs").glob("*/summary.json"))
    summary = json.loads(summary_path.read_text())
    assert summary["xray"]["best_checkpoint"] == str(tmp_path / "saved_models" / "xray" / "resnet18_best.pth")
    assert summary["cohort"]["manifest"] == str(tmp_path / "data" / "cohort" / "manifest.csv")
    report = json.loads((summary_path.parent / "xray" / "evaluation" / "metrics.json").read_text())
    assert report["mean_auc"] == summary["xray"]["test_mean_auc"] and report["n_cases"] > 0
    stamp = json.loads((tmp_path / "outputs" / "main" / "stages" / "xray.json").read_text())
    assert stamp["outputs"] == [summary["xray"]["best_checkpoint"]] and len(stamp["digest"]) == 64


def test_main_job_refuses_an_unknown_stage(tmp_path):
    proc = run_cli("main.py", "pipeline=tiny", "stages=[cohort,xrays]", root=tmp_path)
    assert proc.returncode != 0
    assert (
        "unknown stage(s) ['xrays']; stages are ['cohort', 'xray', 'ct', 'mri', 'ensemble']"
        in proc.stdout + proc.stderr
    )
