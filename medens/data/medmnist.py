"""MedMNIST 2D `.npz` files (ChestMNIST, PneumoniaMNIST, ...) from a local path; nothing is downloaded.

The files carry their own official train/val/test split (`train_images`, `train_labels`, `val_*`,
`test_*`). ChestMNIST's 14 labels are NIH ChestX-ray14's, in `NIH_LABELS` order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from medens.data.loaders import make_loader
from medens.data.xray import IMAGENET_MEAN, IMAGENET_STD, NIH_LABELS, build_transforms
from medens.errors import DataError

SPLITS = ("train", "val", "test")


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
    for split in SPLITS:
        need = {f"{split}_images", f"{split}_labels"}
        if not need <= keys:
            raise DataError(f"{path}: missing key(s) {sorted(need - keys)}; found {sorted(keys)}")
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        if len(images) != len(labels):
            raise DataError(f"{path}: {split}_images has {len(images)} rows but {split}_labels {len(labels)}")
        out[split] = (images, labels.reshape(len(labels), -1).astype(np.float32))
    return out


class MedMNISTDataset(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, split: str, transform: Any) -> None:
        self.images, self.labels, self.split, self.transform = images, torch.as_tensor(labels), split, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = Image.fromarray(self.images[i]).convert("L")
        case = f"{self.split}_{i}"
        return {"image": self.transform(image), "label": self.labels[i], "case_id": case, "patient_id": case}


class MedMNISTDataModule(pl.LightningDataModule):
    """A MedMNIST 2D file as a LightningDataModule with the X-ray preprocessing."""

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
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.label_names = list(label_names) if label_names else None
        self.image_size, self.channels, self.normalize = image_size, channels, normalize
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.train_augment = list(train_augment or [])
        self.datasets: dict[str, MedMNISTDataset] = {}

    @property
    def labels(self) -> tuple[str, ...]:
        if self.label_names is None:
            raise RuntimeError("call setup() first: label names come from the file")
        return tuple(self.label_names)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        parts = read_medmnist(self.path)
        n_labels = parts["train"][1].shape[1]
        if self.label_names is None:
            self.label_names = list(NIH_LABELS) if n_labels == len(NIH_LABELS) else [f"label_{i}" for i in range(n_labels)]
        if len(self.label_names) != n_labels:
            raise DataError(f"{self.path}: {n_labels} label columns but {len(self.label_names)} label_names given")
        for split, (images, labels) in parts.items():
            tf = build_transforms(
                self.image_size, self.channels, self.normalize, self.train_augment if split == "train" else None
            )
            self.datasets[split] = MedMNISTDataset(images, labels, split, tf)

    def io_contract(self) -> dict[str, Any]:
        return {
            "modality": "xray",
            "source": f"medmnist:{self.path.name}",
            "label_names": list(self.labels) if self.label_names else None,
            "input_shape": [self.channels, self.image_size, self.image_size],
            "preprocessing": {
                "normalize": self.normalize,
                "mean": list(IMAGENET_MEAN[: self.channels]) if self.normalize == "imagenet" else None,
                "std": list(IMAGENET_STD[: self.channels]) if self.normalize == "imagenet" else None,
            },
        }

    def positive_fraction(self) -> torch.Tensor:
        return self.datasets["train"].labels.mean(0)

    def _loader(self, split: str, train: bool) -> DataLoader:
        return make_loader(
            self.datasets[split], self.batch_size if train else self.eval_batch_size, shuffle=train,
            seed=self.seed, trainer=self.trainer, num_workers=self.num_workers, drop_last=train,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
