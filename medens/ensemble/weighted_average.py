"""Optimal weighted averaging: for a target several base models predict, weights on the simplex.

Each source's raw score (a probability, or a tumour volume) is first put on a common probability
scale by a 1-D logistic fit on the same fit cases (Platt scaling); the ensemble is then
``sum_k w_k p_k`` over the sources present for a case (weights renormalised when one is missing),
with ``w >= 0, sum w = 1``. A case with every source missing gets the fit cases' prevalence (the
no-information probability), so the weighted average scores exactly the patients every other method
scores. Weights maximise AUC (exhaustive grid on the simplex: AUC is a step
function, so gradients do not help) or minimise log-loss (the same grid, refined), by config.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression

from medens.errors import DataError
from medens.metrics.classification import binary_auroc

OBJECTIVES = ("auc", "log_loss")


def simplex_grid(k: int, step: float) -> np.ndarray:
    """Every weight vector on the k-simplex with entries on a `step` grid."""
    n = round(1.0 / step)
    pts = [c for c in itertools.product(range(n + 1), repeat=k - 1) if sum(c) <= n]
    return np.array([[*c, n - sum(c)] for c in pts], dtype=np.float64) / n


def combine(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean of the sources present per case ([n, k], NaN = missing); NaN if none is."""
    present = np.isfinite(probs)
    w = np.where(present, weights[None, :], 0.0)
    total = w.sum(1)
    out = (np.where(present, probs, 0.0) * w).sum(1) / np.where(total > 0, total, 1.0)
    # all weight on missing sources: fall back to the plain mean of what is there
    plain = np.where(present, probs, 0.0).sum(1) / np.maximum(present.sum(1), 1)
    out = np.where(total > 0, out, plain)
    return np.where(present.any(1), out, np.nan)


def _objective(p: np.ndarray, y: np.ndarray, objective: str) -> float:
    ok = np.isfinite(p)
    p, y = p[ok], y[ok]
    if objective == "auc":  # NaN where undefined (fit patients of one class): every weight ties
        auc = binary_auroc(y, p)
        return math.nan if auc is None else auc
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return -float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))  # higher is better


class PlattScaler:
    """Per-source 1-D logistic calibration: raw score -> probability of the target."""

    def __init__(self, coef: float = 1.0, intercept: float = 0.0) -> None:
        self.coef, self.intercept = float(coef), float(intercept)

    @classmethod
    def fit(cls, score: np.ndarray, y: np.ndarray) -> PlattScaler:
        ok = np.isfinite(score)
        if ok.sum() < 4 or len(np.unique(y[ok])) < 2:
            return cls(0.0, float(np.log((y.mean() + 1e-6) / (1 - y.mean() + 1e-6))))
        lr = LogisticRegression(C=100.0).fit(score[ok, None], y[ok])
        return cls(float(lr.coef_[0, 0]), float(lr.intercept_[0]))

    def __call__(self, score: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.coef * score + self.intercept)))


def source_scores(frame: Any, sources: Mapping[str, Sequence[str]]) -> np.ndarray:
    """[n, k] raw score per source: the mean of its listed feature columns (NaN where missing)."""
    cols = [frame[list(names)].to_numpy(dtype=np.float64).mean(1) for names in sources.values()]
    return np.stack(cols, 1)


def fit_weighted_average(
    raw: np.ndarray,
    y: np.ndarray,
    objective: str = "auc",
    step: float = 0.02,
    auc_tolerance: float = 0.005,
    target: str = "target",
) -> dict[str, Any]:
    """Calibrate each source and find simplex weights; returns weights, calibrators and the fit score.

    A target without any label among the fit cases cannot be fitted: that is an error naming it, not a
    NaN calibration with arbitrary weights."""
    if objective not in OBJECTIVES:
        raise ValueError(f"weighted_average.objective must be one of {OBJECTIVES}, got {objective!r}")
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(y)
    if not ok.any():
        raise DataError(
            f"weighted average: target {target!r} has no label on any of the {len(y)} fit patients; "
            "fill that column of the cohort manifest or remove the target from data.targets"
        )
    raw, y = raw[ok], y[ok].astype(int)
    scalers = [PlattScaler.fit(raw[:, j], y) for j in range(raw.shape[1])]
    probs = np.stack([s(raw[:, j]) for j, s in enumerate(scalers)], 1)
    k = probs.shape[1]
    grid = simplex_grid(k, step) if k > 1 else np.ones((1, 1))
    scores = np.array([_objective(combine(probs, w), y, objective) for w in grid])
    if objective == "auc":
        # AUC is a step function: an uninformative source (calibrated to a near constant) can win a
        # grid point by chance. Weights within `auc_tolerance` of the best AUC count as tied and the
        # tie goes to the best log-loss, so weight lands on sources that carry signal. `combine` is NaN
        # for the same cases whatever the weights: the AUC is undefined at every grid point or at none
        undefined = bool(np.isnan(scores).any())
        tied = np.arange(len(grid)) if undefined else np.flatnonzero(scores >= scores.max() - auc_tolerance)
        ll = [_objective(combine(probs, grid[i]), y, "log_loss") for i in tied]
        best = grid[int(tied[int(np.argmax(ll))])]
    else:
        best = grid[int(np.argmax(scores))]
    if objective == "log_loss" and k > 1:  # refine around the grid optimum on a finer local grid
        local = best[None, :] + (simplex_grid(k, step / 4) - 1.0 / k) * step * 2
        local = np.clip(local, 0, None)
        local = local[local.sum(1) > 0]
        local /= local.sum(1, keepdims=True)
        local_scores = np.array([_objective(combine(probs, w), y, objective) for w in local])
        if local_scores.max() > scores.max():
            best = local[int(np.argmax(local_scores))]
    best = best / best.sum()
    return {
        "weights": best,
        "calibration": [{"coef": s.coef, "intercept": s.intercept} for s in scalers],
        "fit_objective_value": float(_objective(combine(probs, best), y, objective)),
        "n_fit": int(len(y)),
        "all_missing_output": float(y.mean()),
    }


def apply_weighted_average(raw: np.ndarray, fitted: Mapping[str, Any]) -> np.ndarray:
    """Ensemble probability per case; a case with every source missing gets ``all_missing_output`` (the
    fit cases' prevalence), so no case is dropped."""
    probs = np.stack(
        [PlattScaler(c["coef"], c["intercept"])(raw[:, j]) for j, c in enumerate(fitted["calibration"])], 1
    )
    out = combine(probs, np.asarray(fitted["weights"], dtype=np.float64))
    fallback = fitted.get("all_missing_output")
    if fallback is not None:
        out = np.where(np.isfinite(out), out, float(fallback))
    return out
