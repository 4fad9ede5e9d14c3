"""Torch dataset over cached CT patches (or NoduleMNIST3D arrays); loaders come from medens.data.loaders."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medens.data.ct.labels import NoduleRecord


class CTPatchDataset(Dataset):
    """Items ``{"image": [C,P,P,P] float32, "label", "case_id", "patient_id", "diameter_mm"}``.

    ``patches`` is either the path of the cache's ``patches.npy`` (memory-mapped lazily, once per
    worker process, so later epochs never touch the scans) or an in-memory array
    (NoduleMNIST3D: N x D x H x W, scaled by ``scale`` and resized to ``resize_to``).
    """

    def __init__(
        self,
        patches: str | Path | np.ndarray,
        rows: Sequence[int],
        records: Sequence[NoduleRecord],
        labels: Sequence[float],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        scale: float = 1.0,
        resize_to: int | None = None,
    ) -> None:
        if not len(rows) == len(records) == len(labels):
            raise ValueError("rows, records and labels must have the same length")
        self._source = patches
        self._array: np.ndarray | None = patches if isinstance(patches, np.ndarray) else None
        self.rows = [int(r) for r in rows]
        self.records = list(records)
        self.labels = [float(y) for y in labels]
        self.transform = transform
        self.scale = float(scale)
        self.resize_to = resize_to

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if not isinstance(self._source, np.ndarray):
            state["_array"] = None  # re-opened as a memmap in the worker, never pickled whole
        return state

    def set_random_state(self, seed: int) -> None:
        """Seed the augmentation's own RNGs (MONAI ``Randomizable``) with an item's seed; medens' loaders
        call this per item, so augmentation follows (seed, epoch, index) only."""
        reseed = getattr(self.transform, "set_random_state", None)
        if callable(reseed):
            reseed(seed)

    def _data(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self._source, mmap_mode="r")
        return self._array

    def patch(self, i: int) -> torch.Tensor:
        """The un-augmented patch of item i, [C, P, P, P] float32."""
        x = torch.from_numpy(np.array(self._data()[self.rows[i]], dtype=np.float32))
        if x.ndim == 3:
            x = x[None]
        if self.scale != 1.0:
            x = x * self.scale
        if self.resize_to is not None and tuple(x.shape[1:]) != (self.resize_to,) * 3:
            x = F.interpolate(x[None], size=(self.resize_to,) * 3, mode="trilinear", align_corners=False)[0]
        return x

    def __getitem__(self, i: int) -> dict[str, Any]:
        x = self.patch(i)
        if self.transform is not None:
            x = self.transform(x)
        rec = self.records[i]
        return {
            "image": x.float().contiguous(),
            "label": torch.tensor(self.labels[i], dtype=torch.float32),
            "case_id": rec.case_id,
            "patient_id": rec.patient_id,
            "diameter_mm": float(rec.diameter_mm) if not math.isnan(rec.diameter_mm) else math.nan,
        }
