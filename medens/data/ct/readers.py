"""One reader per CT source: the cases of a dataset folder, their pixels, and what the cache must notice.

A reader knows one on-disk layout and nothing about patches, caches or splits; `CTDataModule` takes it
as ``data.source``, a Hydra ``_target_`` (``conf/data/source/ct_*.yaml``) or one of the short names of
:data:`READERS` (``data.source=dicom``). Every reader has the same three methods:

- ``list_cases(root, policy, need_mask)``: the nodules as :class:`NoduleRecord` with patient ids (no
  pixels read), and those left out with a reason;
- ``read_case(source_file)``: the :class:`~medens.data.ct.io.Scan` (HU and geometry) records point at;
- ``fingerprint(root, exclude)``: a JSON-able description of the input files, part of the cache key.

Paths are relative to the datamodule's ``root`` (so ``data.root=<another hospital>`` reuses a reader).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from medens.data.ct import io as ct_io
from medens.data.ct.cache import fingerprint_tree
from medens.data.ct.labels import NoduleRecord
from medens.data.ct.patients import MISSING_PATIENT_POLICIES, assign_patients
from medens.data.ct.sources import COORD_COLUMNS, ErrorPolicy, plain_cell, read_csv, resolve
from medens.data.reader import DatasetReader, build_reader_of, plain_config, reader_class
from medens.errors import ConfigError, DataError
from medens.utils.hashing import sha256_file

log = logging.getLogger(__name__)

_GEOMETRY_COLUMNS = {"seriesuid", *COORD_COLUMNS, "diameter_mm"}
NODULEMNIST_KEYS = ("train", "val", "test")
Excluded = list[dict[str, str]]


class CTReader(DatasetReader):
    """Base of the CT readers; subclasses are dataclasses whose fields are their config keys."""

    name: ClassVar[str] = ""
    #: the pixels are ready-made patches in memory (NoduleMNIST3D): no scans, no patch cache
    in_memory: ClassVar[bool] = False
    #: the source can carry a nodule mask channel
    has_masks: ClassVar[bool] = True

    def prepare(self, root: Path) -> None:
        """Make the folder ready before anything is read (only the synthetic reader writes)."""

    def list_cases(self, root: Path, policy: ErrorPolicy, need_mask: bool) -> tuple[list[NoduleRecord], Excluded]:
        """(records with patient ids and raw label fields, left-out cases with a reason); no pixels read.
        Bad input goes through ``policy`` (raise, or count and skip)."""
        raise NotImplementedError

    def read_case(self, source_file: str) -> ct_io.Scan:
        """One case's scan in HU with its world geometry (a records' ``source_file``)."""
        return ct_io.read_scan(source_file)

    def fingerprint(self, root: Path, exclude: Sequence[Path] = ()) -> dict[str, Any]:
        """JSON-able description of the input files (tables by content, scans by size and mtime), part of
        the patch-cache key; ``exclude`` is never walked (a cache folder inside the data root)."""
        raise NotImplementedError

    def assign_patients(self, records: list[NoduleRecord], root: Path) -> list[NoduleRecord]:
        """Patient ids that may change without re-reading pixels (applied after the cache)."""
        return records

    def label_file(self, root: Path) -> str:
        """The table the malignancy rule reads (for error messages)."""
        return str(root)


def _csv_fingerprint(root: Path, names: Mapping[str, str | None]) -> dict[str, Any]:
    out = {}
    for key, rel in names.items():
        p = resolve(root, rel)
        out[key] = [str(p), sha256_file(p) if p is not None and p.is_file() else None]
    return out


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


def _read_coords(path: Path, what: str) -> pd.DataFrame:
    df = read_csv(path, ["seriesuid", *COORD_COLUMNS], what)
    df["seriesuid"] = df["seriesuid"].astype(str)
    for c in COORD_COLUMNS:  # a non-numeric cell becomes NaN and is reported per row
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


@dataclass
class Luna16Reader(CTReader):
    """LUNA16 layout: scans ``<seriesuid>.mhd|.mha|.nii(.gz)`` anywhere under ``scans_dir``, an annotations
    CSV in world mm, and a labels table (``labels_csv``, matched by series and nearest position within
    ``label_match_mm``; ``None``: the labels are columns of the annotations). The annotations name series,
    not patients: a ``patient_id`` column, or ``series_patient_table`` (``seriesuid,patient_id`` or the
    LIDC-IDRI metadata's ``Series UID,Subject ID``) gives them; without either ``missing_patient_ids``
    refuses the split (``error``) or warns that two series of one patient may be split apart (``warn``).
    """

    annotations_csv: str = "annotations.csv"
    labels_csv: str | None = "labels.csv"
    scans_dir: str = "."
    label_match_mm: float = 5.0
    series_patient_table: str | None = None
    missing_patient_ids: str = "warn"

    name: ClassVar[str] = "luna16"
    scan_suffixes: ClassVar[tuple[str, ...] | None] = (*ct_io.SCAN_SUFFIXES, ".raw", ".zraw")

    def __post_init__(self) -> None:
        if self.missing_patient_ids not in MISSING_PATIENT_POLICIES:
            raise ConfigError(f"source.missing_patient_ids must be one of {list(MISSING_PATIENT_POLICIES)}, "
                              f"got {self.missing_patient_ids!r}")  # fmt: skip
        self.label_match_mm = float(self.label_match_mm)

    def _scans(self, scans_root: Path, policy: ErrorPolicy) -> tuple[dict[str, Path], dict[str, str], dict[str, str]]:
        """(series uid -> scan path, uid -> why it cannot be read, uid -> patient id named by the scan)."""
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
        return found, {}, {}

    def list_cases(self, root: Path, policy: ErrorPolicy, need_mask: bool) -> tuple[list[NoduleRecord], Excluded]:
        """One record per annotation row (``<seriesuid>_<n>``); rows without a label row are ``excluded``
        (normal in LUNA16), rows without a readable scan go through ``policy``."""
        ann_path = resolve(root, self.annotations_csv)
        assert ann_path is not None
        ann = _read_coords(ann_path, "annotations CSV")
        lab_path = resolve(root, self.labels_csv)
        if lab_path is not None and lab_path.resolve() != ann_path.resolve():
            labels = _read_coords(lab_path, "labels CSV")
            matched = _match_labels(ann, labels, self.label_match_mm)
        else:
            lab_path, labels, matched = ann_path, ann, {int(i): int(i) for i in ann.index}
        scans_root = resolve(root, self.scans_dir)
        assert scans_root is not None
        scans, bad, scan_patients = self._scans(scans_root, policy)

        records: list[NoduleRecord] = []
        excluded: Excluded = []
        counter: dict[str, int] = {}
        for row_i, row in ann.iterrows():
            uid = row["seriesuid"]
            n = counter.get(uid, 0)
            counter[uid] = n + 1
            case_id = f"{uid}_{n}"
            centre = [float(row[c]) for c in COORD_COLUMNS]
            if not all(math.isfinite(c) for c in centre):
                policy.fail(f"{ann_path}: row {row_i} ({case_id}) has a non-numeric world coordinate",
                            [case_id], ann_path)  # fmt: skip
                continue
            if uid in bad:
                policy.fail(bad[uid], [case_id], scans.get(uid, scans_root))
                continue
            if uid not in scans:
                policy.fail(f"{ann_path}: series {uid} (row {row_i}) has no scan under {scans_root}",
                            [case_id], ann_path)  # fmt: skip
                continue
            lab_i = matched.get(int(row_i))
            if lab_i is None:
                reason = f"no label row within {self.label_match_mm} mm in {lab_path}"
                excluded.append({"case_id": case_id, "file": str(lab_path), "reason": reason})
                continue
            lrow = labels.loc[lab_i]
            fields = {k: plain_cell(v) for k, v in lrow.items() if k not in _GEOMETRY_COLUMNS}
            diameter = row.get("diameter_mm", math.nan)
            if pd.isna(diameter):
                diameter = lrow.get("diameter_mm", math.nan)
            patient = fields.get("patient_id", row.get("patient_id", scan_patients.get(uid, uid)))
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
            log.warning("%d annotated nodule(s) have no label row and are left out (first: %s)",
                        len(excluded), excluded[0]["case_id"])  # fmt: skip
        return records, excluded

    def fingerprint(self, root: Path, exclude: Sequence[Path] = ()) -> dict[str, Any]:
        scans = resolve(root, self.scans_dir)
        return {
            "csvs": _csv_fingerprint(root, {"annotations_csv": self.annotations_csv, "labels_csv": self.labels_csv}),
            "scans_dir": self.scans_dir,
            "files": fingerprint_tree([scans] if scans else [], suffixes=self.scan_suffixes, exclude=exclude),
            "label_match_mm": self.label_match_mm,
        }

    def assign_patients(self, records: list[NoduleRecord], root: Path) -> list[NoduleRecord]:
        return assign_patients(records, root, self.series_patient_table, self.missing_patient_ids)

    def label_file(self, root: Path) -> str:
        return str(resolve(root, self.labels_csv or self.annotations_csv))


@dataclass
class DicomReader(Luna16Reader):
    """LUNA16 annotations over DICOM series: one folder per series under ``scans_dir``, matched by
    SeriesInstanceUID. Each series' DICOM ``PatientID`` (0010,0020) is its patient id (a labels
    ``patient_id`` column or ``series_patient_table`` still win), so two series of one patient share a split."""

    name: ClassVar[str] = "dicom"
    scan_suffixes: ClassVar[tuple[str, ...] | None] = None

    def _scans(self, scans_root: Path, policy: ErrorPolicy) -> tuple[dict[str, Path], dict[str, str], dict[str, str]]:
        """Folders mixing series go to the second dict; an unreadable folder raises, or under
        ``on_error=skip`` is logged and left out (its series then reads as having no scan)."""
        if not scans_root.is_dir():
            raise DataError(f"{scans_root}: DICOM scans folder does not exist")
        found: dict[str, Path] = {}
        bad: dict[str, str] = {}
        patients: dict[str, str] = {}
        for dirpath, dirnames, filenames in os.walk(scans_root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if not any(not f.startswith(".") for f in filenames):
                continue
            folder = Path(dirpath)
            try:
                series = ct_io.dicom_series_patients(folder)
            except DataError as exc:
                if policy.mode == "error":
                    raise
                log.warning("skipping DICOM folder %s: %s", folder, exc)
                continue
            if len(series) > 1:
                msg = (f"{folder}: the folder mixes {len(series)} DICOM series ({', '.join(sorted(series))}); "
                       "put each series in its own folder")  # fmt: skip
                bad.update(dict.fromkeys(series, msg))
                continue
            for uid, (_, patient) in series.items():
                if uid in found:
                    raise DataError(f"{folder}: series {uid} is split over this folder and {found[uid]}")
                found[uid] = folder
                if patient:
                    patients[uid] = patient
        return found, bad, patients


@dataclass
class SyntheticLuna16Reader(Luna16Reader):
    """The embedded synthetic LUNA16-format set: written at ``root`` on first use (``generator`` holds
    :func:`~medens.data.ct.synthetic.generate_luna16_synthetic`'s parameters), then read as LUNA16."""

    generator: dict[str, Any] = field(default_factory=dict)
    generate_if_missing: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        from medens.data.ct.synthetic import synthetic_params

        self.generator = plain_config(self.generator or {})
        try:
            synthetic_params(**self.generator)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"source.generator: {exc}") from exc

    def prepare(self, root: Path) -> None:
        if self.generate_if_missing:
            from medens.data.ct.synthetic import ensure_luna16_synthetic

            ensure_luna16_synthetic(root, **self.generator)


# ------------------------------------------------------------------------------ pre-cropped nodules


@dataclass
class VOIReader(CTReader):
    """Pre-cropped nodules (``lidc_voi``): NIfTI crops in HU under ``image_dir``, masks of the same name
    under ``mask_dir``, a labels CSV with ``file`` and ``patient_id``; each crop is centred in the patch."""

    labels_csv: str = "labels.csv"
    image_dir: str = "image"
    mask_dir: str = "mask"

    name: ClassVar[str] = "voi"

    def list_cases(self, root: Path, policy: ErrorPolicy, need_mask: bool) -> tuple[list[NoduleRecord], Excluded]:
        lab_path = resolve(root, self.labels_csv)
        assert lab_path is not None
        df = read_csv(lab_path, ["file"], "labels CSV")
        if "patient_id" not in df.columns:
            raise DataError(f"{lab_path}: labels CSV needs a patient_id column (splits are by patient)")
        img_root, mask_root = resolve(root, self.image_dir), resolve(root, self.mask_dir)
        assert img_root is not None and mask_root is not None
        records: list[NoduleRecord] = []
        excluded: Excluded = []
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
            assert mask is not None
            if need_mask and not mask.is_file():
                policy.fail(f"{mask}: mask channel requested but the mask of {case_id} does not exist",
                            [case_id], mask)  # fmt: skip
                continue
            diameter = row.get("diameter_mm", math.nan)
            records.append(
                NoduleRecord(
                    case_id=case_id,
                    patient_id=str(row["patient_id"]),
                    source_file=str(img),
                    center_world=None,
                    diameter_mm=float(diameter) if not pd.isna(diameter) else math.nan,
                    label_fields={k: plain_cell(v) for k, v in row.items() if k not in ("file", "diameter_mm")},
                    mask_file=str(mask) if mask.is_file() else None,
                    series_uid=str(row["seriesuid"]) if "seriesuid" in df.columns else None,
                )
            )
        return records, excluded

    def fingerprint(self, root: Path, exclude: Sequence[Path] = ()) -> dict[str, Any]:
        trees = [p for p in (resolve(root, self.image_dir), resolve(root, self.mask_dir)) if p is not None]
        return {
            "csvs": _csv_fingerprint(root, {"labels_csv": self.labels_csv}),
            "image_dir": self.image_dir,
            "mask_dir": self.mask_dir,
            "files": fingerprint_tree(trees, suffixes=(*ct_io.SCAN_SUFFIXES, ".raw", ".zraw"), exclude=exclude),
        }

    def label_file(self, root: Path) -> str:
        return str(resolve(root, self.labels_csv))


# ------------------------------------------------------------------------------------ NoduleMNIST3D


@dataclass
class NoduleMNIST3DReader(CTReader):
    """NoduleMNIST3D ``.npz`` (28^3 uint8, 0 benign / 1 malignant): ``root`` is the file, or ``root/npz_file``.
    It has no patient ids, so each image is its own 'patient' and the official (patient-level) split is kept."""

    npz_file: str | None = None

    name: ClassVar[str] = "nodulemnist3d"
    in_memory: ClassVar[bool] = True
    has_masks: ClassVar[bool] = False

    def path(self, root: Path) -> Path:
        return resolve(root, self.npz_file) or root

    def load(self, root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The official splits: split -> (uint8 images N x D x H x W, labels N)."""
        path = self.path(root)
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

    def list_cases(self, root: Path, policy: ErrorPolicy, need_mask: bool) -> tuple[list[NoduleRecord], Excluded]:
        return self.records(self.load(root)), []

    @staticmethod
    def records(data: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> list[NoduleRecord]:
        """One record per image of the loaded splits, each its own 'patient'."""
        records = []
        for split, (_, labels) in data.items():
            for i, y in enumerate(labels):
                cid = f"{split}_{i:05d}"
                records.append(NoduleRecord(case_id=cid, patient_id=cid, source_file="",
                                            label_fields={"label": int(y)}, official_split=split))  # fmt: skip
        return records

    def fingerprint(self, root: Path, exclude: Sequence[Path] = ()) -> dict[str, Any]:
        return {"csvs": _csv_fingerprint(Path("/"), {"npz": str(self.path(root))})}


# ------------------------------------------------------------------------------------ config names

#: Short names for ``data.source=<name>`` (each reader with its defaults).
READERS: dict[str, type[CTReader]] = {
    "luna16": Luna16Reader,
    "dicom": DicomReader,
    "voi": VOIReader,
    "nodulemnist3d": NoduleMNIST3DReader,
    "synthetic": SyntheticLuna16Reader,
}


def build_reader(source: CTReader | str | Mapping[str, Any]) -> CTReader:
    """A CT reader from a reader, a short name of :data:`READERS`, or a ``{_target_: ..., ...}`` config."""
    return build_reader_of(source, CTReader, READERS, "CT")


def _reader_class(target: Any) -> type[CTReader] | None:
    return reader_class(target, CTReader)


def source_name(source: Any) -> str | None:
    """The short name of a ``data.source`` value (string, ``_target_`` config or reader), None if unknown."""
    if isinstance(source, str):
        return source
    if isinstance(source, CTReader):
        return source.name
    cls = _reader_class(source.get("_target_")) if isinstance(source, Mapping) else None
    return cls.name if cls is not None else None


#: Keys of the data config before readers (checkpoints written by medens <= the flat `CTDataModule`).
LEGACY_KEYS = ("annotations_csv", "labels_csv", "scans_dir", "image_dir", "mask_dir", "npz_file", "label_match_mm",
               "series_patient_table", "missing_patient_ids", "generate_if_missing", "generator")  # fmt: skip


def upgrade_legacy_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """An old flat CT data config (``source: luna16`` beside ``annotations_csv``, ``generator``, ...) as the
    reader form, so checkpoints written before readers still evaluate; any other config is returned as is."""
    out = plain_config(data)
    if not str(out.get("_target_", "")).endswith("CTDataModule") or not any(k in out for k in LEGACY_KEYS):
        return out
    legacy = {k: out.pop(k) for k in LEGACY_KEYS if k in out}
    name = out.get("source", "luna16")
    if name == "luna16" and legacy.get("generate_if_missing"):
        name = "synthetic"
    cls = READERS.get(str(name)) if isinstance(name, str) else None
    if cls is None:
        return {**out, **legacy}  # not an old form after all: let the datamodule report it
    names = {f.name for f in fields(cls)}
    out["source"] = {"_target_": f"{cls.__module__}.{cls.__qualname__}",
                     **{k: v for k, v in legacy.items() if k in names and v is not None or k == "labels_csv"}}  # fmt: skip
    if "labels_csv" in out["source"] and "labels_csv" not in names:
        out["source"].pop("labels_csv")
    return out
