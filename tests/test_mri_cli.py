"""The MRI modality as users run it: exact resume by override, evaluation outputs, real BraTS samples."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medens.checkpoint import load_checkpoint
from medens.data.mri import map_labels, resolve_label_map
from medens.metrics.segmentation import segmentation_dice
from tests.helpers import TINY_MRI, assert_same_training_state, cli_ok, run_cli

COMMON = [*TINY_MRI, "trainer.max_epochs=3", "trainer.deterministic=true", "test=false", "logger=none",
          "callbacks.model_checkpoint_periodic.every_n_epochs=1"]  # fmt: skip

pytestmark = pytest.mark.slow  # every test trains through the CLI


def _eval_run(root: Path) -> Path:
    runs = sorted((root / "outputs" / "evaluate" / "runs").iterdir())
    return runs[-1]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """Three uninterrupted epochs of the tiny default experiment, through the CLI."""
    root = tmp_path_factory.mktemp("mri_cli")
    cli_ok(run_cli("train.py", *COMMON, f"paths.saved_models_dir={root}/full", root=root))
    return root


def test_resume_by_cli_override_matches_uninterrupted_run(full_run):
    root = full_run
    epoch2 = root / "full" / "mri" / "unet_epoch_2.pth"
    assert epoch2.is_file()
    out = cli_ok(run_cli("train.py", *COMMON, f"paths.saved_models_dir={root}/resumed", f"ckpt_path={epoch2}", root=root))
    assert "Restored all states from the checkpoint" in out
    resumed = root / "resumed" / "mri"
    assert sorted(p.name for p in resumed.glob("*_epoch_*.pth")) == ["unet_epoch_3.pth"]  # continued at epoch 3
    history = json.loads((resumed / "training_history.json").read_text())["epochs"]
    full_hist = json.loads((root / "full" / "mri" / "training_history.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["train/loss"] for h in history[:2]] == [h["train/loss"] for h in full_hist[:2]]
    assert history[2]["val/dice"] == pytest.approx(full_hist[2]["val/dice"], abs=1e-6)

    a = load_checkpoint(root / "full" / "mri" / "unet_epoch_3.pth")
    b = load_checkpoint(resumed / "unet_epoch_3.pth")
    assert_same_training_state(a, b)
    assert a["scheduler_state_dict"]["last_epoch"] == b["scheduler_state_dict"]["last_epoch"] == 3
    assert a["best_metric"] == pytest.approx(b["best_metric"]) and b["epoch"] == 3


def test_evaluate_writes_metrics_aligned_nifti_and_pictures(full_run):
    root = full_run
    ckpt = root / "full" / "mri" / "unet_best.pth"
    cli_ok(run_cli("evaluate.py", f"ckpt_path={ckpt}", "split=val", root=root))
    run = _eval_run(root)
    report = json.loads((run / "metrics.json").read_text())
    assert report["split"] == "val" and report["n_cases"] == report["n_labelled"] == 1
    assert report["label_codes"] == "dataset" and report["channels"] == ["t1", "t1ce", "t2", "flair"]
    # experiment=mri's recipe: mirrored prediction, the postprocessing the checkpoint chose on validation
    assert report["tta_flips"] is True and report["postprocess"] == load_checkpoint(ckpt)["postprocess"] is not None
    keys = {"dice_necrotic_core", "dice_edema", "dice_enhancing", "dice_wt", "dice_tc", "dice_et", "dice_mean",
            "hd95_wt", "hd95_tc", "hd95_et"}  # fmt: skip
    assert keys <= set(report["mean"])
    ((cid, case),) = report["per_case"].items()
    assert keys <= set(case) and case["dice_wt"] == pytest.approx(report["mean"]["dice_wt"])
    with open(run / "per_case.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case_id"] for r in rows] == [cid] and float(rows[0]["dice_wt"]) == pytest.approx(case["dice_wt"])
    assert (run / "figures" / f"{cid}.png").stat().st_size > 10_000

    # the NIfTI is on the input's grid and affine, in the dataset's codes: scoring it against the
    # original ground-truth file gives the reported Dice
    pred_img = nib.load(str(run / "predictions" / f"{cid}_pred.nii.gz"))
    seg_img = nib.load(str(root / "data" / "brats_synthetic" / cid / f"{cid}_seg.nii.gz"))
    assert pred_img.shape == seg_img.shape == (40, 40, 32)
    np.testing.assert_allclose(pred_img.affine, seg_img.affine)
    pred = np.asarray(pred_img.dataobj)
    assert set(np.unique(pred).tolist()) <= {0, 1, 2, 4}
    lm = resolve_label_map("brats2021")
    direct = segmentation_dice(map_labels(pred, lm, cid, "pred"), map_labels(np.asarray(seg_img.dataobj), lm, cid, "seg"))
    for k in ("dice_wt", "dice_tc", "dice_et"):
        assert direct[k] == pytest.approx(case[k], abs=1e-9)


@pytest.mark.usefixtures("samples_dir")
def test_inference_on_brats2023_sample_writes_nifti_and_png(full_run, samples_dir: Path):
    root = full_run
    ckpt = root / "full" / "mri" / "unet_best.pth"
    env = {"MEDENS_SAMPLES": str(samples_dir)}
    # larger, non-overlapping windows than training's 32^3 patches: the real brain is ~140^3 voxels
    cli_ok(run_cli("evaluate.py", f"ckpt_path={ckpt}", "data=brats2023", "+label_codes=medens",
                "+inferer.roi_size=[96,96,96]", "+inferer.overlap=0.0", root=root, env=env))  # fmt: skip
    run = _eval_run(root)
    report = json.loads((run / "metrics.json").read_text())
    cid = "BraTS-GLI-00001-000"
    assert report["split"] == "predict" and report["n_labelled"] == 0 and list(report["per_case"]) == [cid]
    assert report["mean_dice"] is None and report["channels"] == ["t1", "t1ce", "t2", "flair"]
    assert report["inferer"]["roi_size"] == [96, 96, 96] and report["inferer"]["mode"] == "gaussian"
    pred_img = nib.load(str(run / "predictions" / f"{cid}_pred.nii.gz"))
    ref = nib.load(str(samples_dir / "brats2023_sample" / cid / f"{cid}-t2f.nii.gz"))
    assert pred_img.shape == ref.shape == (240, 240, 155)
    np.testing.assert_allclose(pred_img.affine, ref.affine, atol=1e-5)
    assert set(np.unique(np.asarray(pred_img.dataobj)).tolist()) <= {0, 1, 2, 3}  # medens classes
    assert (run / "figures" / f"{cid}.png").stat().st_size > 10_000


@pytest.mark.usefixtures("samples_dir")
def test_real_brats2015_experiment_short(tmp_path, samples_dir: Path):
    env = {"MEDENS_SAMPLES": str(samples_dir)}
    out = cli_ok(run_cli(
        "train.py", "experiment=mri_brats2015", "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1",
        "data.samples_per_volume=1", "model.net.channels=[4,8,16]",
        "model.net.strides=[2,2]", "trainer.enable_progress_bar=false", "logger=none",
        # validation mirrored like evaluation, no postprocessing: evaluation's Dice must equal validation's
        "model.tta_in_validation=true", "model.postprocess=none", root=tmp_path, env=env,
    ))  # fmt: skip
    assert "3 cases (train 2, val 1, test 0" in out
    folder = tmp_path / "saved_models" / "mri"
    ckpt = load_checkpoint(folder / "unet_best.pth")
    hyper = ckpt["hyperparameters"]
    assert hyper["data"]["root"] == f"{samples_dir}/brats2015"
    assert hyper["data"]["source"]["label_preset"] == "brats2015"
    assert hyper["io_contract"]["channels"] == ["flair", "t1ce"] and hyper["model"]["net"]["in_channels"] == 2
    history = json.loads((folder / "training_history.json").read_text())["epochs"]
    assert len(history) == 1 and 0.0 <= history[0]["val/dice_wt"] <= 1.0

    # the held-out patient through evaluate.py: per-case Dice/HD95 in 2015 codes on the 240x240x155 grid
    cli_ok(run_cli("evaluate.py", f"ckpt_path={folder / 'unet_best.pth'}", "split=val", root=tmp_path, env=env))
    run = _eval_run(tmp_path)
    report = json.loads((run / "metrics.json").read_text())
    ((cid, case),) = report["per_case"].items()
    assert cid.startswith("brats_2013_pat000") and case["dice_wt"] == pytest.approx(history[0]["val/dice_wt"], abs=1e-5)
    assert report["tta_flips"] is True and report["postprocess"] is None
    pred_img = nib.load(str(run / "predictions" / f"{cid}_pred.nii.gz"))
    ref = nib.load(str(samples_dir / "brats2015" / cid / "OTMultiClass.nii.gz"))
    assert pred_img.shape == ref.shape == (240, 240, 155)
    np.testing.assert_allclose(pred_img.affine, ref.affine, atol=1e-5)
    assert set(np.unique(np.asarray(pred_img.dataobj)).tolist()) <= {0, 1, 2, 4}  # 2015 codes (class 1 -> 1)


def test_ddp_sim_one_val_case_on_two_ranks(tmp_path):
    out = cli_ok(run_cli("train.py", *TINY_MRI, "trainer=ddp_sim", "trainer.max_epochs=1", "logger=none", root=tmp_path))
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out and "test/dice" in out
    assert set(re.findall(r"medens checkpoint written by rank (\d+)", out)) == {"0"}
    folder = tmp_path / "saved_models" / "mri"
    (entry,) = json.loads((folder / "training_history.json").read_text())["epochs"]
    assert 0.0 <= entry["val/dice"] <= 1.0 and entry["val/loss"] > 0
