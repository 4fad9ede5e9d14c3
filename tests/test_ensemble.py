"""Issue 5: the multi-modal cohort, the stacking stage over frozen base models, weighted averaging,
the report, and the whole pipeline as the main job (run once at toy size, then inspected)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import cli_ok, run_cli

TARGETS = ["malignancy", "progression"]


# -- the tiny pipeline, run once for the module ------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    out = cli_ok(run_cli("main.py", "pipeline=tiny", root=root, env={"OMP_NUM_THREADS": "1"}))
    for i, stage in enumerate(["cohort", "xray", "ct", "mri", "ensemble"], start=1):
        assert f"[{i}/5] {stage}:" in out
    assert "[5/5] ensemble: done" in out
    (root / "first_run.log").write_text(out)
    return root


def _summary(root: Path) -> dict:
    latest = sorted((root / "outputs" / "main" / "runs").glob("*/summary.json"))[-1]
    return json.loads(latest.read_text())


@pytest.mark.slow
def test_pipeline_writes_the_ensemble_layout_and_report(pipeline_root: Path):
    ens = pipeline_root / "saved_models" / "ensemble"
    assert {p.name for p in ens.iterdir()} >= {
        "meta_learner.pth",
        "weighted_average.json",
        "ensemble_history.json",
    }
    ckpt = torch.load(ens / "meta_learner.pth", weights_only=True)
    for key in ("epoch", "model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "train_loss",
                "val_loss", "val_auc", "best_metric", "hyperparameters", "timestamp"):  # fmt: skip
        assert key in ckpt, key
    n_params = sum(v.numel() for v in ckpt["model_state_dict"].values())
    contract = ckpt["hyperparameters"]["io_contract"]
    # the default meta-learner: two hidden layers (256, 160) over 22 features + 3 indicators -> 2 targets
    assert n_params == (25 * 256 + 256) + (256 * 160 + 160) + (160 * 2 + 2)
    # which base checkpoints fed it, by path and SHA-256 (of the files as they are on disk)
    from medens.utils.hashing import sha256_file

    for m in ("xray", "ct", "mri"):
        rec = contract["base_checkpoints"][m]
        assert sha256_file(rec["path"]) == rec["sha256"]
    history = json.loads((ens / "ensemble_history.json").read_text())
    assert history and "val/auc" in json.dumps(history)
    report = Path(_summary(pipeline_root)["ensemble"]["report_dir"])
    for name in ("report.md", "report.html", "report.json", "roc_curves.png", "predictions.csv"):
        assert (report / name).is_file(), name
    data = json.loads((report / "report.json").read_text())
    assert set(data["methods"]) == {"xray", "ct", "mri", "weighted_average", "meta_learner"}
    for m in data["methods"]:
        for t in TARGETS:
            r = data["auc"][m][t]
            if r["auc"] is not None:  # strict JSON: an undefined AUC is null, never NaN
                assert r["ci_low"] <= r["auc"] <= r["ci_high"]
    assert "meta_learner" in (report / "report.md").read_text()


@pytest.mark.slow
def test_weighted_average_json_weights_on_the_simplex(pipeline_root: Path):
    wa = json.loads((pipeline_root / "saved_models" / "ensemble" / "weighted_average.json").read_text())
    assert wa["objective"] == "auc" and wa["fit_on"]["n_patients"] > 0
    for t in TARGETS:
        w = np.array(list(wa["targets"][t]["weights"].values()))
        assert set(wa["targets"][t]["weights"]) == {"xray", "ct", "mri"}
        assert (w >= 0).all() and w.sum() == pytest.approx(1.0)


@pytest.mark.slow
def test_no_case_is_in_a_base_training_set_and_the_meta_learners_data(pipeline_root: Path):
    manifest = pd.read_csv(pipeline_root / "data" / "cohort" / "manifest.csv", dtype={"patient_id": str})
    used = set(manifest.loc[manifest["split"].isin(["meta", "test"]), "patient_id"])
    meta_ckpt = torch.load(
        pipeline_root / "saved_models" / "ensemble" / "meta_learner.pth", weights_only=True
    )
    meta_seen = set(meta_ckpt["hyperparameters"]["io_contract"]["seen_patients"])
    assert meta_seen and meta_seen <= used
    for path in ("xray/resnet18_best.pth", "ct/3dcnn_best.pth", "mri/unet_best.pth"):
        ckpt = torch.load(pipeline_root / "saved_models" / path, weights_only=True)
        seen = set(ckpt["hyperparameters"]["io_contract"]["seen_patients"])
        assert seen, path
        assert not seen & used, f"{path} trained on meta/test patients {sorted(seen & used)[:5]}"
        assert not seen & meta_seen
    preds = pd.read_csv(
        Path(_summary(pipeline_root)["ensemble"]["report_dir"]) / "predictions.csv", dtype={"patient_id": str}
    )
    assert set(preds["patient_id"]) <= set(manifest.loc[manifest["split"] == "test", "patient_id"])
    assert not set(preds["patient_id"]) & meta_seen


@pytest.mark.slow
def test_rerun_skips_up_to_date_stages_and_force_reruns_one(pipeline_root: Path):
    out = cli_ok(
        run_cli(
            "main.py", "pipeline=tiny", "force=[ensemble]", root=pipeline_root, env={"OMP_NUM_THREADS": "1"}
        )
    )
    for stage in ("xray", "ct", "mri"):
        assert f"{stage}: up to date, skipped" in out
    assert "[5/5] ensemble: done" in out
    summary = _summary(pipeline_root)
    assert summary["xray"]["skipped"] and "skipped" not in summary["ensemble"]


def _datamodule(root: Path, **overrides):
    from medens.ensemble.datamodule import EnsembleDataModule

    sm = root / "saved_models"
    kwargs = dict(
        manifest=str(root / "data" / "cohort" / "manifest.csv"),
        targets=TARGETS,
        base_models={
            "xray": {"ckpt_path": str(sm / "xray" / "resnet18_best.pth")},
            "ct": {"ckpt_path": str(sm / "ct" / "3dcnn_best.pth")},
            "mri": {"ckpt_path": str(sm / "mri" / "unet_best.pth")},
        },
        cache_dir=None,
        # the pipeline's split seed, so meta-train (and the feature scaling) match the trained meta-learner
        seed=torch.load(sm / "ensemble" / "meta_learner.pth", weights_only=True)["hyperparameters"]["data"][
            "seed"
        ],
    )
    kwargs.update(overrides)
    return EnsembleDataModule(**kwargs)


@pytest.mark.slow
def test_base_models_are_frozen_and_unchanged_by_the_stacking_stage(pipeline_root: Path):
    dm = _datamodule(pipeline_root)
    dm.setup("fit")
    before = {m: {k: v.clone() for k, v in b.module.net.state_dict().items()} for m, b in dm.base.items()}
    for b in dm.base.values():
        assert b.is_frozen()
        assert not b.module.training and all(not p.requires_grad for p in b.module.parameters())
    # a meta-learner training step: base parameters are not among the optimised ones and do not move
    from medens.models.meta_learner import MetaLearner, StackingMLP

    meta = MetaLearner(
        net=StackingMLP(dm.num_features, len(TARGETS)),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    opt = meta.optimizer_factory(params=list(meta.parameters()))
    base_ids = {id(p) for b in dm.base.values() for p in b.module.parameters()}
    assert not base_ids & {id(p) for g in opt.param_groups for p in g["params"]}
    x, y = next(iter(dm.train_dataloader()))
    loss = meta._loss(meta.net(x), y)
    loss.backward()
    opt.step()
    row = dm.frames["test"].iloc[0]
    from medens.data.cohort.manifest import load_manifest

    manifest = load_manifest(dm.manifest_path, TARGETS)
    for m, b in dm.base.items():
        r = manifest[manifest[f"{m}_path"].notna()].iloc[0]
        b.features(r)
        for k, v in b.module.net.state_dict().items():
            assert torch.equal(v, before[m][k]), f"{m}.{k} changed"
        assert b.is_frozen()
    assert row is not None


@pytest.mark.slow
def test_missing_modality_at_train_and_predict_time(pipeline_root: Path):
    dm = _datamodule(pipeline_root)
    dm.setup("fit")
    frame = pd.concat(dm.frames.values(), ignore_index=True)
    slices = dm.modality_slices()
    missing_rows = frame[frame[[f"missing.{m}" for m in slices]].sum(1) > 0]
    assert len(missing_rows), "the tiny cohort should have a patient with a missing modality"
    x = dm.inputs(missing_rows)
    for i, (_, r) in enumerate(missing_rows.iterrows()):
        for m, (cols, ind) in slices.items():
            if r[f"missing.{m}"] == 1:
                assert x[i, ind] == 1.0 and np.all(x[i, cols] == 0.0)
                assert np.isnan(
                    r[[f for f in dm.feature_names if f.startswith(m + ".")]].to_numpy(float)
                ).all()
    # predict time: a complete case with each modality removed in turn still gets a probability
    from medens.models.meta_learner import MetaLearner, StackingMLP

    ckpt = torch.load(pipeline_root / "saved_models" / "ensemble" / "meta_learner.pth", weights_only=True)
    net = StackingMLP(dm.num_features, len(TARGETS))
    net.load_state_dict(ckpt["model_state_dict"])
    meta = MetaLearner(net=net, optimizer=torch.optim.AdamW)
    full = torch.from_numpy(dm.inputs(frame[frame[[f"missing.{m}" for m in slices]].sum(1) == 0].iloc[:1]))
    outs = []
    for cols, ind in slices.values():
        xi = full.clone()
        xi[0, cols] = 0.0
        xi[0, ind] = 1.0
        p = meta.predict_proba(xi)
        assert p.shape == (1, len(TARGETS)) and torch.isfinite(p).all() and ((p > 0) & (p < 1)).all()
        outs.append(p)
    assert not all(torch.equal(outs[0], o) for o in outs[1:])  # the indicators change the prediction


@pytest.mark.slow
def test_missing_base_model_errors_or_stacks_the_rest(pipeline_root: Path, tmp_path: Path):
    from medens.errors import ConfigError

    gone = str(tmp_path / "nowhere" / "unet_best.pth")
    mods = {
        "xray": {"ckpt_path": str(pipeline_root / "saved_models" / "xray" / "resnet18_best.pth")},
        "ct": {"ckpt_path": str(pipeline_root / "saved_models" / "ct" / "3dcnn_best.pth")},
        "mri": {"ckpt_path": gone},
    }
    with pytest.raises(ConfigError, match="mri base model: checkpoint .*unet_best.pth.* not found"):
        _datamodule(pipeline_root, base_models=mods).setup("fit")
    dm = _datamodule(pipeline_root, base_models=mods, on_missing_base="skip")
    dm.setup("fit")
    assert set(dm.base) == {"xray", "ct"} and dm.indicator_names == ["missing.xray", "missing.ct"]
    assert not any(n.startswith("mri.") for n in dm.feature_names)


@pytest.mark.slow
def test_wrong_modality_checkpoint_is_refused(pipeline_root: Path):
    from medens.ensemble.base_models import load_frozen_base_model
    from medens.errors import CheckpointError

    with pytest.raises(
        CheckpointError, match="3dcnn_best.pth: a 'ct' checkpoint was given as the 'xray' base model"
    ):
        load_frozen_base_model("xray", pipeline_root / "saved_models" / "ct" / "3dcnn_best.pth")


@pytest.mark.slow
def test_leaked_patient_is_refused(pipeline_root: Path, tmp_path: Path):
    from medens.ensemble.datamodule import LeakageError

    cohort = pipeline_root / "data" / "cohort"
    manifest = pd.read_csv(cohort / "manifest.csv", dtype={"patient_id": str})
    ckpt = torch.load(pipeline_root / "saved_models" / "ct" / "3dcnn_best.pth", weights_only=True)
    trained_on = ckpt["hyperparameters"]["io_contract"]["seen_patients"][0]
    manifest.loc[manifest["patient_id"] == trained_on, "split"] = "test"
    for col in ("xray_path", "ct_path", "mri_path"):  # absolute, so the copy can live elsewhere
        manifest[col] = [str(cohort / v) if isinstance(v, str) else v for v in manifest[col]]
    path = tmp_path / "manifest.csv"
    manifest.to_csv(path, index=False)
    with pytest.raises(LeakageError, match=f"used to train the (xray|ct|mri) base model.*{trained_on}"):
        _datamodule(pipeline_root, manifest=str(path)).setup("fit")


# -- manifest validation -------------------------------------------------------------------------------
@pytest.fixture
def small_manifest(tmp_path: Path) -> Path:
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "case1").mkdir()
    df = pd.DataFrame(
        {
            "patient_id": ["P1", "P2", "P3"],
            "split": ["meta", "meta", "test"],
            "xray_path": ["a.png", "", "a.png"],
            "mri_path": ["case1", "case1", ""],
            "malignancy": [1, 0, ""],
        }
    )
    path = tmp_path / "manifest.csv"
    df.to_csv(path, index=False)
    return path


def test_manifest_reads_paths_and_missing_modalities(small_manifest: Path):
    from medens.data.cohort import load_manifest

    df = load_manifest(small_manifest, ["malignancy"])
    assert df["xray_path"].iloc[0] == str(small_manifest.parent / "a.png")
    assert pd.isna(df["xray_path"].iloc[1]) and pd.isna(df["ct_path"]).all()
    assert np.isnan(df["malignancy"].iloc[2])


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda d: d.rename(columns={"xray_path": "xray_pth"}),
            r"unknown column 'xray_pth'; did you mean 'xray_path'",
        ),
        (
            lambda d: d.assign(patient_id=["P1", "P2", "P1"]),
            r"patient 'P1' appears on more than one row \(rows \[2, 4\]\)",
        ),
        (
            lambda d: d.assign(xray_path=["a.png", "b.png", ""]),
            r"manifest.csv row 3 \(patient P2\): xray_path 'b.png' does not exist",
        ),
        (lambda d: d.assign(malignancy=[1, 2, 0]), r"row 3 \(patient P2\): target 'malignancy' is '2'"),
        (
            lambda d: d.assign(split=["meta", "train", "test"]),
            r"row 3 \(patient P2\): split 'train' is not base, meta or test",
        ),
        (lambda d: d.drop(columns=["malignancy"]), r"missing column\(s\) \['malignancy'\]"),
    ],
)
def test_manifest_errors_name_the_row(small_manifest: Path, edit, message):
    from medens.data.cohort import load_manifest
    from medens.errors import DataError

    df = pd.read_csv(small_manifest, dtype=str, keep_default_na=False)
    edit(df).to_csv(small_manifest, index=False)
    with pytest.raises(DataError, match=message):
        load_manifest(small_manifest, ["malignancy"])


# -- weighted averaging ---------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["auc", "log_loss"])
def test_weighted_average_weights_on_simplex_favour_the_informative_source(objective):
    from medens.ensemble.weighted_average import apply_weighted_average, fit_weighted_average

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400).astype(float)
    strong = y + rng.normal(0, 0.7, 400)
    weak = y + rng.normal(0, 3.0, 400)
    noise = rng.normal(0, 1, 400) * 50 + 10  # another scale entirely: calibration handles it
    raw = np.stack([weak, strong, noise], 1)
    raw[rng.random(400) < 0.1, 0] = np.nan  # a missing source
    fitted = fit_weighted_average(raw, y, objective, step=0.05)
    w = fitted["weights"]
    assert (w >= 0).all() and w.sum() == pytest.approx(1.0)
    assert np.argmax(w) == 1 and w[2] < 0.2
    p = apply_weighted_average(raw, fitted)
    assert np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()


def test_combine_renormalises_over_present_sources():
    from medens.ensemble.weighted_average import combine, simplex_grid

    probs = np.array([[0.2, np.nan, 0.8], [np.nan, np.nan, np.nan], [0.4, 0.6, np.nan]])
    out = combine(probs, np.array([0.5, 0.25, 0.25]))
    assert out[0] == pytest.approx((0.5 * 0.2 + 0.25 * 0.8) / 0.75)
    assert np.isnan(out[1]) and out[2] == pytest.approx((0.5 * 0.4 + 0.25 * 0.6) / 0.75)
    grid = simplex_grid(3, 0.25)
    assert len(grid) == 15 and np.allclose(grid.sum(1), 1) and (grid >= 0).all()


def test_cohort_generator_is_deterministic_and_refuses_foreign_folders(tmp_path: Path):
    from medens.data.cohort import generate_synthetic_cohort
    from medens.errors import DataError

    kw = dict(n_patients=12, xray_image_size=32, ct_scan_shape=[40, 40, 36], ct_spacing_mm=[1.5, 1.5, 1.5],
              ct_nodules_per_patient=1, mri_shape=[20, 20, 16], xray_images_per_base_patient=1)  # fmt: skip
    a = generate_synthetic_cohort(tmp_path / "a", **kw)
    b = generate_synthetic_cohort(tmp_path / "b", **kw)
    assert (a / "manifest.csv").read_text() == (b / "manifest.csv").read_text()
    df = pd.read_csv(a / "manifest.csv")
    assert set(df["split"]) == {"base", "meta", "test"}
    assert (
        df.loc[df["split"] != "base", ["xray_path", "ct_path", "mri_path"]]
        .stack()
        .dropna()
        .str.startswith("holdout/")
        .all()
    )
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("data")
    with pytest.raises(DataError, match="not a medens synthetic cohort"):
        generate_synthetic_cohort(foreign, **kw)
    assert (foreign / "keep.txt").read_text() == "data"
    shutil.rmtree(a)


# -- the whole ensemble as one module, and its traced export -----------------------------------------
@pytest.mark.slow
def test_stacked_ensemble_matches_the_stacking_stage_features(pipeline_root: Path):
    from medens.data.cohort.manifest import load_manifest
    from medens.data.xray import build_transforms, load_xray_image
    from medens.ensemble.network import build_stacked_ensemble

    ens, info = build_stacked_ensemble(pipeline_root / "saved_models" / "ensemble" / "meta_learner.pth")
    assert info["modalities"] == ["xray", "ct", "mri"] and info["targets"] == TARGETS
    dm = _datamodule(pipeline_root)
    dm.setup("fit")
    manifest = load_manifest(dm.manifest_path, TARGETS)
    row = manifest[manifest["xray_path"].notna() & manifest["split"].isin(["meta", "test"])].iloc[0]
    xb = dm.base["xray"]
    data = xb.hyperparameters["data"]
    x = build_transforms(int(data["image_size"]), int(data["channels"]), str(data["normalize"]), None)(
        load_xray_image(Path(row["xray_path"]))
    )[None]
    np.testing.assert_allclose(ens.heads["xray"](x)[0].numpy(), xb.features(row), atol=1e-6)
    # X-ray only (CT and MRI marked missing): the same probabilities as the meta-learner on the
    # stacking stage's own input vector for that case with those modalities missing
    frame = dm.frames["train"].iloc[:0]
    feats = dm.frames["train"].iloc[[0]].copy()
    for name, value in zip(xb.feature_names, xb.features(row), strict=True):
        feats[name] = value
    for m in ("ct", "mri"):
        feats[[n for n in dm.feature_names if n.startswith(m + ".")]] = np.nan
        feats[f"missing.{m}"] = 1.0
    feats["missing.xray"] = 0.0
    expected = torch.sigmoid(ens.mlp(torch.from_numpy(dm.inputs(pd.concat([frame, feats])))))
    ct_shape, mri_shape = info["input_shapes"]["ct"], info["input_shapes"]["mri"]
    got = ens(x, torch.zeros(1, *ct_shape), torch.zeros(1, *mri_shape), torch.tensor([[1.0, 0.0, 0.0]]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_ensemble_traced_export_runs_without_medens(pipeline_root: Path, tmp_path: Path):
    import subprocess
    import sys

    from medens.ensemble.network import build_stacked_ensemble, example_inputs

    out = cli_ok(
        run_cli("export.py", "targets=[ensemble_traced]", root=pipeline_root, env={"OMP_NUM_THREADS": "1"})
    )
    assert "ensemble_traced" in out
    path = pipeline_root / "saved_models" / "exports" / "ensemble_traced.pt"
    manifest = json.loads((path.parent / "manifest.json").read_text())["exports"]["ensemble_traced"]
    assert manifest["verification"]["passed"] and [
        c["batch_size"] for c in manifest["verification"]["checks"]
    ] == [1, 3]
    # what a server needs of each base model: its checkpoint's io_contract (no patient list) and SHA-256
    from medens.checkpoint.io import load_checkpoint
    from medens.utils.hashing import sha256_file

    meta = load_checkpoint(pipeline_root / "saved_models" / "ensemble" / "meta_learner.pth")
    records = meta["hyperparameters"]["io_contract"]["base_checkpoints"]
    assert sorted(manifest["base_models"]) == sorted(records) == ["ct", "mri", "xray"]
    for m, rec in records.items():
        contract = dict(load_checkpoint(rec["path"])["hyperparameters"]["io_contract"])
        assert contract.pop("seen_patients", None), f"{m}: the base checkpoint records its patients"
        assert manifest["base_models"][m]["io_contract"] == json.loads(json.dumps(contract))
        assert manifest["base_models"][m]["sha256"] == sha256_file(rec["path"]) == rec["sha256"]
    ens, info = build_stacked_ensemble(pipeline_root / "saved_models" / "ensemble" / "meta_learner.pth")
    inputs = list(example_inputs(info, batch=4, seed=7))
    inputs[3] = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    expected = ens(*inputs).numpy()
    for i, t in enumerate(inputs):
        np.save(tmp_path / f"in{i}.npy", t.numpy())
    code = (
        "import sys, numpy as np, torch\n"
        f"m = torch.jit.load({str(path)!r})\n"
        f"x = [torch.from_numpy(np.load({str(tmp_path)!r} + f'/in{{i}}.npy')) for i in range(4)]\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, m(*x).numpy())\n"
        "assert not any(k.startswith('medens') for k in sys.modules)\n"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-4, rtol=1e-3)
