"""`CTDataModule`: nodule patches for benign/malignant classification from any CT source.

The source is a reader (:mod:`medens.data.ct.readers`: LUNA16, DICOM, pre-cropped VOIs, NoduleMNIST3D,
synthetic) that lists the cases and reads their scans; this module only caches, splits and loads.
``prepare_data`` (one process per node) lets the reader prepare its folder and builds the patch cache;
``setup`` only reads the cache, applies the malignancy rule, and splits by patient. Items are
``{"image": [C,P,P,P] float32, "label": float32 scalar (1 malignant), "case_id", "patient_id",
"diameter_mm"}``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from medens.data.ct import cache as ct_cache
from medens.data.ct.datasets import CTPatchDataset
from medens.data.ct.geometry import hu_window
from medens.data.ct.labels import NoduleRecord, apply_rule, normalise_rule, resolve_label_column
from medens.data.ct.readers import CTReader, build_reader
from medens.data.ct.sources import ErrorPolicy
from medens.data.ct.transforms import CTAugment, normalise_augment
from medens.data.loaders import make_loader
from medens.data.reader import plain_config
from medens.data.splits import patient_kfold, patient_split, split_by_patient_list
from medens.errors import ConfigError, DataError
from medens.utils.hashing import sha256_json
from medens.utils.paths import cache_root

log = logging.getLogger(__name__)

CHANNELS = ("image", "mask")
SPLITS = ("train", "val", "test")


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and (torch.distributed.get_world_size() > 1)
    )


class CTDataModule(L.LightningDataModule):
    """CT nodule patches for Lightning, from any reader (``source``) over the dataset folder ``root``.

    ``source`` is a :class:`~medens.data.ct.readers.CTReader`, its ``{_target_: ...}`` config, or a short
    name (``luna16``, ``dicom``, ``voi``, ``nodulemnist3d``, ``synthetic``) for a reader with defaults.
    Patches: resampled to ``spacing_mm`` (isotropic), HU window scaled to [0, 1], ``patch_size``^3
    centred on the nodule, padded with air (``pad_hu``); cached under ``cache_dir`` (default
    ``<medens.utils.paths.cache_root()>/ct``) keyed by this preprocessing and the reader's
    fingerprint of its input files. ``malignancy_rule`` = ``{column: auto, malignant_min: 4,
    benign_max: 2, indeterminate: exclude|benign|malignant}``. With ``n_folds``, ``test_fraction`` of
    patients is held out first and the rest split into folds (``val_fraction`` unused) and each fold's
    held-out patients are ``val``; with ``inner_val_fraction`` > 0 (and ``test_fraction=0``) they are
    ``test`` instead and ``val`` is that fraction of the fold's training patients, so early stopping and
    checkpoint selection never see the held-out fold (nested cross-validation). A reader whose pixels
    are ready-made in memory (NoduleMNIST3D) keeps its official split and is not cached.
    """

    def __init__(
        self,
        source: CTReader | str | Mapping[str, Any] = "luna16",
        root: str = "data/ct_synthetic",
        patch_size: int = 64,
        spacing_mm: float = 1.0,
        hu_window: Sequence[float] = (-1000.0, 400.0),
        pad_hu: float = -1000.0,
        malignancy_rule: Mapping[str, Any] | None = None,
        channels: Sequence[str] = ("image",),
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool = False,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        n_folds: int | None = None,
        fold: int = 0,
        inner_val_fraction: float = 0.0,
        cache_dir: str | None = None,
        augment: Mapping[str, Any] | bool | None = None,
        on_error: str = "error",
    ) -> None:
        super().__init__()
        self.reader = build_reader(source)
        channels = tuple(plain_config(channels))
        if (
            not channels
            or channels[0] != "image"
            or any(c not in CHANNELS for c in channels)
            or len(set(channels)) != len(channels)
        ):
            raise ConfigError(f"channels must be [image] or [image, mask], got {list(channels)}")
        if "mask" in channels and not self.reader.has_masks:
            raise ConfigError(f"channels: source {self.reader.name} has no nodule masks; use [image]")
        window = tuple(float(v) for v in plain_config(hu_window))
        if len(window) != 2 or not window[1] > window[0]:
            raise ConfigError(f"hu_window must be [low, high] with low < high, got {list(window)}")
        if int(patch_size) < 4 or float(spacing_mm) <= 0:
            raise ConfigError(f"patch_size must be >= 4 and spacing_mm > 0, got {patch_size}, {spacing_mm}")
        if int(seed) < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        if n_folds is not None:
            if self.reader.in_memory:
                raise ConfigError(
                    f"n_folds: source {self.reader.name} has no patient IDs; only its official split is used"
                )
            if int(n_folds) < 2 or not 0 <= int(fold) < int(n_folds):
                raise ConfigError(
                    f"need n_folds >= 2 and 0 <= fold < n_folds, got n_folds={n_folds}, fold={fold}"
                )
        if not 0.0 <= float(inner_val_fraction) < 1.0:
            raise ConfigError(f"inner_val_fraction must be in [0, 1), got {inner_val_fraction}")
        if float(inner_val_fraction) > 0:
            if n_folds is None:
                raise ConfigError("inner_val_fraction needs n_folds (it splits a fold's training patients)")
            if float(test_fraction) > 0:
                raise ConfigError(
                    "inner_val_fraction > 0 makes each fold's held-out patients the test split; "
                    f"set test_fraction=0 (got {test_fraction})"
                )
        if on_error not in ("error", "skip"):
            raise ConfigError(f"on_error must be 'error' or 'skip', got {on_error!r}")
        self.source = self.reader.name
        self.root = Path(root)
        self.patch_config = ct_cache.PatchConfig(
            patch_size=int(patch_size),
            spacing_mm=float(spacing_mm),
            hu_window=window,  # type: ignore[arg-type]
            pad_hu=float(pad_hu),
            channels=channels,
        )
        self.rule = normalise_rule(plain_config(malignancy_rule))
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.seed = int(seed)
        self.n_folds = None if n_folds is None else int(n_folds)
        self.fold = int(fold)
        self.inner_val_fraction = float(inner_val_fraction)
        self.cache_dir = Path(cache_dir) if cache_dir else cache_root() / "ct"
        self.augment_cfg = normalise_augment(plain_config(augment))
        self.on_error = on_error
        self.save_hyperparameters(logger=False)
        # Lightning stores these in every checkpoint, which medens loads with weights_only=True:
        # Hydra's ListConfig/DictConfig (or a reader object) would make the file unloadable, so keep
        # plain containers; the reader is recorded as its `_target_` config.
        for key in list(self.hparams):
            self.hparams[key] = plain_config(self.hparams[key])
        self.hparams["source"] = plain_config(self.reader.config())

        self.datasets: dict[str, CTPatchDataset] = {}
        self.skipped: list[dict[str, str]] = []  # bad inputs skipped under on_error=skip
        self.excluded: list[dict[str, str]] = []  # unlabelled / indeterminate nodules left out
        self.cache_path: Path | None = None
        self._prepared = False

    # ----------------------------------------------------------------------------------- properties

    @property
    def num_channels(self) -> int:
        """Input channels of each patch (1 image-only, 2 with the nodule mask)."""
        return len(self.patch_config.channels)

    @property
    def pad_value(self) -> float:
        """The windowed value of padding (air): what augmentation fills in."""
        lo, hi = self.patch_config.hu_window
        return float(hu_window(np.asarray([self.patch_config.pad_hu]), lo, hi)[0])

    def io_contract(self) -> dict[str, Any]:
        """What a model trained on this data expects: written into every checkpoint's hyperparameters,
        so evaluation, export and the ensemble feed it without guessing channels or preprocessing."""
        pc = self.patch_config
        meaning = {
            "image": f"CT in HU, windowed [{pc.hu_window[0]:g}, {pc.hu_window[1]:g}] and scaled to [0, 1]",
            "mask": "binary nodule mask (drawn mask, or a ball of diameter_mm where none is given)",
        }
        contract: dict[str, Any] = {
            "modality": "ct",
            "source": self.source,
            "channels": list(pc.channels),
            "channel_meaning": [meaning[c] for c in pc.channels],
            "patch_size": [pc.patch_size] * 3,
            "spacing_mm": [pc.spacing_mm] * 3,
            "axes": "world-aligned LPS x, y, z (nodule centre at voxel patch_size // 2)",
            "hu_window": list(pc.hu_window),
            "pad_hu": pc.pad_hu,
            "value_range": [0.0, 1.0],
            "label_names": ["malignant"],
            "label_meaning": {"0": "benign", "1": "malignant"},
            "output": "probability of malignancy (sigmoid of one logit, or softmax[:, 1] of two)",
        }
        if self.reader.in_memory:
            contract.update(spacing_mm=None, hu_window=None, pad_hu=None, value_range=[0.0, 1.0])
            contract["channel_meaning"] = ["NoduleMNIST3D uint8 image / 255, resized to patch_size"]
        else:
            contract["malignancy_rule"] = dict(self.rule)
        return contract

    # ----------------------------------------------------------------------------------- cache key

    def cache_key(self) -> str:
        """Hash of the preprocessing config and the reader's fingerprint of the input files."""
        root = self.root.resolve()
        payload = {
            "version": ct_cache.CACHE_VERSION,
            "source": self.reader.name,
            "root": str(root),
            **self.reader.fingerprint(root, exclude=[self.cache_dir]),
            "patch": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self.patch_config).items()},
            "on_error": self.on_error,
        }
        return sha256_json(payload)

    # ----------------------------------------------------------------------------------- lightning

    def prepare_data(self) -> None:
        """Let the reader prepare its folder (the synthetic one generates), then build the patch cache
        (once, under a lock)."""
        self.reader.prepare(self.root)
        self._prepared = True
        if self.reader.in_memory:
            self.reader.list_cases(self.root, ErrorPolicy(self.on_error), False)  # validate early, on one process
            return
        key = self.cache_key()
        path = ct_cache.cache_path_for(self.cache_dir, self.reader.name, key)
        with ct_cache.file_lock(self.cache_dir / f".{path.name}.lock"):
            if ct_cache.load_manifest(path) is not None:
                return
            policy = ErrorPolicy(self.on_error)
            records, excluded = self.reader.list_cases(self.root, policy, "mask" in self.patch_config.channels)
            info = {"source": self.reader.name, "root": str(self.root.resolve()), "key": key, "excluded": excluded}
            ct_cache.build_cache(path, records, self.patch_config, policy, info=info, read=self.reader.read_case)

    def setup(self, stage: str | None = None) -> None:
        """Read the cache (or the in-memory patches), apply the malignancy rule and split by patient.
        Idempotent."""
        if self.datasets:
            return
        if self.reader.in_memory:
            self._setup_in_memory()
            return
        if not self._prepared and not _distributed():
            self.prepare_data()  # single process used outside a Trainer (cheap when up to date)
        key = self.cache_key()
        path = ct_cache.cache_path_for(self.cache_dir, self.reader.name, key)
        manifest = ct_cache.load_manifest(path)
        if manifest is None:
            raise DataError(f"{path}: no CT patch cache; prepare_data must run (on rank 0) before setup")
        self.cache_path = path
        self.skipped = list(manifest["skipped"])
        self.excluded = list(manifest["info"].get("excluded", []))
        records = [
            NoduleRecord.from_json({k: v for k, v in it.items() if k != "row"}) for it in manifest["items"]
        ]
        rows = [int(it["row"]) for it in manifest["items"]]
        records = self.reader.assign_patients(records, self.root)
        labels, keep = self._labels(records)
        records = [records[i] for i in keep]
        rows = [rows[i] for i in keep]
        if not records:
            raise DataError(
                f"{self.root}: no labelled nodules left (skipped {len(self.skipped)}, "
                f"excluded {len(self.excluded)})"
            )
        split_idx = self._split([r.patient_id for r in records])
        train_tf = CTAugment(n_image_channels=1, pad_value=self.pad_value, **self.augment_cfg)
        for split in SPLITS:
            idx = split_idx[split]
            self.datasets[split] = CTPatchDataset(
                path / ct_cache.PATCHES,
                [rows[i] for i in idx],
                [records[i] for i in idx],
                [labels[i] for i in idx],
                transform=train_tf if split == "train" and self.augment_cfg["enabled"] else None,
            )
        self._log_summary()

    def _labels(self, records: list[NoduleRecord]) -> tuple[list[float], list[int]]:
        """Apply the malignancy rule; indeterminate/unlabelled nodules go to ``excluded``."""
        if not records:
            return [], []
        columns = set().union(*(r.label_fields for r in records))
        where = self.reader.label_file(self.root)
        col, kind = resolve_label_column(columns, self.rule, where)
        labels, keep = [], []
        for i, r in enumerate(records):
            value = r.label_fields.get(col)
            y = apply_rule(value, kind, self.rule, f"{where} ({r.case_id})")
            if y is None:
                why = "has no value" if value is None else "is indeterminate under malignancy_rule"
                self.excluded.append(
                    {"case_id": r.case_id, "file": where, "reason": f"{col}={value!r} {why}"}
                )
                continue
            labels.append(y)
            keep.append(i)
        return labels, keep

    def _split(self, patient_ids: list[str]) -> dict[str, list[int]]:
        first = patient_split(
            patient_ids,
            val_fraction=0.0 if self.n_folds else self.val_fraction,
            test_fraction=self.test_fraction,
            seed=self.seed,
        )
        if not self.n_folds:
            return first
        pool = first["train"]
        folds = patient_kfold([patient_ids[i] for i in pool], self.n_folds, seed=self.seed)
        f = folds[self.fold]
        if self.inner_val_fraction > 0:
            train_pool = [pool[i] for i in f["train"]]
            inner = split_by_patient_list(
                [patient_ids[i] for i in train_pool], self.inner_val_fraction, self.seed + 1 + self.fold
            )
            return {
                "train": [train_pool[i] for i in inner["train"]],
                "val": [train_pool[i] for i in inner["val"]],
                "test": [pool[i] for i in f["val"]],
            }
        return {
            "train": [pool[i] for i in f["train"]],
            "val": [pool[i] for i in f["val"]],
            "test": first["test"],
        }

    def _setup_in_memory(self) -> None:
        """NoduleMNIST3D: the official split of ready-made uint8 patches, scaled to [0, 1] and resized."""
        data = self.reader.load(self.root)  # type: ignore[attr-defined]
        records = self.reader.records(data)  # type: ignore[attr-defined]
        train_tf = CTAugment(n_image_channels=1, pad_value=0.0, **self.augment_cfg)
        for split in SPLITS:
            images, labels = data[split]
            recs = [r for r in records if r.official_split == split]
            self.datasets[split] = CTPatchDataset(
                images,
                list(range(len(images))),
                recs,
                [float(y) for y in labels],
                transform=train_tf if split == "train" and self.augment_cfg["enabled"] else None,
                scale=1.0 / 255.0,
                resize_to=self.patch_config.patch_size,
            )
        self._log_summary()

    def _log_summary(self) -> None:
        sizes = {s: len(d) for s, d in self.datasets.items()}
        log.info(
            "CT data (%s, %s): %s items; train classes %s; %d skipped (on_error=%s), %d excluded",
            self.source,
            self.root,
            sizes,
            self.class_counts(),
            len(self.skipped),
            self.on_error,
            len(self.excluded),
        )
        if self.skipped:
            log.warning(
                "CT data: %d nodule(s) skipped for bad input, e.g. %s",
                len(self.skipped),
                self.skipped[0]["reason"],
            )

    # ----------------------------------------------------------------------------------- loaders

    def _need(self, split: str) -> CTPatchDataset:
        if split not in self.datasets:
            self.setup()
        return self.datasets[split]

    def _loader(self, split: str, train: bool) -> DataLoader:
        # medens' shared loader: order and per-item augmentation seeds depend only on (seed, epoch,
        # index), and it shards itself under DDP (trainers run with use_distributed_sampler=False).
        return make_loader(
            self._need(split),
            batch_size=self.batch_size,
            shuffle=train,
            seed=self.seed,
            trainer=self.trainer,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=train,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    # ----------------------------------------------------------------------------------- queries

    def split_patient_ids(self, split: str) -> set[str]:
        """Patients in a split (train/val/test): for checks that no case crosses splits."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return {r.patient_id for r in self._need(split).records}

    def split_records(self, split: str) -> list[dict[str, Any]]:
        """Per item of a split: case_id, patient_id, label, diameter_mm (e.g. for the size baseline)."""
        ds = self._need(split)
        return [
            {
                "case_id": r.case_id,
                "patient_id": r.patient_id,
                "label": y,
                "diameter_mm": float(r.diameter_mm),
            }
            for r, y in zip(ds.records, ds.labels, strict=True)
        ]

    def class_counts(self) -> dict[str, int]:
        """Benign and malignant counts of the train split (for pos_weight / sampling)."""
        labels = self._need("train").labels
        n_pos = int(sum(1 for y in labels if y >= 0.5))
        return {"benign": len(labels) - n_pos, "malignant": n_pos}

    def positive_fraction(self) -> torch.Tensor:
        """Malignant fraction of the train split, shape [1] (as the X-ray datamodule's prevalence)."""
        counts = self.class_counts()
        return torch.tensor([counts["malignant"] / max(counts["benign"] + counts["malignant"], 1)])
