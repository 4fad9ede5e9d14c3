"""The stacking stage's data: cohort cases -> frozen base-model features -> meta-learner batches.

Only cases no base model trained on reach the meta-learner. With a `split` column the manifest says
which cases those are (`meta` trains the meta-learner, `test` is held out for the report), and every
`meta`/`test` patient is checked against the patients each base checkpoint records as seen (its
train and validation split); without one, every patient a base model saw is dropped and the rest
are split by patient. `meta` is further split by patient into meta-train and meta-val (early
stopping, weighted-average fit).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from medens.data.cohort.manifest import MODALITY_COLUMNS, load_manifest
from medens.data.loaders import make_loader
from medens.data.splits import split_by_patient_list
from medens.ensemble.base_models import FrozenBaseModel, load_frozen_base_model
from medens.ensemble.features import cached_base_features, missing_column, standardise
from medens.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class LeakageError(DataError):
    """A case the stacking stage would train or report on was seen by a base model."""


class EnsembleDataModule(pl.LightningDataModule):
    """Cohort manifest + frozen base models -> standardised feature tensors per split."""

    def __init__(
        self,
        manifest: str,
        targets: Sequence[str],
        base_models: Mapping[str, Mapping[str, Any]],
        on_missing_base: str = "error",
        on_feature_error: str = "error",
        require_seen_record: bool = True,
        val_fraction: float = 0.25,
        test_fraction: float = 0.3,
        seed: int = 0,
        batch_size: int = 32,
        modality_dropout: float = 0.1,
        cache_dir: str | None = None,
        generate_if_missing: bool = False,
        synthetic: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if on_missing_base not in ("error", "skip"):
            raise ConfigError(f"data.on_missing_base must be 'error' or 'skip', got {on_missing_base!r}")
        if on_feature_error not in ("error", "missing"):
            raise ConfigError(f"data.on_feature_error must be 'error' or 'missing', got {on_feature_error!r}")
        unknown = sorted(set(base_models) - set(MODALITY_COLUMNS))
        if unknown:
            raise ConfigError(
                f"data.base_models: unknown modality {unknown}; known: {list(MODALITY_COLUMNS)}"
            )
        if not targets:
            raise ConfigError("data.targets: name at least one target column of the manifest")
        self.manifest_path = Path(manifest)
        self.targets = [str(t) for t in targets]
        self.base_cfg = {m: dict(v or {}) for m, v in base_models.items()}
        self.on_missing_base = on_missing_base
        self.on_feature_error = on_feature_error
        self.require_seen_record = require_seen_record
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.batch_size = batch_size
        self.modality_dropout = modality_dropout
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.generate_if_missing = generate_if_missing
        self.synthetic = dict(synthetic) if synthetic else None
        self.base: dict[str, FrozenBaseModel] = {}
        self.frames: dict[str, pd.DataFrame] = {}
        self.feature_names: list[str] = []
        self.indicator_names: list[str] = []
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self.datasets: dict[str, TensorDataset] = {}

    # -- preparation ------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.generate_if_missing and self.synthetic is not None:
            from medens.data.cohort.synthetic import ensure_synthetic_cohort

            ensure_synthetic_cohort(self.manifest_path.parent, **self.synthetic)

    def load_base_models(self) -> dict[str, FrozenBaseModel]:
        """Every configured base model, frozen; a missing one is an error or (on_missing_base=skip) dropped."""
        base = {}
        for modality, cfg in self.base_cfg.items():
            path = cfg.get("ckpt_path")
            if not path or not Path(path).is_file():
                msg = f"{modality} base model: checkpoint {path!r} not found"
                if self.on_missing_base == "error":
                    raise ConfigError(
                        msg + "; train it first or set data.on_missing_base=skip to stack the others"
                    )
                log.warning("%s; stacking without %s", msg, modality)
                continue
            base[modality] = load_frozen_base_model(modality, path)
        if not base:
            raise ConfigError("no base model available: the stacking stage needs at least one")
        return base

    def setup(self, stage: str | None = None) -> None:
        if self.frames:
            return
        modalities = list(self.base_cfg)
        manifest = load_manifest(self.manifest_path, self.targets, modalities)
        self.base = self.load_base_models()
        manifest = self._exclude_seen(manifest)
        feats = cached_base_features(
            manifest, self.manifest_path, self.base, self.cache_dir, self.on_feature_error
        )
        table = manifest[["patient_id", *self.targets]].merge(feats, on="patient_id", how="left")
        self.feature_names = [n for b in self.base.values() for n in b.feature_names]
        self.indicator_names = [missing_column(m) for m in self.base]
        parts = self._split(manifest)
        self.frames = {k: table.iloc[idx].reset_index(drop=True) for k, idx in parts.items()}
        _, self.mean, self.std = standardise(self.frames["train"], self.feature_names)
        for split, frame in self.frames.items():
            self.datasets[split] = TensorDataset(
                torch.from_numpy(self.inputs(frame)), torch.from_numpy(self.labels(frame))
            )
        sizes = {k: len(v) for k, v in self.frames.items()}
        log.info(
            "stacking splits (patients): %s; features: %d + %d indicators",
            sizes,
            len(self.feature_names),
            len(self.indicator_names),
        )
        if min(sizes.values()) == 0:
            raise DataError(f"{self.manifest_path}: too few cases for meta-train/meta-val/test: {sizes}")

    def _exclude_seen(self, manifest: pd.DataFrame) -> pd.DataFrame:
        """Enforce: no case the stacking stage uses was seen by a base model."""
        seen_by: dict[str, set[str]] = {}
        for m, b in self.base.items():
            seen = b.seen_patients()
            if seen is None:
                if self.require_seen_record:
                    raise LeakageError(
                        f"{b.path}: the checkpoint does not record which patients trained it (io_contract.seen_patients), "
                        "so the stacking stage cannot prove it never sees them; retrain with this medens, or set "
                        "data.require_seen_record=false (and make sure yourself)"
                    )
                continue
            seen_by[m] = seen
        if "split" in manifest.columns and manifest["split"].notna().any():
            used = manifest[manifest["split"].isin(["meta", "test"])]
            for m, seen in seen_by.items():
                leaked = sorted(set(used["patient_id"]) & seen)
                if leaked:
                    raise LeakageError(
                        f"{self.manifest_path}: {len(leaked)} meta/test patient(s) were used to train the {m} base model "
                        f"{self.base[m].path} (first: {leaked[:5]}); the meta-learner must only see cases no base model saw"
                    )
            return used.reset_index(drop=True)
        all_seen = set().union(*seen_by.values()) if seen_by else set()
        keep = ~manifest["patient_id"].isin(all_seen)
        log.info(
            "no split column: %d of %d patients were seen by a base model and are left out",
            int((~keep).sum()),
            len(manifest),
        )
        return manifest[keep].reset_index(drop=True)

    def _split(self, manifest: pd.DataFrame) -> dict[str, np.ndarray]:
        patients = manifest["patient_id"].astype(str).tolist()
        if "split" in manifest.columns and manifest["split"].notna().any():
            test = np.flatnonzero(manifest["split"].to_numpy() == "test")
            pool = np.flatnonzero(manifest["split"].to_numpy() == "meta")
        else:
            outer = split_by_patient_list(patients, self.test_fraction, self.seed)
            pool, test = np.asarray(outer["train"]), np.asarray(outer["val"])
        inner = split_by_patient_list([patients[i] for i in pool], self.val_fraction, self.seed)
        return {"train": pool[inner["train"]], "val": pool[inner["val"]], "test": test}

    # -- tensors ----------------------------------------------------------------------------------
    @property
    def num_features(self) -> int:
        return len(self.feature_names) + len(self.indicator_names)

    def inputs(self, frame: pd.DataFrame) -> np.ndarray:
        """Meta-learner input: z-scored base features (0 where missing) then the missing indicators."""
        z, _, _ = standardise(frame, self.feature_names, self.mean, self.std)
        ind = frame[self.indicator_names].to_numpy(dtype=np.float32)
        return np.concatenate([z, ind], axis=1).astype(np.float32)

    def labels(self, frame: pd.DataFrame) -> np.ndarray:
        return frame[self.targets].to_numpy(dtype=np.float32)  # NaN: unknown, masked in the loss

    def modality_slices(self) -> dict[str, tuple[list[int], int]]:
        """Per modality: its feature columns and its indicator column in the input vector."""
        out, start = {}, 0
        for j, (m, b) in enumerate(self.base.items()):
            cols = list(range(start, start + len(b.feature_names)))
            start += len(b.feature_names)
            out[m] = (cols, len(self.feature_names) + j)
        return out

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return make_loader(
            self.datasets[split],
            self.batch_size,
            shuffle=shuffle,
            seed=self.seed,
            trainer=self.trainer,
            drop_last=shuffle,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def split_patient_ids(self, split: str) -> set[str]:
        return set(self.frames[split]["patient_id"].astype(str))

    def io_contract(self) -> dict[str, Any]:
        """Everything needed to feed the meta-learner again: feature order, scaling, base checkpoints."""
        return {
            "modality": "ensemble",
            "targets": list(self.targets),
            "label_names": list(self.targets),
            "feature_names": list(self.feature_names),
            "indicator_names": list(self.indicator_names),
            "feature_mean": [float(v) for v in self.mean] if self.mean is not None else None,
            "feature_std": [float(v) for v in self.std] if self.std is not None else None,
            "base_checkpoints": {
                m: {
                    "path": str(b.path.resolve()),
                    "sha256": b.sha256,
                    "model": b.hyperparameters.get("model", {}).get("name"),
                }
                for m, b in self.base.items()
            },
            "base_io_contracts": {
                m: {k: v for k, v in b.io_contract.items() if k != "seen_patients"}
                for m, b in self.base.items()
            },
            "manifest": str(self.manifest_path.resolve()),
            "split_sizes": {k: len(v) for k, v in self.frames.items()},
            "output": "probability per target (sigmoid of one logit each)",
        }
