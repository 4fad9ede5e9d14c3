"""Issue 15 for the segmenter: `data.root=<folder> split=all` scores every case of another BraTS folder with
the checkpoint's own channels and preprocessing; Dice per class and region and HD95 with patient
bootstrap intervals; predictions.csv, strict metrics.json and a self-contained report.html with overlays."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.helpers import compose, copy_root

pytestmark = pytest.mark.slow


def test_mri_external_folder_all_cases_with_intervals(tiny_models, tmp_path):
    from medens.data.mri.synthetic import generate_brats_synthetic
    from medens.evaluation.evaluate import evaluate
    from medens.evaluation.statistics import PatientBootstrap, weighted_mean

    # the session's tiny MRI model (one epoch, TINY_MRI), copied: evaluation writes beside it
    copy_root(tiny_models / "saved_models" / "mri", tmp_path / "saved_models" / "mri")
    ckpt = tmp_path / "saved_models" / "mri" / "unet_best.pth"
    other = generate_brats_synthetic(tmp_path / "other_site", n_cases=4, shape=(40, 40, 32), seed=9)
    ecfg = compose("evaluate", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/eval",
                   f"ckpt_path={ckpt}", f"+data.root={other}", "split=all", "bootstrap.n_resamples=100")  # fmt: skip
    report = evaluate(ecfg)
    out = tmp_path / "eval"
    cases = sorted(p.name for p in other.iterdir() if p.is_dir())
    assert report["data"] == str(other) and sorted(report["per_case"]) == cases and report["n_labelled"] == 4

    def refuse(name):
        raise AssertionError(name)

    doc = json.loads((out / "metrics.json").read_text(), parse_constant=refuse)
    wt = doc["intervals"]["dice_wt"]
    assert wt["n_resamples"] == 100 and wt["n_patients"] == 4
    values = np.array([report["per_case"][c]["dice_wt"] for c in cases])
    assert wt["value"] == pytest.approx(values.mean())
    reps = PatientBootstrap(cases, 100, 0).replicates(lambda w: weighted_mean(values, w))
    assert wt["ci_low"] == pytest.approx(np.percentile(reps, 2.5)) and wt["ci_high"] == pytest.approx(np.percentile(reps, 97.5))
    assert {"dice_necrotic_core", "dice_edema", "dice_enhancing", "dice_tc", "dice_et", "hd95_wt"} <= set(doc["intervals"])
    pred = pd.read_csv(out / "predictions.csv")
    assert sorted(pred["case_id"]) == cases and (out / pred["prediction"].iloc[0]).is_file()
    html = (out / "report.html").read_text()
    # four case overlays and the voxel reliability diagram, each embedded (one self-contained file)
    assert html.count("data:image/png;base64,") == 5 and "dice_wt" in html and (out / "reliability.png").is_file()
