"""Base-model outputs per cohort case, computed once and cached on disk.

The cache key covers the manifest file, every base checkpoint (SHA-256) and the feature code
version, so a retrained base model or an edited manifest never reuses stale features.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medens.data.cohort.manifest import MODALITY_COLUMNS
from medens.ensemble.base_models import FrozenBaseModel
from medens.errors import DataError
from medens.utils.atomic import atomic_path
from medens.utils.hashing import sha256_file, sha256_json, sha256_text

log = logging.getLogger(__name__)

FEATURE_VERSION = 1


def missing_column(modality: str) -> str:
    return f"missing.{modality}"


def features_cache_key(manifest_path: Path, base: Mapping[str, FrozenBaseModel], rows: Sequence[str]) -> str:
    payload = {
        "version": FEATURE_VERSION,
        "manifest": sha256_file(manifest_path),
        "base": {m: b.sha256 for m, b in sorted(base.items())},
        "rows": sha256_text("\n".join(rows)),
    }
    return sha256_json(payload)[:20]


def compute_base_features(
    manifest: pd.DataFrame,
    base: Mapping[str, FrozenBaseModel],
    on_error: str = "error",
) -> pd.DataFrame:
    """One row per patient: each base model's named features (NaN where the modality is absent) and a
    `missing.<modality>` indicator. `on_error='missing'` turns an unreadable file into a missing modality
    (logged); 'error' stops with the file named."""
    out = []
    for _, row in manifest.iterrows():
        rec: dict[str, float | str] = {"patient_id": str(row["patient_id"])}
        for modality, model in base.items():
            value = row.get(MODALITY_COLUMNS[modality])
            feats = None
            if value is not None and not pd.isna(value):
                try:
                    feats = model.features(row)
                except DataError as exc:
                    if on_error != "missing":
                        raise DataError(f"patient {row['patient_id']}, {modality}: {exc}") from exc
                    log.warning(
                        "patient %s: %s unreadable, treated as missing: %s", row["patient_id"], modality, exc
                    )
            rec[missing_column(modality)] = 1.0 if feats is None else 0.0
            for j, name in enumerate(model.feature_names):
                rec[name] = float("nan") if feats is None else float(feats[j])
        out.append(rec)
    return pd.DataFrame(out)


def cached_base_features(
    manifest: pd.DataFrame,
    manifest_path: Path,
    base: Mapping[str, FrozenBaseModel],
    cache_dir: Path | None,
    on_error: str = "error",
) -> pd.DataFrame:
    """`compute_base_features`, read from / written to `cache_dir/<key>.csv` (atomic write)."""
    if cache_dir is None:
        return compute_base_features(manifest, base, on_error)
    key = features_cache_key(manifest_path, base, [str(p) for p in manifest["patient_id"]])
    path = Path(cache_dir) / f"base_features_{key}.csv"
    from medens.utils.locking import owned_lock

    if path.is_file():
        log.info("base-model features from cache %s", path)
        return pd.read_csv(path, dtype={"patient_id": str})
    with owned_lock(path.parent / f".{path.stem}.lock", "ensemble feature cache"):
        if path.is_file():  # computed by another process while we waited
            return pd.read_csv(path, dtype={"patient_id": str})
        log.info("computing base-model features for %d cases (%s)", len(manifest), ", ".join(base))
        df = compute_base_features(manifest, base, on_error)
        with atomic_path(path) as tmp:
            df.to_csv(tmp, index=False)
    return df


def standardise(
    frame: pd.DataFrame, names: Sequence[str], mean: np.ndarray | None = None, std: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z-scored features with NaN -> 0, mean, std); mean/std from `frame` unless given (the train split's)."""
    x = frame[list(names)].to_numpy(dtype=np.float64)
    if mean is None or std is None:
        mean = np.nanmean(x, axis=0)
        std = np.nanstd(x, axis=0)
        mean = np.where(np.isfinite(mean), mean, 0.0)
        std = np.where(np.isfinite(std) & (std > 1e-8), std, 1.0)
    z = (x - mean) / std
    return np.where(np.isfinite(z), z, 0.0).astype(np.float32), mean, std
