"""One reader per BraTS naming scheme: which files of a case folder hold which modality, and the label codes.

A reader knows one release's on-disk layout and nothing about caches, splits or transforms;
`BraTSDataModule` takes it as ``data.source``, a Hydra ``_target_`` (``conf/data/source/brats_*.yaml``)
or a short name of :data:`READERS` (``data.source=brats2023``). Every reader has the same methods:

- ``list_cases(root, modalities, require_label)``: the case folders under ``root`` resolved to files
  (headers checked, no voxels read), and the bad ones with their error; ``patient_id(case_id)``;
- ``read_case(item)``: one case's voxels in the canonical form (``image`` [C,H,W,D] float32 with 0
  outside the brain, ``label`` [1,H,W,D] medens classes, ``brain_mask``, ``affine``, ...);
- ``fingerprint(case)``: a JSON-able description of the case's files and label codes (the cache key).

``root`` and ``modalities`` (the channel order a model is trained on) stay datamodule keys, so
``data.root=<another hospital>`` reuses a reader.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import nibabel as nib
import numpy as np

from medens.data.reader import DatasetReader, build_reader_of, plain_config
from medens.errors import ConfigError, DataError

from .brats import (
    BraTSCase,
    discover_cases,
    map_labels,
    patient_id_from_case,
    resolve_label_map,
    resolve_modalities,
    resolve_patterns,
)


def _load_mha(path: str) -> nib.Nifti1Image:
    """A MetaImage (``.mha``/``.mhd``, ITK's LPS world) as an in-memory NIfTI (RAS), so the rest reads one form."""
    import SimpleITK as sitk

    img = sitk.ReadImage(path)
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # (z, y, x) -> voxel index order (i, j, k)
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(img.GetDirection(), np.float64).reshape(3, 3) * np.asarray(img.GetSpacing())
    affine[:3, 3] = img.GetOrigin()
    return nib.Nifti1Image(arr, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine)  # LPS -> RAS


def _read(path: str, case_id: str, role: str, label: bool = False) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Decode one NIfTI (or MetaImage) file fully; any failure (truncated gzip, bad header) names case and file."""
    try:
        img = _load_mha(path) if path.endswith((".mha", ".mhd")) else nib.load(path)
        arr = np.asarray(img.dataobj) if label else img.get_fdata(dtype=np.float32)
    except Exception as e:  # EOFError, zlib.error, OSError, ValueError... depending on where it breaks
        raise DataError(
            f"case {case_id}: cannot decode {role} file {path}: {type(e).__name__}: {e} "
            f"(truncated or corrupt NIfTI?)"
        ) from e
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise DataError(f"case {case_id}: {role} file {path}: expected a 3-D volume, got shape {arr.shape}")
    if not label and not np.all(np.isfinite(arr)):
        raise DataError(f"case {case_id}: {role} file {path}: contains NaN or infinite voxels")
    return arr, img


def _same_grid(case_id: str, path: str, shape: tuple[int, ...], img: nib.Nifti1Image, ref: tuple) -> None:
    ref_shape, ref_affine, ref_path = ref
    if tuple(shape) != tuple(ref_shape):
        raise DataError(
            f"case {case_id}: file {path} has shape {tuple(shape)}, but {ref_path} has {tuple(ref_shape)}"
        )
    a = np.asarray(img.affine, np.float64)
    if not np.allclose(a, ref_affine, atol=1e-3):
        raise DataError(
            f"case {case_id}: file {path} has a different affine than {ref_path} "
            f"(max difference {np.abs(a - ref_affine).max():.4g})"
        )


def read_brats_case(data: Mapping[Hashable, Any], label_map: Mapping[int, int]) -> dict[str, Any]:
    """One case (dict of file paths) -> ``image`` [C,H,W,D] float32, ``label``, ``brain_mask`` and geometry.

    Validates what headers cannot show: decodable voxels, one shape and affine for all files, label
    codes inside ``label_map``. The brain is the mask file when the layout has one (DeepMedic BraTS
    2015: constant non-zero background, set to 0 here), else voxels non-zero in any channel.
    """
    case_id = str(data["case_id"])
    files = [str(p) for p in data["image_files"]]
    modalities = list(data.get("modalities") or [f"channel {i}" for i in range(len(files))])
    first, ref_img = _read(files[0], case_id, f"modality '{modalities[0]}'")
    ref = (first.shape, np.asarray(ref_img.affine, np.float64), files[0])
    channels = [first]
    for mod, path in zip(modalities[1:], files[1:], strict=True):
        arr, img = _read(path, case_id, f"modality '{mod}'")
        _same_grid(case_id, path, arr.shape, img, ref)
        channels.append(arr)
    out: dict[str, Any] = {
        "case_id": case_id,
        "image": np.stack(channels, axis=0),
        "affine": ref[1],
        "spacing": np.asarray(ref_img.header.get_zooms()[:3], dtype=np.float64),
        "original_shape": np.asarray(ref[0], dtype=np.int64),
        "reference_file": files[0],
    }
    if label_file := data.get("label_file"):
        raw, img = _read(str(label_file), case_id, "label", label=True)
        _same_grid(case_id, str(label_file), raw.shape, img, ref)
        out["label"] = map_labels(raw, label_map, case_id, label_file)[None]
    if mask_file := data.get("mask_file"):
        m, img = _read(str(mask_file), case_id, "brain mask")
        _same_grid(case_id, str(mask_file), m.shape, img, ref)
        brain = m > 0.5
        out["image"] = np.where(brain[None], out["image"], np.float32(0))
    else:
        brain = np.any(out["image"] != 0, axis=0)
    if not brain.any():
        raise DataError(f"case {case_id}: empty brain: every voxel of {files} is zero (or the mask is empty)")
    out["brain_mask"] = brain[None].astype(np.uint8)
    return out


#: The original BraTS 2013/2015 MetaImage release, one subfolder per file (`BraTS2015MhaReader`).
MHA_PATTERNS = {"t1": "*.MR_T1.*.mha", "t1ce": "*.MR_T1c.*.mha", "t2": "*.MR_T2.*.mha", "flair": "*.MR_Flair.*.mha",
                "seg": "*.OT.*.mha"}  # fmt: skip


@dataclass
class BraTSReader(DatasetReader):
    """BraTS-style case folders under any naming preset: ``auto`` (the best-fitting preset per case),
    ``2021``, ``2023``, ``deepmedic`` or ``custom`` (``file_patterns`` alone); ``file_patterns`` also
    overrides single roles of a preset. ``label_map`` (raw code -> class) wins over ``label_preset``."""

    name: ClassVar[str] = "brats"
    naming: str = "auto"
    file_patterns: dict[str, str] | None = None
    label_preset: str | None = "brats2021"
    label_map: dict[int, int] | None = None
    patient_id_pattern: str | None = None  # regex with one group; default: built-in BraTS rules

    def __post_init__(self) -> None:
        self.naming = str(self.naming)
        self.file_patterns = plain_config(self.file_patterns) if self.file_patterns else None
        self.label_map = plain_config(self.label_map) if self.label_map is not None else None
        self.codes = resolve_label_map(self.label_preset, self.label_map)  # raw code -> medens class

    def check(self, modalities: Sequence[str]) -> None:
        """Fail fast on config typos (unknown naming, a modality without a file pattern)."""
        resolve_patterns(self.naming, resolve_modalities(modalities), self.file_patterns)

    def prepare(self, root: Path) -> bool:
        """Make the folder ready before anything is read (only the synthetic reader writes); True if written."""
        return False

    def list_cases(
        self, root: Path, modalities: Sequence[str], require_label: bool = True
    ) -> tuple[list[BraTSCase], dict[str, DataError]]:
        return discover_cases(root, modalities, self.naming, self.file_patterns, require_label)

    def patient_id(self, case_id: str) -> str:
        return patient_id_from_case(case_id, self.patient_id_pattern)

    def read_case(self, item: Mapping[Hashable, Any]) -> dict[str, Any]:
        return read_brats_case(item, self.codes)

    def fingerprint(self, case: BraTSCase) -> dict[str, Any]:
        files = [*case.image_files, *(p for p in (case.label_file, case.mask_file) if p is not None)]
        stats = []
        for p in files:
            st = p.stat()
            stats.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
        return {"files": stats, "label_map": sorted(self.codes.items()), "modalities": list(case.modalities)}


@dataclass
class BraTS2021Reader(BraTSReader):
    """BraTS 2015-2021 NIfTI naming (``<case>_t1 _t1ce _t2 _flair _seg``), labels 1 NCR/NET, 2 ED, 4 ET."""

    name: ClassVar[str] = "brats2021"
    naming: str = field(default="2021", init=False)


@dataclass
class BraTS2023Reader(BraTSReader):
    """BraTS 2023+ naming (``<case>-t1n -t1c -t2w -t2f -seg``), labels 1 NCR, 2 ED, 3 ET."""

    name: ClassVar[str] = "brats2023"
    naming: str = field(default="2023", init=False)
    label_preset: str | None = "brats2023"


@dataclass
class BraTS2015Reader(BraTSReader):
    """BraTS 2015 as pre-processed by DeepMedic (``Flair_subtrMeanDivStd``, ``T1c_...``, ``OTMultiClass``,
    ``brainmask``): z-scored volumes with a constant background, so the brain is the mask file; 2015
    labels (3 non-enhancing -> core, 4 enhancing)."""

    name: ClassVar[str] = "brats2015"
    naming: str = field(default="deepmedic", init=False)
    label_preset: str | None = "brats2015"


@dataclass
class SyntheticBraTSReader(BraTSReader):
    """The embedded synthetic set: written at ``root`` on first use (``generator`` holds
    :func:`~medens.data.mri.synthetic.generate_brats_synthetic`'s parameters), then read with the label
    codes it was written with; naming ``auto``, so ``data.root=<a real BraTS folder>`` reads that too."""

    name: ClassVar[str] = "synthetic"
    naming: str = field(default="auto", init=False)
    label_preset: str | None = None  # from generator.naming
    generator: dict[str, Any] = field(default_factory=dict)
    generate_if_missing: bool = True

    def __post_init__(self) -> None:
        from .synthetic import synthetic_params

        try:
            self.params = synthetic_params(**(plain_config(self.generator) or {}))
        except TypeError as e:
            raise ConfigError(f"synthetic: {e}; known keys: n_cases, shape, seed, spacing, naming") from None
        self.generator = plain_config(self.generator) or {}
        if self.label_preset is None:
            self.label_preset = f"brats{self.params['naming']}"
        super().__post_init__()

    def prepare(self, root: Path) -> bool:
        from .synthetic import ensure_synthetic

        if not self.generate_if_missing:
            return False
        keys = ("n_cases", "shape", "seed", "spacing", "naming")
        return bool(ensure_synthetic(root, **{k: self.params[k] for k in keys}))


@dataclass
class BraTS2015MhaReader(BraTSReader):
    """The original BraTS 2013/2015 release: ``<case>/VSD.Brain.XX.O.MR_Flair.<id>/VSD...MR_Flair.<id>.mha``
    (also ``MR_T1``, ``MR_T1c``, ``MR_T2``) and the ground truth ``VSD.Brain_*more.XX.O.OT.<id>/...mha``;
    one subfolder per file, MetaImage format, 2015 labels. Grids are checked when the voxels are read."""

    name: ClassVar[str] = "brats2015_mha"
    naming: str = field(default="custom", init=False)
    label_preset: str | None = "brats2015"
    file_patterns: dict[str, str] | None = field(default_factory=lambda: dict(MHA_PATTERNS))

    def list_cases(
        self, root: Path, modalities: Sequence[str], require_label: bool = True
    ) -> tuple[list[BraTSCase], dict[str, DataError]]:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"BraTS root {root} does not exist or is not a directory")
        mods = resolve_modalities(modalities)
        pats = resolve_patterns("custom", mods, self.file_patterns)["custom"]
        cases, errors = [], {}
        for folder in sorted({p.parent.parent for p in root.rglob("*.mha") if not p.name.startswith(".")}):
            files = sorted(folder.glob("*/*.mha"))

            def one(role: str, required: bool, folder: Path = folder, files: list = files) -> Path | None:
                hits = [p for p in files if fnmatch.fnmatchcase(p.name, pats[role])]
                if len(hits) == 1:
                    return hits[0]
                if hits or required:
                    raise DataError(f"case {folder.name} ({folder}): {len(hits)} files match the {role} pattern "
                                    f"'{pats[role]}' in its subfolders (need one)")  # fmt: skip
                return None

            try:
                images = tuple(one(m, True) for m in mods)
                label = one("seg", require_label)
            except DataError as e:
                errors[folder.name] = e
                continue
            cases.append(BraTSCase(folder.name, folder, images, label, None, self.name, tuple(mods)))  # type: ignore[arg-type]
        if not cases and not errors:
            raise DataError(f"no BraTS 2015 case folders (subfolders holding .mha files) under {root}")
        return cases, errors


#: Short names for ``data.source=<name>`` (each reader with its defaults).
READERS: dict[str, type[BraTSReader]] = {
    cls.name: cls
    for cls in (
        BraTSReader,
        BraTS2021Reader,
        BraTS2023Reader,
        BraTS2015Reader,
        BraTS2015MhaReader,
        SyntheticBraTSReader,
    )
}

#: Datamodule keys of the flat, pre-reader config (old checkpoints): they now belong to ``data.source``.
LEGACY_KEYS = ("naming", "file_patterns", "label_preset", "label_map", "patient_id_pattern", "synthetic",
               "generate_if_missing")  # fmt: skip


def build_reader(source: BraTSReader | str | Mapping[str, Any]) -> BraTSReader:
    """A BraTS reader from a reader, a short name of :data:`READERS`, or a ``{_target_: ..., ...}`` config."""
    return build_reader_of(source, BraTSReader, READERS, "BraTS")


def legacy_reader(legacy: Mapping[str, Any]) -> BraTSReader:
    """The reader a flat, pre-reader data config meant (``naming``, ``label_preset``, ``synthetic``, ...)."""
    kw = {k: plain_config(v) for k, v in legacy.items() if v is not None}
    synthetic, generate = kw.pop("synthetic", None), bool(kw.pop("generate_if_missing", False))
    naming = kw.pop("naming", "auto")
    if (synthetic is not None or generate) and naming == "auto" and "file_patterns" not in kw:
        kw.setdefault("label_preset", None)
        return SyntheticBraTSReader(generator=synthetic or {}, generate_if_missing=generate, **kw)
    if generate:
        raise ConfigError("generate_if_missing needs a synthetic set: give data.source=synthetic")
    return BraTSReader(naming=naming, **kw)


def reader_from_data_config(data: Mapping[str, Any]) -> BraTSReader:
    """The reader of a recorded data config, new (``source``) or flat (old checkpoints)."""
    if data.get("source") is not None:
        return build_reader(data["source"])
    return legacy_reader({k: data[k] for k in LEGACY_KEYS if k in data})
