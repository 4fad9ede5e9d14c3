"""BraTS on disk: case discovery, file naming presets, label presets and validation.

Every year of BraTS (and the MSD Task01 re-release) stores the same kind of data under different
file names and label codes. This module turns that variety into configuration: a *naming preset*
(or explicit glob patterns) says which file of a case folder holds which modality, and a *label
preset* (or explicit map) says how the dataset's label codes become medens' four training classes
``0 background, 1 necrotic/non-enhancing core, 2 oedema, 3 enhancing``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from medens.errors import ConfigError, DataError

#: medens' training classes, index = class id.
LABEL_NAMES: tuple[str, ...] = ("background", "necrotic_core", "edema", "enhancing")
NUM_CLASSES = len(LABEL_NAMES)

#: BraTS evaluation regions as sets of medens classes.
REGIONS: dict[str, tuple[int, ...]] = {"wt": (1, 2, 3), "tc": (1, 3), "et": (3,)}

#: Canonical modality names; channel order always follows the configured list, not this tuple.
CANONICAL_MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")

#: Other spellings (BraTS 2023, MSD, common usage) of the canonical modalities.
MODALITY_ALIASES: dict[str, str] = {
    "t1": "t1",
    "t1n": "t1",
    "t1w": "t1",
    "t1ce": "t1ce",
    "t1c": "t1ce",
    "t1gd": "t1ce",
    "t2": "t2",
    "t2w": "t2",
    "flair": "flair",
    "t2f": "flair",
}

#: Raw label code -> medens class, per dataset release.
LABEL_PRESETS: dict[str, dict[int, int]] = {
    # BraTS 2015: 1 necrosis, 2 edema, 3 non-enhancing tumour, 4 enhancing tumour.
    "brats2015": {0: 0, 1: 1, 2: 2, 3: 1, 4: 3},
    # BraTS 2017-2021: 1 NCR/NET, 2 ED, 4 ET (no label 3).
    "brats2021": {0: 0, 1: 1, 2: 2, 4: 3},
    # BraTS 2023+: 1 NCR, 2 ED (SNFH), 3 ET.
    "brats2023": {0: 0, 1: 1, 2: 2, 3: 3},
    # Medical Segmentation Decathlon Task01_BrainTumour: 1 edema, 2 non-enhancing tumour, 3 enhancing.
    "msd_task01": {0: 0, 1: 2, 2: 1, 3: 3},
}
LABEL_PRESET_ALIASES: dict[str, str] = {
    "brats2017": "brats2021",
    "brats2018": "brats2021",
    "brats2019": "brats2021",
    "brats2020": "brats2021",
    "brats2024": "brats2023",
    "msd": "msd_task01",
}

#: Per-role glob patterns (matched against file names inside one case folder). Roles are the
#: canonical modality names plus ``seg`` (ground truth) and optionally ``mask`` (brain mask).
NAMING_PRESETS: dict[str, dict[str, str]] = {
    "2021": {
        "t1": "*_t1.nii*",
        "t1ce": "*_t1ce.nii*",
        "t2": "*_t2.nii*",
        "flair": "*_flair.nii*",
        "seg": "*_seg.nii*",
    },
    "2023": {
        "t1": "*-t1n.nii*",
        "t1ce": "*-t1c.nii*",
        "t2": "*-t2w.nii*",
        "flair": "*-t2f.nii*",
        "seg": "*-seg.nii*",
    },
    # BraTS 2015 as pre-processed by DeepMedic (z-scored volumes, constant non-zero background,
    # a separate brain mask); only FLAIR and T1c exist.
    "deepmedic": {
        "t1": "T1_subtrMeanDivStd.nii*",
        "t1ce": "T1c_subtrMeanDivStd.nii*",
        "t2": "T2_subtrMeanDivStd.nii*",
        "flair": "Flair_subtrMeanDivStd.nii*",
        "seg": "OTMultiClass.nii*",
        "mask": "brainmask.nii*",
    },
}
NAMINGS = ("auto", *NAMING_PRESETS, "custom")

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_AFFINE_ATOL = 1e-3  # mm; BraTS modalities of one case share the grid up to float noise


def canonical_modality(name: str) -> str:
    """Canonical name of a modality (``t2f`` -> ``flair``); unknown names are kept for custom patterns."""
    key = str(name).strip().lower()
    return MODALITY_ALIASES.get(key, key)


def resolve_modalities(modalities: Sequence[str]) -> list[str]:
    """Canonical modality list in the configured order; rejects duplicates and reserved role names."""
    out = [canonical_modality(m) for m in modalities]
    if not out:
        raise ConfigError("modalities: the list is empty; give at least one (e.g. [t1, t1ce, t2, flair])")
    if len(set(out)) != len(out):
        raise ConfigError(
            f"modalities: {list(modalities)} names a modality twice (aliases count as the same)"
        )
    for m in out:
        if m in ("seg", "mask"):
            raise ConfigError(f"modalities: '{m}' is a reserved role name, not a modality")
    return out


def resolve_label_map(
    label_preset: str | None = "brats2021", label_map: Mapping[int | str, int] | None = None
) -> dict[int, int]:
    """Raw label code -> medens class; an explicit ``label_map`` wins over ``label_preset``.

    Keys may arrive as strings from YAML/Hydra; they are converted to int. Background (0) maps to 0
    unless stated otherwise.
    """
    if label_map is not None:
        try:
            out = {int(k): int(v) for k, v in dict(label_map).items()}
        except (TypeError, ValueError) as e:
            raise ConfigError(f"label_map: keys and values must be integers, got {dict(label_map)!r}") from e
        out.setdefault(0, 0)
    else:
        if label_preset is None:
            raise ConfigError("give label_preset or label_map")
        name = LABEL_PRESET_ALIASES.get(str(label_preset).lower(), str(label_preset).lower())
        if name not in LABEL_PRESETS:
            known = sorted([*LABEL_PRESETS, *LABEL_PRESET_ALIASES])
            raise ConfigError(f"label_preset: unknown preset '{label_preset}'; known: {known}")
        out = dict(LABEL_PRESETS[name])
    bad = {k: v for k, v in out.items() if not 0 <= v < NUM_CLASSES or not 0 <= k < 256}
    if bad:
        raise ConfigError(
            f"label_map: {bad} out of range; raw codes must be 0..255 and classes 0..{NUM_CLASSES - 1} "
            f"({', '.join(LABEL_NAMES)})"
        )
    return out


def map_labels(raw: np.ndarray, label_map: Mapping[int, int], case_id: str, path: str | Path) -> np.ndarray:
    """Map a raw label volume to medens classes (uint8); a code outside the map is a `DataError`."""
    arr = np.asarray(raw)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)):
            raise DataError(f"case {case_id}: label file {path}: contains NaN or infinite values")
        rounded = np.rint(arr)
        if np.any(np.abs(arr - rounded) > 1e-3):
            raise DataError(f"case {case_id}: label file {path}: label values are not integers")
        arr = rounded
    lo, hi = (arr.min(), arr.max()) if arr.size else (0, 0)
    if lo < 0 or hi > 255:
        raise DataError(
            f"case {case_id}: label file {path}: label values range {lo}..{hi}, "
            f"allowed codes are {sorted(label_map)}"
        )
    codes = arr.astype(np.uint8, copy=False)
    present = np.flatnonzero(np.bincount(codes.ravel(), minlength=256))
    unknown = sorted(set(present.tolist()) - set(label_map))
    if unknown:
        raise DataError(
            f"case {case_id}: label file {path}: label value(s) {unknown} are not in the label mapping "
            f"{dict(sorted(label_map.items()))} (wrong label_preset?)"
        )
    lut = np.zeros(256, dtype=np.uint8)
    for k, v in label_map.items():
        lut[k] = v
    return lut[codes]


def resolve_patterns(
    naming: str, modalities: Sequence[str], file_patterns: Mapping[str, str] | None = None
) -> dict[str, dict[str, str]]:
    """Candidate pattern sets, by naming name, for the roles a case needs.

    ``naming='auto'`` returns every preset (tried per case); a named preset returns just that one;
    ``custom`` uses ``file_patterns`` alone. ``file_patterns`` overrides single roles of a preset.
    """
    overrides = {
        canonical_modality(k) if k not in ("seg", "mask") else k: str(v)
        for k, v in dict(file_patterns or {}).items()
    }
    naming = str(naming).lower()
    if naming == "custom":
        if not overrides:
            raise ConfigError("naming=custom needs file_patterns: {modality: glob, ..., seg: glob}")
        candidates = {"custom": overrides}
    elif naming == "auto":
        candidates = {name: {**pats, **overrides} for name, pats in NAMING_PRESETS.items()}
    elif naming in NAMING_PRESETS:
        candidates = {naming: {**NAMING_PRESETS[naming], **overrides}}
    else:
        raise ConfigError(f"naming: unknown value '{naming}'; known: {list(NAMINGS)}")
    for m in modalities:
        if all(m not in pats for pats in candidates.values()):
            raise ConfigError(
                f"naming {naming}: no file pattern for modality '{m}'; add it to file_patterns "
                f"(known modalities: {list(CANONICAL_MODALITIES)} and aliases {sorted(MODALITY_ALIASES)})"
            )
    return candidates


@dataclass(frozen=True)
class BraTSCase:
    """One case folder resolved to files: images in the configured modality order, label and mask."""

    case_id: str
    folder: Path
    image_files: tuple[Path, ...]
    label_file: Path | None = None
    mask_file: Path | None = None
    naming: str = ""
    modalities: tuple[str, ...] = field(default=())

    @property
    def has_label(self) -> bool:
        return self.label_file is not None


@dataclass(frozen=True)
class CaseHeader:
    """Geometry shared by all files of a case (checked from NIfTI headers only, no voxel decoding)."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    spacing: tuple[float, float, float]


def _is_nifti(p: Path) -> bool:
    return p.is_file() and p.name.endswith(_NIFTI_SUFFIXES)


def find_case_folders(root: str | Path) -> list[Path]:
    """Folders under ``root`` (itself included) that directly hold NIfTI files; hidden folders skipped."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"BraTS root {root} does not exist or is not a directory")
    found = []
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = sorted(d.iterdir())
        except OSError as e:
            raise DataError(f"cannot list folder {d}: {e}") from e
        if any(_is_nifti(p) for p in entries):
            found.append(d)
        stack.extend(p for p in entries if p.is_dir() and not p.name.startswith("."))
    return sorted(found)


def _match(files: Sequence[Path], pattern: str) -> list[Path]:
    return [p for p in files if fnmatch.fnmatchcase(p.name, pattern)]


def resolve_case(
    folder: Path,
    modalities: Sequence[str],
    candidates: Mapping[str, Mapping[str, str]],
    require_label: bool,
    case_id: str | None = None,
) -> BraTSCase:
    """Match one case folder against the candidate naming(s); a missing or ambiguous file is a DataError."""
    case_id = case_id or folder.name
    files = sorted(p for p in folder.iterdir() if _is_nifti(p))
    # auto: choose the naming under which most of the configured modalities are present
    best_name, best_score = None, -1
    for name, pats in candidates.items():
        score = sum(bool(_match(files, pats[m])) for m in modalities if m in pats)
        if score > best_score:
            best_name, best_score = name, score
    assert best_name is not None
    pats = candidates[best_name]
    where = f"case {case_id} ({folder}, naming {best_name})"

    def one(role: str, required: bool) -> Path | None:
        pattern = pats.get(role)
        if pattern is None:
            if required:
                raise DataError(f"{where}: no file pattern for '{role}'")
            return None
        hits = _match(files, pattern)
        if len(hits) > 1:
            raise DataError(
                f"{where}: {len(hits)} files match {role} pattern '{pattern}': {[h.name for h in hits]}"
            )
        if not hits:
            if required:
                what = "ground truth" if role == "seg" else "brain mask" if role == "mask" else "modality"
                raise DataError(
                    f"{where}: missing {what} '{role}': no file matching '{pattern}' "
                    f"(files present: {[f.name for f in files]})"
                )
            return None
        return hits[0]

    images = tuple(one(m, True) for m in modalities)  # type: ignore[misc]
    label = one("seg", require_label)
    mask = one("mask", "mask" in pats)
    return BraTSCase(
        case_id=case_id,
        folder=folder,
        image_files=images,
        label_file=label,  # type: ignore[arg-type]
        mask_file=mask,
        naming=best_name,
        modalities=tuple(modalities),
    )


def _header_shape(img: nib.Nifti1Image, case_id: str, path: Path) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise DataError(f"case {case_id}: file {path}: expected a 3-D volume, got shape {tuple(img.shape)}")
    return shape  # type: ignore[return-value]


def load_header(path: Path, case_id: str) -> nib.Nifti1Image:
    """Open a NIfTI file lazily (header only); unreadable files become a DataError naming case and file."""
    try:
        return nib.load(str(path))
    except Exception as e:  # nibabel raises many types for corrupt files
        raise DataError(f"case {case_id}: cannot read NIfTI file {path}: {type(e).__name__}: {e}") from e


def check_case_headers(case: BraTSCase) -> CaseHeader:
    """All files of a case must share one voxel grid (shape and affine); checked from headers only."""
    files = [*case.image_files]
    if case.label_file is not None:
        files.append(case.label_file)
    if case.mask_file is not None:
        files.append(case.mask_file)
    ref = load_header(files[0], case.case_id)
    shape = _header_shape(ref, case.case_id, files[0])
    affine = np.asarray(ref.affine, dtype=np.float64)
    for path in files[1:]:
        img = load_header(path, case.case_id)
        s = _header_shape(img, case.case_id, path)
        if s != shape:
            raise DataError(
                f"case {case.case_id}: file {path} has shape {s}, but {files[0].name} has {shape}"
            )
        a = np.asarray(img.affine, dtype=np.float64)
        if not np.allclose(a, affine, atol=_AFFINE_ATOL):
            raise DataError(
                f"case {case.case_id}: file {path} has a different affine than {files[0].name} "
                f"(max difference {np.abs(a - affine).max():.4g}); the modalities must be co-registered "
                f"on one voxel grid"
            )
    spacing = tuple(float(z) for z in ref.header.get_zooms()[:3])
    return CaseHeader(shape=shape, affine=affine, spacing=spacing)  # type: ignore[arg-type]


def discover_cases(
    root: str | Path,
    modalities: Sequence[str] = CANONICAL_MODALITIES,
    naming: str = "auto",
    file_patterns: Mapping[str, str] | None = None,
    require_label: bool = True,
    check_headers: bool = True,
) -> tuple[list[BraTSCase], dict[str, DataError]]:
    """Resolve every case folder under ``root``; returns (good cases, {case_id: error}) sorted by id.

    The caller applies the ``on_error`` policy. Case ids are folder names and must be unique.
    """
    mods = resolve_modalities(modalities)
    candidates = resolve_patterns(naming, mods, file_patterns)
    cases: list[BraTSCase] = []
    errors: dict[str, DataError] = {}
    seen: dict[str, Path] = {}
    for folder in find_case_folders(root):
        case_id = folder.name
        if case_id in seen:
            raise DataError(f"case id {case_id} appears twice: {seen[case_id]} and {folder}")
        seen[case_id] = folder
        try:
            case = resolve_case(folder, mods, candidates, require_label, case_id)
            if check_headers:
                check_case_headers(case)
        except DataError as e:
            errors[case_id] = e
            continue
        cases.append(case)
    if not cases and not errors:
        raise DataError(f"no BraTS case folders (folders holding .nii/.nii.gz files) under {root}")
    return cases, errors


_PATIENT_RULES = (
    re.compile(r"^(BraTS-[A-Za-z]+-\d+)-\d+$"),  # BraTS 2023: BraTS-GLI-00001-000 (last part = timepoint)
    re.compile(r"^(brats_\d+_pat\d+)_\d+$", re.IGNORECASE),  # BraTS 2013/2015: brats_2013_pat0004_1
    re.compile(r"^(brats_tcia_pat\d+)_\d+$", re.IGNORECASE),  # BraTS 2015 TCIA: brats_tcia_pat123_0001
)


def patient_id_from_case(case_id: str, pattern: str | None = None) -> str:
    """Patient of a case, so that follow-up scans of one patient never straddle splits.

    ``pattern`` (a regex with one group) overrides the built-in BraTS rules; unmatched ids are
    their own patient.
    """
    rules = (re.compile(pattern),) if pattern else _PATIENT_RULES
    for rule in rules:
        m = rule.match(case_id)
        if m:
            return m.group(1)
    return case_id
