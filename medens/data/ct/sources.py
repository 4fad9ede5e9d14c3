"""Turning each on-disk CT layout into a list of :class:`NoduleRecord` (no pixels read yet).

Layouts: LUNA16 (scans named `<seriesuid>.mhd`/`.nii(.gz)` anywhere under the scans folder, an
`annotations.csv` in world mm, an optional labels table matched to it by series and position),
DICOM series (one folder per series, matched by SeriesInstanceUID), pre-cropped nodule volumes
(`lidc_voi`: NIfTI crops, masks and a labels CSV) and NoduleMNIST3D `.npz`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medens.data.ct import io as ct_io
from medens.data.ct.labels import NoduleRecord
from medens.errors import ConfigError, DataError

log = logging.getLogger(__name__)

COORD_COLUMNS = ("coordX", "coordY", "coordZ")
_GEOMETRY_COLUMNS = {"seriesuid", *COORD_COLUMNS, "diameter_mm"}
NODULEMNIST_KEYS = ("train", "val", "test")


class ErrorPolicy:
    """`on_error: error` raises at the first bad input; `skip` records it (counted, logged) and goes on."""

    def __init__(self, mode: str) -> None:
        if mode not in ("error", "skip"):
            raise ConfigError(f"on_error must be 'error' or 'skip', got {mode!r}")
        self.mode = mode
        self.skipped: list[dict[str, str]] = []

    def fail(self, message: str, case_ids: Sequence[str], file: str | os.PathLike) -> None:
        if self.mode == "error":
            raise DataError(message)
        log.warning("skipping %d nodule(s): %s", len(case_ids), message)
        for cid in case_ids:
            self.skipped.append({"case_id": str(cid), "file": str(file), "reason": message})


def resolve(root: Path, rel: str | os.PathLike | None) -> Path | None:
    """A config path: absolute as given, otherwise relative to the dataset root."""
    if rel is None:
        return None
    p = Path(rel)
    return p if p.is_absolute() else root / p


def read_csv(path: Path, required: Sequence[str], what: str) -> pd.DataFrame:
    """Read a CSV, checking it exists and has the required columns (named in the error)."""
    if not path.is_file():
        raise DataError(f"{path}: {what} does not exist")
    try:
        df = pd.read_csv(path)
    except Exception as exc:  # pandas raises several parser errors
        raise DataError(f"{path}: cannot parse {what} ({exc})") from exc
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: {what} lacks column(s) {missing}; has {list(df.columns)}")
    return df


def _plain(v: Any) -> Any:
    """CSV cell -> JSON-safe value (numpy scalars to Python, NaN kept as float NaN)."""
    if isinstance(v, np.generic):
        v = v.item()
    return v


# --------------------------------------------------------------------------------------- scan indexes


def index_scan_files(scans_root: Path) -> dict[str, Path]:
    """Map series UID (the file stem) to scan file for every `.mhd`/`.mha`/`.nii(.gz)` under a folder."""
    if not scans_root.is_dir():
        raise DataError(f"{scans_root}: scans folder does not exist")
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(scans_root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not name.lower().endswith(ct_io.SCAN_SUFFIXES):
                continue
            uid = ct_io.scan_stem(p)
            if uid in found:
                raise DataError(f"{p}: series {uid} also exists as {found[uid]}; keep one scan per series")
            found[uid] = p
    return found


def index_dicom_folders(
    scans_root: Path, policy: ErrorPolicy | None = None
) -> tuple[dict[str, Path], dict[str, str]]:
    """Map SeriesInstanceUID to its folder; folders mixing series go to the second dict (uid -> error).

    An unreadable folder raises, or under ``on_error=skip`` is logged and left out (its series then
    reads as having no scan).
    """
    if not scans_root.is_dir():
        raise DataError(f"{scans_root}: DICOM scans folder does not exist")
    found: dict[str, Path] = {}
    bad: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(scans_root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if not any(not f.startswith(".") for f in filenames):
            continue
        folder = Path(dirpath)
        try:
            uids = ct_io.dicom_series_uids(folder)
        except DataError as exc:
            if policy is None or policy.mode == "error":
                raise
            log.warning("skipping DICOM folder %s: %s", folder, exc)
            continue
        if not uids:
            continue
        if len(uids) > 1:
            msg = (
                f"{folder}: the folder mixes {len(uids)} DICOM series ({', '.join(sorted(uids))}); "
                "put each series in its own folder"
            )
            for uid in uids:
                bad[uid] = msg
            continue
        (uid,) = uids
        if uid in found:
            raise DataError(f"{folder}: series {uid} is split over this folder and {found[uid]}")
        found[uid] = folder
    return found, bad


# ------------------------------------------------------------------------------- LUNA16 / DICOM layout


def _match_labels(ann: pd.DataFrame, labels: pd.DataFrame, tol_mm: float) -> dict[int, int]:
    """One-to-one match of annotation rows to label rows of the same series, nearest first, within tol."""
    out: dict[int, int] = {}
    lab_by_uid = {uid: g for uid, g in labels.groupby("seriesuid", sort=False)}
    for uid, g in ann.groupby("seriesuid", sort=False):
        lg = lab_by_uid.get(uid)
        if lg is None:
            continue
        a = g[list(COORD_COLUMNS)].to_numpy(dtype=np.float64)
        b = lg[list(COORD_COLUMNS)].to_numpy(dtype=np.float64)
        dist = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
        pairs = sorted(
            (dist[i, j], i, j) for i in range(len(a)) for j in range(len(b)) if dist[i, j] <= tol_mm
        )
        used_a: set[int] = set()
        used_b: set[int] = set()
        for _, i, j in pairs:
            if i in used_a or j in used_b:
                continue
            used_a.add(i)
            used_b.add(j)
            out[int(g.index[i])] = int(lg.index[j])
    return out


def index_annotated_scans(
    root: Path,
    annotations_csv: str,
    labels_csv: str | None,
    scans_dir: str,
    kind: str,
    label_match_mm: float,
    policy: ErrorPolicy,
) -> tuple[list[NoduleRecord], list[dict[str, str]]]:
    """Records for a LUNA16-style set (``kind`` 'luna16': scan files; 'dicom': series folders).

    Returns (records, excluded): excluded are annotations with no label row within
    ``label_match_mm`` (reported, not errors: unlabelled nodules are normal in LUNA16).
    """
    ann_path = resolve(root, annotations_csv)
    assert ann_path is not None
    ann = read_csv(ann_path, ["seriesuid", *COORD_COLUMNS], "annotations CSV")
    ann["seriesuid"] = ann["seriesuid"].astype(str)
    for c in COORD_COLUMNS:  # a non-numeric cell becomes NaN and is reported per row below
        ann[c] = pd.to_numeric(ann[c], errors="coerce")
    lab_path = resolve(root, labels_csv)
    if lab_path is not None and lab_path.resolve() != ann_path.resolve():
        labels = read_csv(lab_path, ["seriesuid", *COORD_COLUMNS], "labels CSV")
        labels["seriesuid"] = labels["seriesuid"].astype(str)
        for c in COORD_COLUMNS:
            labels[c] = pd.to_numeric(labels[c], errors="coerce")
        matched = _match_labels(ann, labels, label_match_mm)
    else:
        lab_path, labels, matched = ann_path, ann, {int(i): int(i) for i in ann.index}
    scans_root = resolve(root, scans_dir)
    assert scans_root is not None
    bad: dict[str, str] = {}
    if kind == "dicom":
        scans, bad = index_dicom_folders(scans_root, policy)
    else:
        scans = index_scan_files(scans_root)

    records: list[NoduleRecord] = []
    excluded: list[dict[str, str]] = []
    counter: dict[str, int] = {}
    for row_i, row in ann.iterrows():
        uid = row["seriesuid"]
        n = counter.get(uid, 0)
        counter[uid] = n + 1
        case_id = f"{uid}_{n}"
        centre = [float(row[c]) for c in COORD_COLUMNS]
        if not all(math.isfinite(c) for c in centre):
            policy.fail(
                f"{ann_path}: row {row_i} ({case_id}) has a non-numeric world coordinate", [case_id], ann_path
            )
            continue
        if uid in bad:
            policy.fail(bad[uid], [case_id], scans.get(uid, scans_root))
            continue
        if uid not in scans:
            policy.fail(
                f"{ann_path}: series {uid} (row {row_i}) has no scan under {scans_root}", [case_id], ann_path
            )
            continue
        lab_i = matched.get(int(row_i))
        if lab_i is None:
            excluded.append(
                {
                    "case_id": case_id,
                    "file": str(lab_path),
                    "reason": f"no label row within {label_match_mm} mm in {lab_path}",
                }
            )
            continue
        lrow = labels.loc[lab_i]
        fields = {k: _plain(v) for k, v in lrow.items() if k not in _GEOMETRY_COLUMNS}
        diameter = row.get("diameter_mm", math.nan)
        if pd.isna(diameter):
            diameter = lrow.get("diameter_mm", math.nan)
        patient = fields.get("patient_id", row.get("patient_id", uid))
        records.append(
            NoduleRecord(
                case_id=case_id,
                patient_id=str(uid if pd.isna(patient) else patient),
                source_file=str(scans[uid]),
                center_world=centre,
                diameter_mm=float(diameter) if not pd.isna(diameter) else math.nan,
                label_fields=fields,
                series_uid=uid,
            )
        )
    if excluded:
        log.warning(
            "%d annotated nodule(s) have no label row and are left out (first: %s)",
            len(excluded),
            excluded[0]["case_id"],
        )
    return records, excluded


# ------------------------------------------------------------------------------ pre-cropped nodules


def index_voi(
    root: Path,
    labels_csv: str,
    image_dir: str,
    mask_dir: str,
    need_mask: bool,
    policy: ErrorPolicy,
) -> tuple[list[NoduleRecord], list[dict[str, str]]]:
    """Records for a folder of NIfTI nodule crops (``image_dir``), masks (``mask_dir``) and a labels CSV."""
    lab_path = resolve(root, labels_csv)
    assert lab_path is not None
    df = read_csv(lab_path, ["file"], "labels CSV")
    if "patient_id" not in df.columns:
        raise DataError(f"{lab_path}: labels CSV needs a patient_id column (splits are by patient)")
    img_root, mask_root = resolve(root, image_dir), resolve(root, mask_dir)
    assert img_root is not None and mask_root is not None
    records: list[NoduleRecord] = []
    excluded: list[dict[str, str]] = []
    for row_i, row in df.iterrows():
        fname = str(row["file"])
        case_id = ct_io.scan_stem(Path(fname))
        if "has_image" in df.columns and str(row["has_image"]).lower() in ("false", "0"):
            excluded.append({"case_id": case_id, "file": str(lab_path), "reason": "has_image is False"})
            continue
        img = img_root / fname
        if not img.is_file():
            policy.fail(f"{img}: crop listed in {lab_path} (row {row_i}) does not exist", [case_id], img)
            continue
        mask: Path | None = mask_root / fname
        if need_mask and not mask.is_file():
            policy.fail(
                f"{mask}: mask channel requested but the mask of {case_id} does not exist", [case_id], mask
            )
            continue
        if not mask.is_file():
            mask = None
        fields = {k: _plain(v) for k, v in row.items() if k not in ("file", "diameter_mm")}
        diameter = row.get("diameter_mm", math.nan)
        records.append(
            NoduleRecord(
                case_id=case_id,
                patient_id=str(row["patient_id"]),
                source_file=str(img),
                center_world=None,
                diameter_mm=float(diameter) if not pd.isna(diameter) else math.nan,
                label_fields=fields,
                mask_file=str(mask) if mask is not None else None,
                series_uid=str(row["seriesuid"]) if "seriesuid" in df.columns else None,
            )
        )
    return records, excluded


# ------------------------------------------------------------------------------------ NoduleMNIST3D


def load_nodulemnist3d(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The official splits of a NoduleMNIST3D `.npz`: split -> (uint8 images N x D x H x W, labels N)."""
    if not path.is_file():
        raise DataError(f"{path}: NoduleMNIST3D .npz does not exist")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:  # zipfile / format errors
        raise DataError(f"{path}: cannot read as .npz ({exc})") from exc
    out = {}
    with npz:
        for split in NODULEMNIST_KEYS:
            ik, lk = f"{split}_images", f"{split}_labels"
            if ik not in npz.files or lk not in npz.files:
                raise DataError(f"{path}: missing key {ik!r} or {lk!r} (has {sorted(npz.files)})")
            images, labels = npz[ik], npz[lk]
            if images.ndim == 5 and images.shape[1] == 1:
                images = images[:, 0]
            if images.ndim != 4:
                raise DataError(f"{path}: {ik} has shape {images.shape}, expected N x D x H x W")
            labels = labels.reshape(len(labels), -1)
            if labels.shape != (len(images), 1):
                raise DataError(f"{path}: {lk} has shape {labels.shape}, expected ({len(images)}, 1)")
            if not np.isin(labels, (0, 1)).all():
                raise DataError(f"{path}: {lk} holds values other than 0 (benign) and 1 (malignant)")
            out[split] = (images, labels[:, 0].astype(np.int64))
    return out


def nodulemnist_records(data: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[NoduleRecord]:
    """One record per image; NoduleMNIST3D has no patient IDs, so each image is its own 'patient'
    and the official (patient-level) split is kept."""
    records = []
    for split in NODULEMNIST_KEYS:
        _, labels = data[split]
        for i, y in enumerate(labels):
            cid = f"{split}_{i:05d}"
            records.append(
                NoduleRecord(
                    case_id=cid,
                    patient_id=cid,
                    source_file="",
                    label_fields={"label": int(y)},
                    official_split=split,
                )
            )
    return records
