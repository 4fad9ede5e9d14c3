"""One reader per chest X-ray source: the cases of a dataset, their pixels, and what the cache must notice.

A reader knows one on-disk layout and nothing about caches, splits or loaders; `XRayDataModule` takes it as
``data.source`` (a Hydra ``_target_``, ``conf/data/source/xray_*.yaml``) or a short name of :data:`READERS`.
Every reader has the same methods (the CT readers' shape, medens/data/ct/readers.py):

- ``list_cases(root, labels, missing_images)``: one row per image with its patient id and multi-hot
  targets, plus the official split where the source has one (no pixels read), and the images left out;
- ``read_case(root, case_id)``: one image (greyscale PIL or a uint8 array);
- ``fingerprint(root, case_ids, mode)``: what identifies the input files, part of the cache key;
- ``image_folder(root)``: the folder of image files the decoded-image cache reads (None: the images are
  already decoded arrays in memory, nothing to cache).

Adding a dataset is one reader class here (or in its own file) and one config file naming it
(``conf/data/source/xray_*.yaml``). :func:`upgrade_legacy_config` turns the flat data config of older
checkpoints and run folders (``image_dir``, ``synthetic``, ... beside the datamodule's keys) into this form.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from PIL import Image

from medens.data.reader import DatasetReader, build_reader_of, plain_config, reader_class
from medens.errors import DataError

log = logging.getLogger(__name__)

#: Columns of `list_cases`' table (NIH's own names, so its extra columns stay next to them).
CASE, PATIENT, TARGETS, SPLIT = "Image Index", "Patient ID", "targets", "split"


@dataclass
class XRayCases:
    """`table`: one row per image (`CASE`, `PATIENT`, `TARGETS` and, with an official split, `SPLIT`:
    train / val / test, or train_val for a pool the datamodule splits by patient); `skipped`: left out."""

    table: pd.DataFrame
    skipped: list[str] = field(default_factory=list)


class XRayReader(DatasetReader):
    """Base of the X-ray readers; subclasses are dataclasses whose fields are their config keys."""

    name: ClassVar[str] = ""

    def prepare(self, root: Path) -> None:
        """Make the folder ready before anything is read (only the synthetic reader writes)."""

    def labels(self, root: Path, default: Sequence[str]) -> tuple[str, ...]:
        """The label order of this source (`default`, NIH's, unless the source defines its own)."""
        return tuple(default)

    def list_cases(self, root: Path, labels: Sequence[str], missing_images: str) -> XRayCases:
        raise NotImplementedError

    def read_case(self, root: Path, case_id: str) -> Any:
        raise NotImplementedError

    def image_folder(self, root: Path) -> Path | None:
        return None

    def fingerprint(self, root: Path, case_ids: Sequence[str], mode: str = "stat") -> str:
        raise NotImplementedError


# --------------------------------------------------------------------------------------- NIH ChestX-ray14
@dataclass
class NIHReader(XRayReader):
    """NIH ChestX-ray14 as distributed: `image_dir/*.png`, `Data_Entry_2017*.csv[.gz]` (or `csv`), and the
    official `train_val_list.txt` / `test_list.txt` when present and `use_official_split`."""

    image_dir: str = "images"
    csv: str | None = None
    view_positions: Sequence[str] | None = None
    use_official_split: bool = True

    name: ClassVar[str] = "nih"

    def __post_init__(self) -> None:
        self.view_positions = list(self.view_positions) if self.view_positions else None

    def image_folder(self, root: Path) -> Path:
        return Path(root) / self.image_dir

    def read_case(self, root: Path, case_id: str) -> Image.Image:
        from medens.data.xray import load_xray_image

        return load_xray_image(self.image_folder(root) / case_id)

    def fingerprint(self, root: Path, case_ids: Sequence[str], mode: str = "stat") -> str:
        from medens.data.xray_cache import source_fingerprint

        return source_fingerprint(self.image_folder(root), case_ids, mode)

    def list_cases(self, root: Path, labels: Sequence[str], missing_images: str) -> XRayCases:
        from medens.data.xray import find_label_csv, read_nih_table

        root = Path(root)
        csv_path = find_label_csv(root, self.csv)
        df = read_nih_table(csv_path, labels)
        if self.view_positions:
            if "View Position" not in df.columns:
                raise DataError(f"{csv_path}: view filter {self.view_positions} needs a 'View Position' column")
            df = df[df["View Position"].isin(self.view_positions)]
            if df.empty:
                raise DataError(f"{csv_path}: no rows with View Position in {self.view_positions}")
        image_root = self.image_folder(root)
        if not image_root.is_dir():
            raise DataError(f"{image_root}: image folder not found")
        on_disk = {p.name for p in image_root.iterdir() if p.is_file()}
        if not on_disk:
            raise DataError(f"{image_root}: image folder is empty")
        present = df[CASE].isin(on_disk)
        missing = df.loc[~present, CASE].tolist()
        if missing:
            msg = (
                f"{image_root}: {len(missing)} of {len(df)} images listed in {csv_path.name} are missing "
                f"on disk (first: {', '.join(missing[:5])})"
            )
            if missing_images == "error":
                raise DataError(msg + "; set data.missing_images=skip to train on the images present")
            log.warning("%s; skipping them", msg)
        df = df[present].reset_index(drop=True)
        if df.empty:
            raise DataError(f"{image_root}: none of the images listed in {csv_path} is on disk")
        train_list, test_list = root / "train_val_list.txt", root / "test_list.txt"
        if self.use_official_split and train_list.is_file() and test_list.is_file():
            test_names = _read_list(test_list)
            df[SPLIT] = np.where(df[CASE].isin(test_names), "test", "train_val")
            pool, test = df[df[SPLIT] == "train_val"], df[df[SPLIT] == "test"]
            overlap = set(test[PATIENT]) & set(pool[PATIENT])
            if overlap:
                log.warning("official lists put %d patients in both train_val and test", len(overlap))
        return XRayCases(df, missing)


@dataclass
class SyntheticNIHReader(NIHReader):
    """The embedded synthetic NIH-format set (medens/data/synthetic_xray.py), generated into the dataset
    folder on first use (`generate_if_missing`), then read exactly like the real set."""

    generator: Mapping[str, Any] | None = None
    generate_if_missing: bool = True

    name: ClassVar[str] = "synthetic_nih"

    def prepare(self, root: Path) -> None:
        if self.generate_if_missing and self.generator is not None:
            from medens.data.synthetic_xray import ensure_synthetic_nih

            ensure_synthetic_nih(root, **dict(self.generator))


def _read_list(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


# ------------------------------------------------------------------------------------------- MedMNIST 2D
MEDMNIST_SPLITS = ("train", "val", "test")


def read_medmnist(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images uint8 [N, H, W] or [N, H, W, 3], labels [N, L])}, validated."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: MedMNIST file not found (nothing is downloaded; give a local .npz)")
    try:
        data = np.load(path)
        keys = set(data.files)
    except Exception as exc:
        raise DataError(f"{path}: cannot read .npz ({exc})") from exc
    out = {}
    for split in MEDMNIST_SPLITS:
        need = {f"{split}_images", f"{split}_labels"}
        if not need <= keys:
            raise DataError(f"{path}: missing key(s) {sorted(need - keys)}; found {sorted(keys)}")
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        if len(images) != len(labels):
            raise DataError(f"{path}: {split}_images has {len(images)} rows but {split}_labels {len(labels)}")
        out[split] = (images, labels.reshape(len(labels), -1).astype(np.float32))
    return out


@dataclass
class MedMNISTReader(XRayReader):
    """A MedMNIST 2D `.npz` (ChestMNIST, PneumoniaMNIST, ...) with its official train/val/test split;
    `path` is absolute or relative to `data.root`. Images are decoded arrays already: no cache. Each
    image is its own patient (MedMNIST publishes no patient ids); case ids are `<split>_<index>`."""

    path: str = "chestmnist.npz"
    label_names: Sequence[str] | None = None

    name: ClassVar[str] = "medmnist"

    def __post_init__(self) -> None:
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        self._file: Path | None = None

    def file(self, root: Path) -> Path:
        p = Path(self.path)
        return p if p.is_absolute() or root is None else Path(root) / p

    def _load(self, root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        f = self.file(root)
        if self._arrays is None or self._file != f:
            self._arrays, self._file = read_medmnist(f), f
        return self._arrays

    def labels(self, root: Path, default: Sequence[str]) -> tuple[str, ...]:
        n = self._load(root)["train"][1].shape[1]
        if self.label_names:
            if len(self.label_names) != n:
                raise DataError(f"{self.file(root)}: {n} label columns but {len(self.label_names)} label_names given")
            return tuple(self.label_names)
        return tuple(default) if n == len(default) else tuple(f"label_{i}" for i in range(n))

    def list_cases(self, root: Path, labels: Sequence[str], missing_images: str) -> XRayCases:
        rows = []
        for split, (_, targets) in self._load(root).items():
            for i, t in enumerate(targets):
                case = f"{split}_{i}"
                rows.append({CASE: case, PATIENT: case, TARGETS: t, SPLIT: split})
        return XRayCases(pd.DataFrame(rows))

    def read_case(self, root: Path, case_id: str) -> Image.Image:
        split, _, index = case_id.rpartition("_")
        try:
            image = self._load(root)[split][0][int(index)]
        except (KeyError, ValueError, IndexError):
            raise DataError(f"{self.file(root)}: no case {case_id!r}") from None
        return Image.fromarray(image).convert("L")

    def fingerprint(self, root: Path, case_ids: Sequence[str], mode: str = "stat") -> str:
        from medens.utils.hashing import sha256_file

        return sha256_file(self.file(root))

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen the file instead of pickling arrays
        state = dict(self.__dict__)
        state["_arrays"], state["_file"] = None, None
        return state


#: Short names for `data.source=<name>` (each reader's defaults).
READERS: dict[str, type[XRayReader]] = {r.name: r for r in (NIHReader, SyntheticNIHReader, MedMNISTReader)}


def build_xray_reader(source: XRayReader | str | Mapping[str, Any]) -> XRayReader:
    """An X-ray reader from a reader, a short name of :data:`READERS`, or a ``{_target_: ..., ...}`` config."""
    return build_reader_of(source, XRayReader, READERS, "X-ray")


def _reader_class(target: Any) -> type[XRayReader] | None:
    return reader_class(target, XRayReader)


#: Keys of the X-ray data config before readers (checkpoints and run configs written with ``source: null``).
LEGACY_KEYS = ("image_dir", "csv", "view_positions", "use_official_split", "synthetic", "generate_if_missing")


def upgrade_legacy_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """An old flat X-ray data config (the NIH keys and ``synthetic`` beside ``source: null``) as the reader form
    (``source: {_target_: ...NIHReader | ...SyntheticNIHReader, ...}``), so checkpoints and run folders
    written before readers still evaluate on the same cases; any other config is returned as is (plain).

    The old datamodule built ``SyntheticNIHReader(generator=synthetic, generate_if_missing=...)`` when
    ``synthetic`` was set, else ``NIHReader``, and ignored the NIH keys when ``source`` was given."""
    out = plain_config(data)
    if not str(out.get("_target_", "")).endswith("XRayDataModule") or not any(k in out for k in LEGACY_KEYS):
        return out
    legacy = {k: out.pop(k) for k in LEGACY_KEYS if k in out}
    if out.get("source") is not None:
        return out
    synthetic, generate = legacy.pop("synthetic", None), bool(legacy.pop("generate_if_missing", False))
    cls: type[NIHReader] = SyntheticNIHReader if synthetic else NIHReader
    out["source"] = {"_target_": f"{cls.__module__}.{cls.__qualname__}", **legacy}
    if synthetic:
        out["source"].update(generator=synthetic, generate_if_missing=generate)
    return out
