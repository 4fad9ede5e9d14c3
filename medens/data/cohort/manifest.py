"""The multi-modal cohort manifest: one row per patient, a path per modality, patient-level targets.

Columns (paths relative to the manifest's folder, or absolute; any modality may be empty):

=================  ==========================================================================
patient_id         unique per row
split              optional: ``base`` (base models may train on it), ``meta``, ``test``
xray_path          a chest radiograph (PNG, any NIH-readable mode)
ct_path            a CT scan (``.mhd``, NIfTI, or a DICOM series folder) with the nodule centre
ct_x, ct_y, ct_z   in world mm (LUNA16 convention); or a pre-cropped nodule volume without them
ct_diameter_mm     optional (needed when the CT model takes a mask channel)
mri_path           a BraTS case folder
<targets>          0/1 (empty: unknown), named in config
=================  ==========================================================================
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medens.errors import DataError

log = logging.getLogger(__name__)

MODALITY_COLUMNS = {"xray": "xray_path", "ct": "ct_path", "mri": "mri_path"}
CT_COORDS = ("ct_x", "ct_y", "ct_z")
KNOWN_COLUMNS = ("patient_id", "split", *MODALITY_COLUMNS.values(), *CT_COORDS, "ct_diameter_mm")


def _where(path: Path, i: int, pid: str | None = None) -> str:
    """Row reference as a spreadsheet shows it (header is line 1)."""
    return f"{path} row {i + 2}" + (f" (patient {pid})" if pid else "")


def load_manifest(
    path: str | Path,
    targets: Sequence[str],
    modalities: Sequence[str] = ("xray", "ct", "mri"),
    extra_columns: Sequence[str] = (),
    check_files: bool = True,
) -> pd.DataFrame:
    """Read and validate a manifest; returns it with absolute paths (NaN where a modality is absent).

    Unknown columns, missing target columns, duplicate patients, bad target values and paths that do
    not exist are errors naming the file, row and value, so a typo never silently drops a modality.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: cohort manifest not found")
    try:
        df = pd.read_csv(path, dtype={"patient_id": str})
    except Exception as exc:  # noqa: BLE001 (pandas raises many types)
        raise DataError(f"{path}: cannot read the cohort manifest ({exc})") from exc
    unknown_mod = [m for m in modalities if m not in MODALITY_COLUMNS]
    if unknown_mod:
        raise DataError(f"{path}: unknown modality {unknown_mod}; known: {list(MODALITY_COLUMNS)}")
    allowed = set(KNOWN_COLUMNS) | set(targets) | set(extra_columns)
    for col in df.columns:
        if col not in allowed:
            near = difflib.get_close_matches(col, sorted(allowed), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise DataError(
                f"{path}: unknown column {col!r}{hint} (known: {sorted(KNOWN_COLUMNS)}, targets: {list(targets)}; "
                "declare other columns in extra_columns)"
            )
    need = ["patient_id", *targets]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}")
    if df.empty:
        raise DataError(f"{path}: the manifest has no rows")
    for i, pid in enumerate(df["patient_id"]):
        if pd.isna(pid) or not str(pid).strip():
            raise DataError(f"{_where(path, i)}: empty patient_id")
    dup = df["patient_id"].duplicated(keep=False)
    if dup.any():
        rows = np.flatnonzero(dup.to_numpy())
        pid = df["patient_id"].iloc[rows[0]]
        same = [int(r) + 2 for r in rows if df["patient_id"].iloc[r] == pid]
        raise DataError(
            f"{path}: patient {pid!r} appears on more than one row (rows {same}); one row per patient"
        )
    if "split" in df.columns:
        bad = ~df["split"].isin(["base", "meta", "test"]) & df["split"].notna()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"{_where(path, i, df['patient_id'].iloc[i])}: split {df['split'].iloc[i]!r} is not base, meta or test"
            )
    for t in targets:
        vals = pd.to_numeric(df[t], errors="coerce")
        bad = (vals.notna() & ~vals.isin([0, 1])) | (vals.isna() & df[t].notna())
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"{_where(path, i, df['patient_id'].iloc[i])}: target {t!r} is {str(df[t].iloc[i])!r}; expected 0, 1 or empty"
            )
        df[t] = vals.astype(float)
    root = path.parent
    for m in modalities:
        col = MODALITY_COLUMNS[m]
        if col not in df.columns:
            df[col] = np.nan
            continue
        resolved = []
        for i, (pid, value) in enumerate(zip(df["patient_id"], df[col], strict=True)):
            if pd.isna(value) or not str(value).strip():
                resolved.append(np.nan)
                continue
            p = Path(str(value))
            p = p if p.is_absolute() else root / p
            if check_files and not p.exists():
                raise DataError(f"{_where(path, i, pid)}: {col} {str(value)!r} does not exist ({p})")
            resolved.append(str(p))
        df[col] = resolved
    if "ct" in modalities:
        present = [c for c in CT_COORDS if c in df.columns]
        if present and len(present) != 3:
            raise DataError(f"{path}: CT coordinates need all of {list(CT_COORDS)}, found {present}")
        if present:
            for c in CT_COORDS:
                df[c] = pd.to_numeric(df[c], errors="coerce")
            for i in range(len(df)):
                has_path = not pd.isna(df["ct_path"].iloc[i])
                coords = df.loc[df.index[i], list(CT_COORDS)]
                if has_path and coords.isna().any() and coords.notna().any():
                    raise DataError(
                        f"{_where(path, i, df['patient_id'].iloc[i])}: ct_x/ct_y/ct_z must be all set or all empty"
                    )
    for m in modalities:
        n = int(df[MODALITY_COLUMNS[m]].isna().sum())
        if n:
            log.info("cohort %s: %d of %d patients have no %s", path.name, n, len(df), m)
    return df.reset_index(drop=True)
