"""Chest X-ray data: the datamodule (cache, split, load), the NIH table and image helpers, the transforms.

Sources are readers (medens/data/xray_readers.py: NIH ChestX-ray14 as distributed, the synthetic NIH
set, MedMNIST 2D). Label order is `NIH_LABELS`, the single source of truth: every reader maps onto it.
`No Finding` is all zeros. Splits are the source's official one (NIH's `train_val_list.txt` /
`test_list.txt`, MedMNIST's file split) or by patient.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import hydra.utils
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2

from medens.data.loaders import make_loader
from medens.data.splits import patient_split, split_by_patient_list
from medens.data.xray_augment import BatchAugment
from medens.data.xray_cache import XRayCache, cache_settings, ensure_xray_cache
from medens.data.xray_readers import (
    CASE,
    PATIENT,
    SPLIT,
    TARGETS,
    MedMNISTReader,
    NIHReader,
    XRayReader,
    build_xray_reader,
)
from medens.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: The 14 NIH ChestX-ray14 findings, in the order of the NIH paper (Wang et al. 2017) and CheXNet.
NIH_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_finding_labels(text: str, labels: Sequence[str] = NIH_LABELS, where: str = "") -> np.ndarray:
    """`'Effusion|Mass'` -> multi-hot vector in `labels` order; `No Finding` -> all zeros."""
    vec = np.zeros(len(labels), dtype=np.float32)
    index = {name: i for i, name in enumerate(labels)}
    for name in str(text).split("|"):
        name = name.strip()
        if not name or name == NO_FINDING:
            continue
        if name not in index:
            raise DataError(f"{where}unknown finding {name!r}; known labels: {', '.join(labels)}")
        vec[index[name]] = 1.0
    return vec


def find_label_csv(root: Path, csv: str | None) -> Path:
    """The label table: `csv` if given (relative to root), else the one `Data_Entry_2017*.csv[.gz]` in root."""
    if csv:
        path = Path(csv) if Path(csv).is_absolute() else root / csv
        if not path.is_file():
            raise DataError(f"{path}: label CSV not found")
        return path
    found = sorted(root.glob("Data_Entry_2017*.csv")) + sorted(root.glob("Data_Entry_2017*.csv.gz"))
    if not found:
        raise DataError(f"{root}: no Data_Entry_2017*.csv(.gz) label table in the dataset folder")
    if len(found) > 1:
        log.warning("several label tables in %s, using %s", root, found[0].name)
    return found[0]


def read_nih_table(csv_path: Path, labels: Sequence[str] = NIH_LABELS) -> pd.DataFrame:
    """Read and validate the NIH label table; adds a `targets` column of multi-hot vectors."""
    try:
        df = pd.read_csv(csv_path, dtype={"Patient ID": str})
    except Exception as exc:
        raise DataError(f"{csv_path}: cannot read label CSV ({exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(
            f"{csv_path}: missing column(s) {missing}; found {list(df.columns)[:12]}"
        )
    if df.empty:
        raise DataError(f"{csv_path}: label CSV has no rows")
    for column in REQUIRED_COLUMNS:  # an empty cell would become the string "nan" further down
        empty = df[column].isna() | (df[column].astype(str).str.strip() == "")
        if empty.any():
            rows = [int(i) + 2 for i in np.flatnonzero(empty.to_numpy())]
            image = df["Image Index"].iloc[rows[0] - 2]
            raise DataError(
                f"{csv_path} row {rows[0]} (Image Index {image!r}): empty {column!r}"
                + (f" ({len(rows)} rows: {rows[:10]})" if len(rows) > 1 else "")
                + "; every row needs an image name, its findings ('No Finding' for none) and a patient id"
            )
    df["Patient ID"] = df["Patient ID"].astype(str).str.strip()
    dup = df["Image Index"].duplicated()
    if dup.any():
        raise DataError(f"{csv_path}: duplicate Image Index {df.loc[dup, 'Image Index'].iloc[0]!r}")
    df["targets"] = [
        parse_finding_labels(t, labels, where=f"{csv_path} row {i + 2} ({name}): ")
        for i, (t, name) in enumerate(zip(df["Finding Labels"], df["Image Index"], strict=True))
    ]
    return df


def load_xray_image(path: Path) -> Image.Image:
    """Open any NIH PNG (greyscale, RGB, RGBA, 8/16 bit) as 8-bit greyscale; errors name the file."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I", "F"):
                arr = np.asarray(im, dtype=np.float32)
                lo, hi = float(arr.min()), float(arr.max())
                arr = (arr - lo) / (hi - lo + 1e-6) * 255.0
                return Image.fromarray(arr.astype(np.uint8), mode="L")
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA").convert("RGB")
            return im.convert("L")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from exc


def build_transforms(
    image_size: int,
    channels: int,
    normalize: str,
    augment: Sequence[Any] | None,
) -> v2.Compose:
    """Greyscale PIL (or uint8 [1, H, W] tensor) -> float tensor [channels, size, size]: resize, optional
    augmentation, normalise.

    Resize and augmentation run on the 8-bit PIL image: PIL's affine and colour ops are ~5-10x faster than
    torchvision's tensor kernels on uint8 (RandomAffine: ~1 ms vs ~10 ms at 224 px), which decides the
    loader's speed once decoding is cached. A uint8 tensor (the decoded-image cache, the serving layer)
    becomes a PIL image first, so every caller gets the same pixels.
    """
    steps: list[Any] = [GreyPIL(), v2.Resize((image_size, image_size), antialias=True)]
    steps += list(augment or [])
    steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)]
    if channels != 1:
        steps.append(RepeatChannels(channels))
    if normalize == "imagenet":
        mean, std = IMAGENET_MEAN[:channels], IMAGENET_STD[:channels]
        steps.append(v2.Normalize(mean=list(mean), std=list(std)))
    elif normalize == "unit":
        steps.append(v2.Normalize(mean=[0.5] * channels, std=[0.5] * channels))
    elif normalize != "none":
        raise ValueError(f"normalize must be imagenet, unit or none, got {normalize!r}")
    return v2.Compose(steps)


class GreyPIL(torch.nn.Module):
    """uint8 [1, H, W] / [H, W] tensor or array -> 8-bit greyscale PIL image; a PIL image passes through."""

    def forward(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and (x.dim() == 2 or x.shape[0] == 1):
            return Image.fromarray(x.reshape(x.shape[-2:]).numpy(), mode="L")
        if isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2:
            return Image.fromarray(x, mode="L")
        return x


class UInt8Image(torch.nn.Module):
    """Greyscale PIL / uint8 tensor -> uint8 `[1, size, size]` tensor (the `augment_on=device` training input).

    A cached image already at `size` passes through untouched (no PIL round trip); anything else is resized
    exactly like the evaluation transforms (PIL, antialiased), so both paths see the same pixels.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.resize = v2.Compose([GreyPIL(), v2.Resize((size, size), antialias=True), v2.PILToTensor()])

    def forward(self, x: Any) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and tuple(x.shape) == (1, self.size, self.size):
            return x
        return self.resize(x)


class RepeatChannels(torch.nn.Module):
    """Greyscale [1, H, W] -> [channels, H, W] (a picklable module, unlike a lambda, for worker processes)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t.expand(self.channels, -1, -1)


class XRayDataset(Dataset):
    """Images and multi-hot targets; decoding is lazy, errors name the file.

    With a `cache` (`medens.data.xray_cache.XRayCache`), item `i` is row `cache_rows[i]` of the decoded
    uint8 array instead of the PNG at `paths[i]`: no decoding in the loader, same transforms after it.
    """

    def __init__(
        self,
        paths: Sequence[Path] | None,
        targets: np.ndarray,
        ids: Sequence[str],
        patient_ids: Sequence[str],
        transform: v2.Compose,
        cache: XRayCache | None = None,
        cache_rows: Sequence[int] | None = None,
        augment: BatchAugment | None = None,
        read: Callable[[str], Any] | None = None,
    ) -> None:
        self.paths = list(paths) if paths is not None else None
        self.augment = augment
        self.read = read
        if self.paths is None and read is None:
            raise ValueError("an XRayDataset needs image paths or a reader's read_case")
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.float32))
        self.ids = list(ids)
        self.patient_ids = list(patient_ids)
        self.transform = transform
        self.cache = cache
        self.cache_rows = list(cache_rows) if cache_rows is not None else None
        if cache is not None and (self.cache_rows is None or len(self.cache_rows) != len(self.ids)):
            raise ValueError("a cached XRayDataset needs one cache row per image")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.cache is not None:
            raw: Any = torch.from_numpy(self.cache.image(self.cache_rows[i]))[None]  # type: ignore[index]
        elif self.read is not None:
            raw = self.read(self.ids[i])
        else:
            raw = load_xray_image(self.paths[i])  # type: ignore[index]
        image = self.transform(raw)
        item = {"image": image, "label": self.targets[i], "case_id": self.ids[i], "patient_id": self.patient_ids[i]}
        if self.augment is not None:  # augment_on=device: uint8 image + this item's random parameters
            item["augment"] = self.augment.sample(int(image.shape[-2]), int(image.shape[-1]))
        return item


class XRayDataModule(pl.LightningDataModule):
    """Chest X-ray images from any reader (`source`) -> patient-level train/val/test loaders.

    The reader (medens/data/xray_readers.py) knows the on-disk layout; this class only caches (the
    decoded-image cache, for readers with image files), splits (the source's official split, else by
    patient) and loads. `source` is a reader, its `{_target_: ...}` config (conf/data/source/xray_*.yaml)
    or a short name; None is NIH ChestX-ray14 at `root` with the reader's defaults. Configs written before
    readers (NIH keys beside these) go through `medens.data.xray_readers.upgrade_legacy_config` first.
    """

    def __init__(
        self,
        root: str,
        source: XRayReader | str | Mapping[str, Any] | None = None,
        labels: Sequence[str] = NIH_LABELS,
        image_size: int = 224,
        channels: int = 3,
        normalize: str = "imagenet",
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        missing_images: str = "error",
        verify_images: bool = False,
        max_images: int | None = None,
        train_augment: Sequence[Any] | None = None,
        cache: dict[str, Any] | bool | None = None,
        augment_on: Literal["auto", "device", "loader"] = "loader",
    ) -> None:
        super().__init__()
        if missing_images not in ("error", "skip"):
            raise ConfigError(f"data.missing_images must be 'error' or 'skip', got {missing_images!r}")
        if augment_on not in ("auto", "device", "loader"):
            raise ConfigError(f"data.augment_on={augment_on!r}: must be 'device' (batched, after the transfer), "
                              "'loader' (per image in the DataLoader workers) or 'auto'")  # fmt: skip
        self.root = Path(root)
        self.reader: XRayReader = NIHReader() if source is None else build_xray_reader(source)
        self._default_labels = tuple(labels)
        self._labels: tuple[str, ...] | None = None
        self.image_size = image_size
        self.channels = channels
        self.normalize = normalize
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.missing_images = missing_images
        self.verify_images = verify_images
        self.max_images = max_images
        self.train_augment = [hydra.utils.instantiate(t) if _is_config(t) else t for t in (train_augment or [])]
        self.augment_on = augment_on
        #: the batched training augmentation that `XRayClassifier.on_after_batch_transfer` applies; with
        #: `auto` it is built here and kept or dropped in `setup`, once the trainer's device is known
        self.batch_augment: BatchAugment | None = None
        if augment_on != "loader":
            mean, std = _norm_stats(normalize, channels)
            try:
                self.batch_augment = BatchAugment.from_transforms(self.train_augment, channels, mean, std)
            except ConfigError:
                if augment_on == "device":
                    raise
                log.info("data.augment_on=auto: the training augmentation has no batched equivalent; "
                         "it runs per image in the DataLoader")  # fmt: skip
        self.cache_settings = cache_settings(cache)
        self.cache: XRayCache | None = None
        self.datasets: dict[str, XRayDataset] = {}
        self.skipped: list[str] = []

    # -- preparation ------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.reader.prepare(self.root)

    @property
    def labels(self) -> tuple[str, ...]:
        """The label order: NIH's (`NIH_LABELS`) unless the reader's source defines its own."""
        if self._labels is None:
            self._labels = self.reader.labels(self.root, self._default_labels)
        return self._labels

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def io_contract(self) -> dict[str, Any]:
        """What a model trained on this data expects as input and produces as output."""
        cached = self.cache_settings.enabled and self.reader.image_folder(self.root) is not None
        contract: dict[str, Any] = {
            "modality": "xray",
            "label_names": list(self.labels),
            "input_shape": [self.channels, self.image_size, self.image_size],
            "preprocessing": {
                "greyscale": True,
                "resize": [self.image_size, self.image_size],
                # with the decoded-image cache, images are first resized to the cache size (bilinear)
                "cache_resize": [self.cache_settings.resolved_size(self.image_size)] * 2 if cached else None,
                "scale": "uint8/255",
                "normalize": self.normalize,
                "mean": list(IMAGENET_MEAN[: self.channels]) if self.normalize == "imagenet" else None,
                "std": list(IMAGENET_STD[: self.channels]) if self.normalize == "imagenet" else None,
            },
            # training only (inference never augments): where the random augmentation ran
            "train_augment_on": self.resolved_augment_on(),
            "output": "logits, one per label (sigmoid for probabilities)",
        }
        if isinstance(self.reader, MedMNISTReader):
            contract["source"] = f"medmnist:{self.reader.file(self.root).name}"
        return contract

    def _table(self) -> pd.DataFrame:
        """The reader's cases (one row per image: `Image Index`, `Patient ID`, `targets`, optional `split`)."""
        cases = self.reader.list_cases(self.root, self.labels, self.missing_images)
        self.skipped = list(cases.skipped)
        df = cases.table
        if self.max_images:
            df = df.iloc[: self.max_images].reset_index(drop=True)
        if self.verify_images and not (self.cache_settings.enabled and self.reader.image_folder(self.root)):
            for name in df[CASE]:  # building the cache decodes them all anyway
                self.reader.read_case(self.root, name)
        return df

    def _splits(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        patients = df[PATIENT].astype(str).tolist()
        if SPLIT in df.columns:  # the source's official split
            split = df[SPLIT].to_numpy()
            if "val" in set(split):
                return {k: np.flatnonzero(split == k) for k in ("train", "val", "test")}
            pool = np.flatnonzero(split != "test")
            inner = split_by_patient_list([patients[i] for i in pool], self.val_fraction, self.seed)
            return {"train": pool[inner["train"]], "val": pool[inner["val"]], "test": np.flatnonzero(split == "test")}
        s = patient_split(patients, self.val_fraction, self.test_fraction, self.seed)
        return {k: np.asarray(v, dtype=int) for k, v in s.items()}

    def resolved_augment_on(self) -> str:
        """Where the training augmentation runs. `auto` picks `device` (batched, after the transfer) on an
        accelerator or without loader workers, and `loader` when training runs on the CPU with workers:
        there the workers augment in parallel with the training step instead of adding to it."""
        if self.augment_on != "auto":
            return self.augment_on
        if self.batch_augment is None:
            return "loader"
        trainer = self.trainer
        on_cpu = trainer is None or trainer.strategy.root_device.type == "cpu"
        return "loader" if on_cpu and self.num_workers > 0 else "device"

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.resolved_augment_on() == "loader":
            self.batch_augment = None
        df = self._table()
        image_root = self.reader.image_folder(self.root)
        self.cache, rows = None, None
        if image_root is not None:
            self.cache = ensure_xray_cache(
                image_root, df[CASE].tolist(), self.cache_settings, self.image_size, self.missing_images
            )
        if self.cache is not None:
            rows = np.arange(len(df))  # the cache holds the table's images in table order
            if self.cache.failed:
                keep = ~df[CASE].isin(list(self.cache.failed)).to_numpy()
                self.skipped = self.skipped + sorted(self.cache.failed)
                df, rows = df[keep].reset_index(drop=True), rows[keep]
        eval_tf = build_transforms(self.image_size, self.channels, self.normalize, None)
        if self.batch_augment is not None:  # the loader carries uint8; augmentation + normalisation on the device
            train_tf: Any = v2.Compose([UInt8Image(self.image_size)])
        else:
            train_tf = build_transforms(self.image_size, self.channels, self.normalize, self.train_augment)
        read = None if image_root is not None else functools.partial(self.reader.read_case, self.root)
        for name, idx in self._splits(df).items():
            part = df.iloc[idx]
            self.datasets[name] = XRayDataset(
                [image_root / n for n in part[CASE]] if image_root is not None else None,
                np.stack(part[TARGETS].to_list()) if len(part) else np.zeros((0, self.num_classes)),
                part[CASE].tolist(),
                part[PATIENT].astype(str).tolist(),
                train_tf if name == "train" else eval_tf,
                cache=self.cache,
                cache_rows=None if rows is None else rows[idx].tolist(),
                augment=self.batch_augment if name == "train" else None,
                read=read,
            )
        sizes = {k: len(v) for k, v in self.datasets.items()}
        log.info("X-ray splits (images): %s from %s (%s)", sizes, self.root, self.reader.name)
        if sizes["train"] == 0 or sizes["val"] == 0:
            raise DataError(f"{self.root}: too few patients for a train/val split: {sizes}")

    def split_patient_ids(self, split: str) -> set[str]:
        return set(self.datasets[split].patient_ids)

    def positive_fraction(self) -> torch.Tensor:
        """Per-label prevalence in the training split (for positive class weights)."""
        return self.datasets["train"].targets.mean(0)

    def _loader(self, split: str, train: bool) -> torch.utils.data.DataLoader:
        return make_loader(
            self.datasets[split],
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            seed=self.seed,
            trainer=self.trainer,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=train,
        )

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("test", train=False)

    def describe(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "source": self.reader.name,
            "splits": {k: len(v) for k, v in self.datasets.items()},
            "skipped_missing_images": len(self.skipped),
            "cache": str(self.cache.folder) if self.cache is not None else None,
            "label_names": list(self.labels),
        }


def _norm_stats(normalize: str, channels: int) -> tuple[list[float] | None, list[float] | None]:
    """(mean, std) of `build_transforms`' normalisation, for the on-device path."""
    if normalize == "imagenet":
        return list(IMAGENET_MEAN[:channels]), list(IMAGENET_STD[:channels])
    if normalize == "unit":
        return [0.5] * channels, [0.5] * channels
    if normalize == "none":
        return None, None
    raise ValueError(f"normalize must be imagenet, unit or none, got {normalize!r}")


def _is_config(obj: Any) -> bool:
    return isinstance(obj, dict) or (hasattr(obj, "keys") and "_target_" in obj)

