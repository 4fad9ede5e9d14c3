"""MedMNIST 2D `.npz` files (ChestMNIST, PneumoniaMNIST, ...) from a local path; nothing is downloaded.

The reader is `medens.data.xray_readers.MedMNISTReader` (the files carry their own official train/val/test
split; ChestMNIST's 14 labels are NIH ChestX-ray14's, in `NIH_LABELS` order), and the datamodule is the
X-ray one (`conf/data/chestmnist.yaml`: `XRayDataModule` with `source._target_: ...MedMNISTReader`).
`MedMNISTDataModule` stays as the short form that checkpoints recorded before readers existed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from medens.data.xray import XRayDataModule
from medens.data.xray_readers import MEDMNIST_SPLITS as SPLITS
from medens.data.xray_readers import MedMNISTReader, read_medmnist

__all__ = ["SPLITS", "MedMNISTDataModule", "read_medmnist"]


class MedMNISTDataModule(XRayDataModule):
    """A MedMNIST 2D file through the X-ray datamodule (official split, no image cache: already decoded)."""

    def __init__(
        self,
        path: str,
        label_names: Sequence[str] | None = None,
        image_size: int = 64,
        channels: int = 3,
        normalize: str = "imagenet",
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        train_augment: Sequence[Any] | None = None,
        augment_on: Literal["auto", "device", "loader"] = "loader",
    ) -> None:
        self.path = Path(path)
        super().__init__(
            root=str(self.path.parent), source=MedMNISTReader(path=str(self.path), label_names=label_names),
            image_size=image_size, channels=channels, normalize=normalize, batch_size=batch_size,
            eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed, train_augment=train_augment,
            cache=False, augment_on=augment_on,
        )  # fmt: skip
