"""What every CT reader (:mod:`medens.data.ct.readers`) shares: the bad-input policy, config paths, CSVs."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medens.errors import ConfigError, DataError

log = logging.getLogger(__name__)

COORD_COLUMNS = ("coordX", "coordY", "coordZ")


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


def plain_cell(v: Any) -> Any:
    """CSV cell -> JSON-safe value (numpy scalars to Python, NaN kept as float NaN)."""
    if isinstance(v, np.generic):
        v = v.item()
    return v
