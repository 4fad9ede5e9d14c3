"""Classification reports: per-class AUC, ROC curves, sensitivity/specificity at thresholds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve  # noqa: E402


def auc_per_class(probs: np.ndarray, targets: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """AUC per label (None where a label has only one class among known targets) and their mean."""
    per_class: dict[str, float | None] = {}
    counts: dict[str, dict[str, int]] = {}
    for c, name in enumerate(names):
        known = ~np.isnan(targets[:, c])
        t, p = targets[known, c], probs[known, c]
        counts[name] = {"positives": int((t == 1).sum()), "negatives": int((t == 0).sum())}
        per_class[name] = float(roc_auc_score(t, p)) if len(np.unique(t)) == 2 else None
    defined = [v for v in per_class.values() if v is not None]
    return {
        "mean_auc": float(np.mean(defined)) if defined else None,
        "n_classes_with_auc": len(defined),
        "auc": per_class,
        "counts": counts,
    }


def plot_roc_curves(
    probs: np.ndarray, targets: np.ndarray, names: Sequence[str], path: Path, title: str = "ROC"
) -> Path:
    """One ROC curve per label with a defined AUC, on one figure."""
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.set_prop_cycle(color=[plt.cm.tab20(i % 20) for i in range(max(len(names), 1))])
    for c, name in enumerate(names):
        known = ~np.isnan(targets[:, c])
        t, p = targets[known, c], probs[known, c]
        if len(np.unique(t)) < 2:
            continue
        fpr, tpr, _ = roc_curve(t, p)
        ax.plot(fpr, tpr, lw=1.3, label=f"{name} ({roc_auc_score(t, p):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pr_curves(
    probs: np.ndarray, targets: np.ndarray, names: Sequence[str], path: Path, title: str = "Precision-recall"
) -> Path:
    """One precision-recall curve per label with positives, on one figure (legend: average precision)."""
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.set_prop_cycle(color=[plt.cm.tab20(i % 20) for i in range(max(len(names), 1))])
    for c, name in enumerate(names):
        known = ~np.isnan(targets[:, c])
        t, p = targets[known, c], probs[known, c]
        if not (t == 1).any():
            continue
        precision, recall, _ = precision_recall_curve(t, p)
        ax.plot(recall, precision, lw=1.3, label=f"{name} (AP {average_precision_score(t, p):.3f})")
    ax.set(xlabel="Recall (sensitivity)", ylabel="Precision (PPV)", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def operating_points(probs: np.ndarray, targets: np.ndarray, thresholds: Sequence[float]) -> list[dict[str, float]]:
    """Sensitivity and specificity of a binary score at each threshold."""
    rows = []
    pos, neg = targets == 1, targets == 0
    for th in thresholds:
        pred = probs >= th
        sens = float((pred & pos).sum() / pos.sum()) if pos.any() else math.nan
        spec = float((~pred & neg).sum() / neg.sum()) if neg.any() else math.nan
        rows.append({"threshold": float(th), "sensitivity": sens, "specificity": spec})
    return rows


def threshold_for_sensitivity(
    probs: np.ndarray, targets: np.ndarray, sensitivity: float = 0.9
) -> dict[str, float]:
    """The highest threshold whose sensitivity (``probs >= t``) reaches ``sensitivity``, and its specificity.

    Highest, so that specificity is as good as the sensitivity target allows; NaN when the scores
    have no positive case.
    """
    probs, targets = np.asarray(probs, dtype=np.float64).ravel(), np.asarray(targets).ravel()
    pos = np.sort(probs[targets == 1])[::-1]
    if pos.size == 0 or not 0 < sensitivity <= 1:
        return {"threshold": math.nan, "sensitivity": math.nan, "specificity": math.nan}
    k = int(math.ceil(sensitivity * pos.size - 1e-9))
    th = float(pos[max(k, 1) - 1])
    (row,) = operating_points(probs, targets, [th])
    return row
