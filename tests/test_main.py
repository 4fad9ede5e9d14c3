"""The README's main job, shrunk by config: every stage trains, evaluates and is summarised."""

from __future__ import annotations

import json

from tests.conftest import TINY_XRAY, run_cli


def test_main_job_runs_stages_and_writes_summary(tmp_path):
    overrides = ",".join(f'"{o}"' for o in [*TINY_XRAY, "trainer.max_epochs=1"])
    proc = run_cli("main.py", f"common_overrides=[{overrides}]", root=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "[1/1] xray: training" in out and "[1/1] xray: done" in out
    (summary_path,) = list((tmp_path / "outputs" / "main" / "runs").glob("*/summary.json"))
    summary = json.loads(summary_path.read_text())
    assert summary["xray"]["best_checkpoint"] == str(tmp_path / "saved_models" / "xray" / "resnet18_best.pth")
    report = json.loads((summary_path.parent / "xray" / "evaluation" / "metrics.json").read_text())
    assert report["mean_auc"] == summary["xray"]["test_mean_auc"] and report["n_cases"] > 0
