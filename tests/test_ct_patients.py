"""Issue 15 item 7: no leakage in a LUNA16 split. The annotations name series only; two series of one
patient must land in the same split (series-to-patient table), and without patient ids the split
refuses to run (or warns loudly, by config)."""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from medens.data.ct import CTDataModule, Luna16Reader
from medens.data.ct.synthetic import generate_luna16_synthetic
from medens.errors import DataError


@pytest.fixture(scope="module")
def luna_no_patients(tmp_path_factory):
    """A LUNA16-format set whose tables name series only (as the real LUNA16 annotations do)."""
    root = tmp_path_factory.mktemp("luna")
    data = generate_luna16_synthetic(root / "set", n_patients=8, nodules_per_patient=3, seed=2,
                                     scan_shape=(48, 48, 40))  # fmt: skip
    labels = pd.read_csv(data / "labels.csv")
    truth = labels.drop_duplicates("seriesuid").set_index("seriesuid")["patient_id"].astype(str)
    labels.drop(columns="patient_id").to_csv(data / "labels.csv", index=False)
    return data, truth, root / "cache"


def _dm(data, cache, **kw):
    return CTDataModule(root=str(data), patch_size=16, val_fraction=0.25, test_fraction=0.25, seed=3,
                        cache_dir=str(cache), augment=False, source=Luna16Reader(**kw))  # fmt: skip


def test_without_patient_ids_the_split_refuses_or_warns(luna_no_patients, caplog):
    data, _, cache = luna_no_patients
    with pytest.raises(DataError, match="no patient id.*series_patient_table"):
        _dm(data, cache, missing_patient_ids="error").setup()
    with caplog.at_level(logging.WARNING):
        dm = _dm(data, cache)  # the default warns loudly
        dm.setup()
    assert "LEAKAGE RISK" in caplog.text
    assert sum(len(d) for d in dm.datasets.values()) > 0


def test_two_series_of_one_patient_land_in_the_same_split(luna_no_patients, tmp_path):
    data, truth, cache = luna_no_patients
    series = list(truth.index)
    # the first two series belong to one patient; with them two distinct "patients", a seed could split them
    table = pd.DataFrame({"Series UID": series, "Subject ID": ["LIDC-IDRI-0001", "LIDC-IDRI-0001",
                                                               *[f"LIDC-IDRI-{i:04d}" for i in range(2, len(series))]]})  # fmt: skip
    table.to_csv(tmp_path / "lidc_metadata.csv", index=False)
    for seed in range(6):  # whichever seed: never across splits
        dm = CTDataModule(root=str(data), patch_size=16, val_fraction=0.25, test_fraction=0.25, seed=seed,
                          cache_dir=str(cache), augment=False,
                          source=Luna16Reader(series_patient_table=str(tmp_path / "lidc_metadata.csv")))  # fmt: skip
        dm.setup()
        where = {s: {r.series_uid for r in dm.datasets[s].records} for s in ("train", "val", "test")}
        holding = [s for s, uids in where.items() if series[0] in uids or series[1] in uids]
        assert len(holding) == 1, (seed, holding)
        assert {r.patient_id for r in dm.datasets[holding[0]].records if r.series_uid in series[:2]} == {"LIDC-IDRI-0001"}
    # a series missing from the table is an error naming it
    table.iloc[1:].to_csv(tmp_path / "partial.csv", index=False)
    with pytest.raises(DataError, match=series[0].replace(".", r"\.")):
        _dm(data, cache, series_patient_table=str(tmp_path / "partial.csv")).setup()
