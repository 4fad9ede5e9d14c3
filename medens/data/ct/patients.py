"""Patients of LUNA16 nodules: the annotations name series only, and one LIDC-IDRI patient can have
several series (e.g. two CT studies). A patient-level split needs the series-to-patient map, or two
series of one patient can land in different splits (leakage)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pandas as pd

from medens.data.ct.labels import NoduleRecord
from medens.errors import DataError

log = logging.getLogger(__name__)

MISSING_PATIENT_POLICIES = ("error", "warn")
#: Accepted column names: medens' own, and the LIDC-IDRI metadata / TCIA manifest ones.
SERIES_COLUMNS = ("seriesuid", "Series UID", "SeriesInstanceUID", "series_uid")
PATIENT_COLUMNS = ("patient_id", "Subject ID", "PatientID", "Patient ID")


def _pick(columns: list[str], names: tuple[str, ...], path: Path, what: str) -> str:
    for n in names:
        if n in columns:
            return n
    raise DataError(f"{path}: series-to-patient table needs a {what} column (one of {list(names)}); found {columns}")


def read_series_patient_table(path: Path) -> dict[str, str]:
    """seriesuid -> patient id; a series listed with two patients is an error."""
    try:
        df = pd.read_csv(path, dtype=str)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the series-to-patient table ({exc})") from exc
    s_col = _pick(list(df.columns), SERIES_COLUMNS, path, "series")
    p_col = _pick(list(df.columns), PATIENT_COLUMNS, path, "patient")
    df = df[[s_col, p_col]].dropna().drop_duplicates()
    df[s_col], df[p_col] = df[s_col].str.strip(), df[p_col].str.strip()
    dup = df[s_col].duplicated(keep=False)
    if dup.any():
        uid = df.loc[dup, s_col].iloc[0]
        raise DataError(f"{path}: series {uid} is listed with several patients {sorted(df.loc[df[s_col] == uid, p_col])}")
    return dict(zip(df[s_col], df[p_col], strict=True))


def assign_patients(
    records: list[NoduleRecord], root: Path, table: str | None, missing: str = "error"
) -> list[NoduleRecord]:
    """Records with patient ids from ``table`` (sources whose annotations name series); without a table
    and without a patient_id column or DICOM PatientID, refuse (``missing='error'``) or warn (``'warn'``)."""
    if not records:
        return records
    if table:
        path = Path(table) if Path(table).is_absolute() else Path(root) / table
        if not path.is_file():
            raise DataError(f"{path}: series-to-patient table not found (data.source.series_patient_table)")
        mapping = read_series_patient_table(path)
        unknown = sorted({r.series_uid for r in records if r.series_uid not in mapping})
        if unknown:
            raise DataError(
                f"{path}: {len(unknown)} series of the annotations have no patient in the table "
                f"(first: {unknown[:5]}); every series needs its patient for a patient-level split"
            )
        return [dataclasses.replace(r, patient_id=mapping[str(r.series_uid)]) for r in records]
    by_series = [r for r in records if r.patient_id == r.series_uid]
    if not by_series:
        return records  # the labels table names the patients
    msg = (
        f"{root}: {len(by_series)} of {len(records)} nodules have no patient id (the annotations name series "
        "only), so each series counts as its own patient and two series of one patient can land in different "
        "splits (leakage). Give data.source.series_patient_table=<csv with seriesuid,patient_id> (e.g. from the "
        "LIDC-IDRI metadata), a patient_id column in the labels table, or data.source.missing_patient_ids=warn"
    )
    if missing == "error":
        raise DataError(msg)
    log.warning("LEAKAGE RISK: %s", msg)
    return records
