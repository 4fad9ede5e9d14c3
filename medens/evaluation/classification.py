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
import torch  # noqa: E402
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve  # noqa: E402

from medens.metrics.classification import LabelROC, mean_defined, operating_point, per_label_auroc  # noqa: E402
from medens.utils.atomic import atomic_path  # noqa: E402


def auc_per_class(probs: np.ndarray, targets: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """AUC per label and their mean, by the convention of `medens.metrics.classification` (unknown
    targets masked; a label without both classes is None and left out of the mean)."""
    aucs = per_label_auroc(probs, targets)
    per_class = {name: (None if math.isnan(a) else a) for name, a in zip(names, aucs, strict=True)}
    counts = {name: {"positives": int((targets[:, c] == 1).sum()), "negatives": int((targets[:, c] == 0).sum())}
              for c, name in enumerate(names)}  # fmt: skip
    mean = mean_defined(aucs)
    return {
        "mean_auc": None if math.isnan(mean) else mean,
        "n_classes_with_auc": sum(a is not None for a in per_class.values()),
        "auc": per_class,
        "counts": counts,
    }


def save_figure(fig: Any, path: str | Path, dpi: int = 120, tight: bool = True, **savefig: Any) -> Path:
    """Lay out (unless the caller did), write atomically (creating the folder) and close a matplotlib
    figure: every report plot ends so."""
    path = Path(path)
    if tight:
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png", **savefig)
    plt.close(fig)
    return path


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
        ax.plot(fpr, tpr, lw=1.3, label=f"{name} ({per_label_auroc(p, t)[0]:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


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
    return save_figure(fig, path)


def operating_points(probs: np.ndarray, targets: np.ndarray, thresholds: Sequence[float]) -> list[dict[str, float]]:
    """Sensitivity and specificity of a binary score at each threshold (``score >= threshold`` positive)."""
    metric = LabelROC(num_labels=1)
    metric.update(torch.from_numpy(np.array(probs, dtype=np.float64).ravel()),
                  torch.from_numpy(np.array(targets, dtype=np.float64).ravel()))  # fmt: skip
    rows = []
    for th in thresholds:
        op = metric.operating_point(float(th), 1.0)
        rows.append({"threshold": float(th), "sensitivity": op["sensitivity"], "specificity": op["specificity"]})
    return rows


def threshold_for_sensitivity(
    probs: np.ndarray, targets: np.ndarray, sensitivity: float = 0.9
) -> dict[str, float]:
    """The highest threshold whose sensitivity (``probs >= t``) reaches ``sensitivity``, and its specificity.

    Highest, so that specificity is as good as the sensitivity target allows; NaN when the scores
    have no positive case.
    """
    op = operating_point(probs, targets, 0.5, sensitivity)
    if math.isnan(op["threshold_at_target"]):
        return {"threshold": math.nan, "sensitivity": math.nan, "specificity": math.nan}
    return {"threshold": op["threshold_at_target"], "sensitivity": op["sensitivity_at_target"],
            "specificity": op["specificity_at_target"]}  # fmt: skip
