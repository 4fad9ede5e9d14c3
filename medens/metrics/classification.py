"""Classification metrics: AUROC per label and the operating point, from torchmetrics.

Convention (the one used everywhere medens reports an AUC: the LightningModules' logged ``*/auc``, the
evaluation reports, cross-validation and its baselines, the ensemble's meta-learner, weighted average and
report; only the bootstrap and DeLong code of `medens.evaluation.statistics` computes AUCs itself, vectorised
over resamples, and it returns NaN where this convention does):

- **Unknown labels** (NaN targets, e.g. a label a dataset does not have) are masked out per label; they
  count neither as positive nor as negative.
- **A label without a positive or without a negative** among its known targets has no AUC: it is NaN in
  tensors and logs, ``null`` in JSON reports, and it is left out of the mean AUC (whose denominator is
  the number of labels that have one). A mean over no defined label is NaN / ``null``.
- The operating point uses ``score >= threshold`` as positive. The threshold for a target sensitivity is
  the highest one whose sensitivity reaches it (so specificity is as high as that target allows); NaN
  without positives.

`LabelROC` is a torchmetrics `Metric` over torchmetrics' exact `binary_roc` (states concatenated across DDP
ranks by torchmetrics) with the counts needed to apply this convention; the functions below give the same
numbers on plain arrays for evaluation code.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_roc
from torchmetrics.utilities import dim_zero_cat

#: Target value torchmetrics is told to ignore (NaN targets are mapped to it).
IGNORE_INDEX = -1


def _as_2d(x: Any) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x))  # a copy: inputs may be read-only
    return t.reshape(t.shape[0], -1) if t.ndim != 2 else t


def mean_defined(values: Sequence[float]) -> float:
    """Mean over the finite values (labels with an AUC); NaN when there is none."""
    defined = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(defined) / len(defined) if defined else math.nan


def _exact_roc(scores: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchmetrics' `binary_roc` with thresholds in the scores' own units, whatever their range.

    torchmetrics applies a sigmoid to scores outside [0, 1] (logits, or a baseline such as a diameter in mm):
    the curve keeps its order, but its thresholds come back in sigmoid space and large scores saturate into
    ties. Such scores go in as their ranks scaled into (0, 1] and the thresholds are mapped back; the extra
    first threshold (no case positive) becomes +inf.
    """
    if scores.numel() == 0 or bool(((scores >= 0) & (scores <= 1)).all()):
        return binary_roc(scores, target, thresholds=None)
    values, rank = torch.unique(scores.double(), sorted=True, return_inverse=True)
    m = values.numel()
    fpr, tpr, thr = binary_roc((rank.double() + 1) / m, target, thresholds=None)
    index = torch.round(thr.double() * m).long().clamp(1, m) - 1
    thr = values[index]
    thr[0] = math.inf
    return fpr, tpr, thr


class LabelROC(Metric):
    """ROC per label over the known targets of an epoch; `auroc()` and `operating_point()` read it.

    Feed probabilities [N, L] (or [N] for one label) and targets with NaN for unknown labels. The states
    are concatenated (scores, targets) and summed (positive/negative counts per label) across DDP ranks by
    torchmetrics, so every rank computes the same numbers without hand-written gathering. The curves are
    torchmetrics' exact `binary_roc` (no binning); rates are taken back to counts so that the AUC and the
    operating point are exact in float64.
    """

    full_state_update = False

    def __init__(self, num_labels: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_labels = int(num_labels)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("positives", default=torch.zeros(self.num_labels, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("negatives", default=torch.zeros(self.num_labels, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: scores [N, L] or [N], targets of the same numel (1, 0, NaN = unknown)."""
        preds = preds.detach().reshape(preds.shape[0], -1)
        preds = preds if preds.is_floating_point() else preds.float()
        if preds.shape[1] != self.num_labels:
            raise ValueError(f"LabelROC({self.num_labels} labels) got scores of shape {tuple(preds.shape)}")
        target = target.detach().to(preds.dtype).reshape(preds.shape)
        known = ~torch.isnan(target)
        target = torch.where(known, target, torch.full_like(target, IGNORE_INDEX)).long()
        self.positives += (target == 1).sum(0).to(self.positives.device)
        self.negatives += (target == 0).sum(0).to(self.negatives.device)
        self.preds.append(preds)
        self.target.append(target)

    def compute(self) -> dict[str, Any]:
        """``curves``: (fpr, tpr, thresholds descending) per label over its known targets; ``positives`` and
        ``negatives``: counts per label. Under DDP the states of all ranks (torchmetrics syncs them here)."""
        preds, target = dim_zero_cat(self.preds).cpu(), dim_zero_cat(self.target).cpu()
        curves = []
        with warnings.catch_warnings():  # "no positive/negative samples": the convention's business
            warnings.filterwarnings("ignore", message=".*(positive|negative) samples in targets.*")
            for i in range(self.num_labels):
                keep = target[:, i] != IGNORE_INDEX
                curves.append(_exact_roc(preds[keep, i], target[keep, i]))
        return {"curves": curves, "positives": self.positives.cpu().clone(), "negatives": self.negatives.cpu().clone()}

    def _state(self) -> dict[str, Any]:
        state = self.compute()  # torchmetrics squeezes one-element tensors: counts back to [L]
        return {**state, "positives": state["positives"].reshape(-1), "negatives": state["negatives"].reshape(-1)}

    def auroc(self) -> torch.Tensor:
        """AUROC per label [L] (float64), NaN where undefined (see the module docstring)."""
        state = self._state()
        out = torch.full((self.num_labels,), math.nan, dtype=torch.float64)
        for i, (fpr, tpr, _) in enumerate(state["curves"]):
            npos, nneg = int(state["positives"][i]), int(state["negatives"][i])
            if npos and nneg:  # defined: at least one positive and one negative known target
                tps, fps = torch.round(tpr.double() * npos), torch.round(fpr.double() * nneg)
                out[i] = torch.trapezoid(tps / npos, fps / nneg)
        return out

    def operating_point(self, threshold: float, target_sensitivity: float, label: int = 0) -> dict[str, float]:
        """Sensitivity/specificity at `threshold`, and the highest threshold reaching `target_sensitivity`
        with its sensitivity and specificity, for one label (NaN where there is no positive/negative)."""
        state = self._state()
        npos, nneg = int(state["positives"][label]), int(state["negatives"][label])
        if npos + nneg == 0:
            return dict.fromkeys(("sensitivity", "specificity", "threshold_at_target",
                                  "sensitivity_at_target", "specificity_at_target"), math.nan)  # fmt: skip
        fpr, tpr, thr = (v.cpu().double() for v in state["curves"][label])
        return roc_operating_point(tpr, fpr, thr, npos, nneg, threshold, target_sensitivity)


def roc_operating_point(
    tpr: torch.Tensor, fpr: torch.Tensor, thr: torch.Tensor, npos: int, nneg: int,
    threshold: float, target_sensitivity: float,
) -> dict[str, float]:
    """The operating point from an exact ROC curve (thresholds descending, ``score >= thr`` positive)."""
    tps = torch.round(tpr * npos) if npos else torch.zeros_like(tpr)
    fps = torch.round(fpr * nneg) if nneg else torch.zeros_like(fpr)

    def rates(i: int | None) -> tuple[float, float]:
        tp, fp = (0.0, 0.0) if i is None else (float(tps[i]), float(fps[i]))
        return (tp / npos if npos else math.nan), ((nneg - fp) / nneg if nneg else math.nan)

    at = torch.nonzero(thr >= threshold).flatten()
    sens, spec = rates(int(at[-1]) if at.numel() else None)
    out = {"sensitivity": sens, "specificity": spec}
    if npos == 0 or not 0 < target_sensitivity <= 1:
        return {**out, "threshold_at_target": math.nan, "sensitivity_at_target": math.nan,
                "specificity_at_target": math.nan}  # fmt: skip
    k = max(int(math.ceil(target_sensitivity * npos - 1e-9)), 1)
    i = int(torch.nonzero(tps >= k).flatten()[0])
    s, p = rates(i)
    return {**out, "threshold_at_target": float(thr[i]), "sensitivity_at_target": s, "specificity_at_target": p}


def per_label_auroc(probs: Any, targets: Any) -> list[float]:
    """AUROC per column of `probs` [N, L] against `targets` [N, L] (NaN = unknown), NaN where undefined."""
    p, t = _as_2d(probs).double(), _as_2d(targets).double()
    metric = LabelROC(num_labels=p.shape[1])
    metric.update(p, t)
    return [float(v) for v in metric.auroc()]


def binary_auroc(targets: Any, scores: Any) -> float | None:
    """AUROC of one score [N] by the convention above, for reports: cases whose target or score is not
    finite (unknown label, missing modality) are left out; None (JSON ``null``) where undefined."""
    t, s = np.asarray(targets, dtype=np.float64).reshape(-1), np.asarray(scores, dtype=np.float64).reshape(-1)
    known = np.isfinite(t) & np.isfinite(s)
    auc = per_label_auroc(s[known, None], t[known, None])[0] if known.any() else math.nan
    return None if math.isnan(auc) else auc


def operating_point(probs: Any, targets: Any, threshold: float, target_sensitivity: float) -> dict[str, float]:
    """`LabelROC.operating_point` for one binary score [N] (targets NaN = unknown, masked)."""
    metric = LabelROC(num_labels=1)
    metric.update(_as_2d(torch.from_numpy(np.array(probs, dtype=np.float64)).reshape(-1)),
                  _as_2d(torch.from_numpy(np.array(targets, dtype=np.float64)).reshape(-1)))  # fmt: skip
    return metric.operating_point(threshold, target_sensitivity)
