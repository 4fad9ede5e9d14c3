"""The README's "Add a dataset" worked example, run as written: its reader file and its config file, on a
hospital-style export (NIfTI scans and one CSV) made from the synthetic LUNA16 set's own scans.

The reader must give the LUNA16 reader's patches for the same nodules, train through
`data/source=ct_hospital`, and its checkpoint must be evaluated with the reader rebuilt from the recorded
`data.source`, also on another folder (`data.root=`), as the README says."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

import medens.data.ct
from medens.data.ct import CTDataModule
from medens.data.ct.synthetic import generate_luna16_synthetic
from tests.helpers import ONE_EPOCH, ROOT, TINY_CT, compose, train_in_process

MODULE = "medens.data.ct.readers_hospital"
SECTION = ROOT.joinpath("README.md").read_text(encoding="utf-8").split("### Add a dataset", 1)[1]
READER_CODE = re.search(r"```python\n(.*?)```", SECTION, re.S).group(1)
SOURCE_YAML = re.search(r"```yaml\n(.*?)```", SECTION, re.S).group(1)
#: TINY_CT without the synthetic generator's keys (this source is no generator)
TINY = [o for o in TINY_CT if not o.startswith("data.source.")]


@pytest.fixture
def hospital_reader(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The README's reader importable as `medens.data.ct.readers_hospital`; returns a config folder holding
    the README's `data/source/ct_hospital.yaml` (for `hydra.searchpath`)."""
    module = types.ModuleType(MODULE)
    module.__file__ = str(tmp_path / "readers_hospital.py")
    monkeypatch.setitem(sys.modules, MODULE, module)
    exec(compile(READER_CODE, module.__file__, "exec"), module.__dict__)  # noqa: S102 (the README's own code)
    monkeypatch.setattr(medens.data.ct, "readers_hospital", module, raising=False)
    conf = tmp_path / "conf_extra"
    (conf / "data" / "source").mkdir(parents=True)
    (conf / "data" / "source" / "ct_hospital.yaml").write_text(SOURCE_YAML, encoding="utf-8")
    return conf


def _hospital_export(luna: Path, out: Path, prefix: str = "case") -> Path:
    """`scans/<case>.nii.gz` and `nodules.csv` (case, patient, x, y, z, malignant) from a LUNA16-format set;
    LIDC scores 3 (indeterminate) are left out, >= 4 is malignant."""
    (out / "scans").mkdir(parents=True)
    labels = pd.read_csv(luna / "labels.csv")
    rows = []
    for i, (uid, group) in enumerate(labels.groupby("seriesuid", sort=True)):
        case = f"{prefix}{i:02d}"
        sitk.WriteImage(sitk.ReadImage(str(next(luna.rglob(f"{uid}.mhd")))), str(out / "scans" / f"{case}.nii.gz"))
        rows += [{"case": case, "patient": r.patient_id, "x": r.coordX, "y": r.coordY, "z": r.coordZ,
                  "malignant": int(r.malignancy >= 4)} for r in group.itertuples() if r.malignancy != 3]  # fmt: skip
    pd.DataFrame(rows).to_csv(out / "nodules.csv", index=False)
    return out


def _patches(dm: CTDataModule) -> dict[tuple[float, ...], tuple[str, str, float, np.ndarray]]:
    """{nodule centre (world mm): (split, patient, label, patch)} over every split."""
    return {
        tuple(np.round(rec.center_world, 3)): (split, rec.patient_id, ds.labels[i], ds[i]["image"].numpy())
        for split, ds in dm.datasets.items() for i, rec in enumerate(ds.records)
    }  # fmt: skip


def test_readme_reader_gives_the_luna16_readers_patches(hospital_reader: Path, tmp_path: Path) -> None:
    luna = generate_luna16_synthetic(tmp_path / "luna", n_patients=6, nodules_per_patient=3, scan_shape=[64, 64, 48])
    hospital = _hospital_export(luna, tmp_path / "hospital")
    kw = {"patch_size": 16, "val_fraction": 0.2, "test_fraction": 0.2, "augment": {"enabled": False}}
    source = {"_target_": f"{MODULE}.HospitalReader", "nodules_csv": "nodules.csv"}
    ours = CTDataModule(root=str(hospital), source=source, cache_dir=str(tmp_path / "c1"), **kw)
    ref = CTDataModule(root=str(luna), source="luna16", cache_dir=str(tmp_path / "c2"), **kw)
    for dm in (ours, ref):
        dm.prepare_data()
        dm.setup()
    got, want = _patches(ours), _patches(ref)
    assert len(got) == len(pd.read_csv(hospital / "nodules.csv")) > 0
    assert set(got) == set(want)  # the same nodules, by their world centre
    for centre, (split, patient, label, patch) in got.items():
        assert (split, patient, label) == want[centre][:3], centre  # same patient split, same label
        np.testing.assert_allclose(patch, want[centre][3], atol=1e-3, err_msg=str(centre))  # float16 cache
    assert ours.hparams["source"] == source  # what a checkpoint records
    assert ours.cache_path is not None and ours.cache_path.name.startswith("ct-hospital-")  # `name`: the prefix


@pytest.mark.slow
def test_readme_dataset_trains_and_evaluates_from_its_checkpoint(hospital_reader: Path, tmp_path: Path) -> None:
    from medens.checkpoint.io import load_checkpoint
    from medens.evaluation.evaluate import evaluate
    from medens.evaluation.external import hydra_data_overrides

    hospital = _hospital_export(generate_luna16_synthetic(tmp_path / "luna", n_patients=8, nodules_per_patient=4,
                                                          scan_shape=[64, 64, 48]), tmp_path / "hospital")  # fmt: skip
    other = _hospital_export(generate_luna16_synthetic(tmp_path / "luna2", n_patients=4, nodules_per_patient=4,
                                                       scan_shape=[64, 64, 48], seed=7), tmp_path / "other", "ext")  # fmt: skip
    searchpath = f"hydra.searchpath=[file://{hospital_reader}]"
    train_in_process(tmp_path, "experiment=ct", "data/source=ct_hospital", f"data.root={hospital}", searchpath,
                     *TINY, *ONE_EPOCH)  # fmt: skip
    (ckpt,) = (tmp_path / "saved_models" / "ct").glob("*_best.pth")
    recorded = load_checkpoint(ckpt)["hyperparameters"]["data"]
    assert recorded["source"] == {"_target_": f"{MODULE}.HospitalReader", "nodules_csv": "nodules.csv"}
    for name, root, split in (("own", hospital, "test"), ("elsewhere", other, "all")):
        args = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/{name}", f"ckpt_path={ckpt}",
                f"data.root={root}", f"split={split}", "bootstrap.n_resamples=50"]  # as scripts/evaluate.py reads them
        cfg = compose("evaluate", *hydra_data_overrides(args))
        evaluate(cfg)
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        predictions = pd.read_csv(next((tmp_path / name).rglob("predictions*.csv")))
        assert metrics["data"] == str(root) and metrics["n_cases"] == len(predictions) > 0
        if name == "elsewhere":  # every nodule of the other folder's CSV, none of the training folder's
            table = pd.read_csv(other / "nodules.csv")
            assert len(predictions) == len(table)
            assert set(predictions["case_id"]) == {f"{r.case}_{i}" for i, r in enumerate(table.itertuples())}
