"""Trivial baselines a model must beat on the same held-out cases (issue 16).

- X-ray: a logistic regression per finding on the image downsampled to 32x32 pixels (standardised),
  its regularisation chosen on the fold's inner validation patients.
- MRI: the z-scored FLAIR thresholded inside the brain (whole tumour), the threshold chosen on the
  fold's training cases.
- CT: the nodule diameter as the score (a per-case column, see `medens.evaluation.cross_validation`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from medens.errors import ConfigError, DataError
from medens.metrics.classification import mean_defined, per_label_auroc
from medens.metrics.segmentation import counted_dice


def downsample_pixels(images: np.ndarray, size: int = 32) -> np.ndarray:
    """[N, H, W] greyscale -> [N, size*size] by area averaging (the baseline's whole feature set)."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 3:
        raise DataError(f"pixel baseline: images must be [N, H, W], got shape {x.shape}")
    t = torch.from_numpy(x)[:, None]
    small = F.interpolate(t, size=(int(size), int(size)), mode="area")
    return small.reshape(len(x), -1).numpy()


def mean_auc(y: np.ndarray, scores: np.ndarray, columns: Sequence[int] | None = None) -> float | None:
    """Mean AUC over the label columns that have one (`medens.metrics.classification`'s convention);
    None when none has."""
    cols = list(range(np.shape(y)[1]) if columns is None else columns)
    mean = mean_defined(per_label_auroc(np.asarray(scores)[:, cols], np.asarray(y)[:, cols]))
    return None if math.isnan(mean) else mean


class PixelLogisticRegression:
    """One L2 logistic regression per label on standardised 32x32 pixels (sklearn, lbfgs).

    A label with a single class in the training cases scores every case with its training prevalence.
    """

    def __init__(self, size: int = 32, c: float = 0.01, max_iter: int = 500) -> None:
        if c <= 0:
            raise ConfigError(f"pixel baseline: C must be > 0, got {c}")
        self.size, self.c, self.max_iter = int(size), float(c), int(max_iter)
        self.models: list[LogisticRegression | float] = []

    def fit(self, images: np.ndarray, y: np.ndarray) -> PixelLogisticRegression:
        x = downsample_pixels(images, self.size)
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6
        x = (x - self.mean) / self.std
        y = np.asarray(y)
        self.models = []
        for j in range(y.shape[1]):
            if len(np.unique(y[:, j])) < 2:
                self.models.append(float(y[:, j].mean()))
                continue
            m = LogisticRegression(C=self.c, max_iter=self.max_iter, class_weight="balanced")
            self.models.append(m.fit(x, y[:, j]))
        return self

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """[N, labels] probabilities."""
        if not self.models:
            raise RuntimeError("PixelLogisticRegression.predict_proba before fit")
        x = (downsample_pixels(images, self.size) - self.mean) / self.std
        out = np.empty((len(x), len(self.models)), dtype=np.float64)
        for j, m in enumerate(self.models):
            out[:, j] = m if isinstance(m, float) else m.predict_proba(x)[:, 1]
        return out


def fit_pixel_baseline(
    train_images: np.ndarray,
    train_y: np.ndarray,
    val_images: np.ndarray,
    val_y: np.ndarray,
    c_grid: Sequence[float] = (0.001, 0.01, 0.1, 1.0),
    size: int = 32,
) -> tuple[PixelLogisticRegression, dict[str, float | None]]:
    """Choose C on the inner validation cases (mean AUC), refit on train + inner validation."""
    scores: dict[str, float | None] = {}
    for c in c_grid:
        m = PixelLogisticRegression(size, c).fit(train_images, train_y)
        scores[str(c)] = mean_auc(val_y, m.predict_proba(val_images))
    valid = {k: v for k, v in scores.items() if v is not None}
    best = float(max(valid, key=lambda k: valid[k])) if valid else float(c_grid[0])
    final = PixelLogisticRegression(size, best).fit(
        np.concatenate([train_images, val_images]), np.concatenate([train_y, val_y])
    )
    return final, scores


def flair_threshold_segment(flair: np.ndarray, brain: np.ndarray, threshold: float) -> np.ndarray:
    """Whole tumour = brain voxels whose z-scored FLAIR exceeds ``threshold``."""
    return (np.asarray(flair) > float(threshold)) & np.asarray(brain, bool)


def choose_flair_threshold(
    flairs: Sequence[np.ndarray],
    brains: Sequence[np.ndarray],
    whole_tumours: Sequence[np.ndarray],
    grid: Sequence[float] = tuple(np.round(np.arange(0.5, 3.01, 0.1), 2)),
) -> tuple[float, dict[str, float]]:
    """The threshold of ``grid`` with the best mean whole-tumour Dice over the (training) cases."""
    if not flairs or not len(flairs) == len(brains) == len(whole_tumours):
        raise DataError(
            f"FLAIR baseline: need equally many flair/brain/truth volumes, got "
            f"{len(flairs)}/{len(brains)}/{len(whole_tumours)}"
        )
    table = {
        f"{t:.2f}": float(np.mean([counted_dice(flair_threshold_segment(f, b, t), w)
                                   for f, b, w in zip(flairs, brains, whole_tumours, strict=True)]))
        for t in grid
    }  # fmt: skip
    best = max(table, key=lambda k: table[k])
    return float(best), table
