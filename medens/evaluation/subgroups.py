"""Subgroup analysis: metrics with patient-bootstrap intervals per value of a table column.

`subgroups=[Patient Gender,View Position,Patient Age]`: a categorical column gives one group per value;
a numeric one with many values (age) is cut into bands (`subgroup_bands.<column>=[40,60,80]` edges, by
default 18/40/60/80 for an age column and quartiles otherwise). A group with fewer than
`subgroup_min_patients` patients, or without both classes, is reported as too small, never scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medens.errors import ConfigError
from medens.evaluation.classification import save_figure
from medens.evaluation.statistics import PatientBootstrap, classification_intervals

AGE_EDGES = (18, 40, 60, 80)
MAX_CATEGORIES = 12


def _numeric(series: pd.Series) -> pd.Series | None:
    """The column as numbers ('058Y' -> 58) when every present value is one, else None."""
    s = series.dropna()
    if s.empty:
        return None
    num = pd.to_numeric(s.astype(str).str.extract(r"^\s*(-?\d+(?:\.\d+)?)\s*[YyMmDd]?\s*$")[0], errors="coerce")
    if num.isna().any():
        return None
    return pd.to_numeric(series.astype(str).str.extract(r"(-?\d+(?:\.\d+)?)")[0], errors="coerce")


def group_labels(series: pd.Series, column: str, edges: Sequence[float] | None = None) -> pd.Series:
    """Group label per case: the value itself, or a band "[lo, hi)" for a numeric column with many values."""
    num = _numeric(series)
    if num is None or num.nunique() <= MAX_CATEGORIES and edges is None:
        return series.astype("string").fillna("missing")
    if edges is None:
        edges = AGE_EDGES if "age" in column.lower() else tuple(np.unique(np.nanpercentile(num, [25, 50, 75])))
    cuts = [-math.inf, *sorted(float(e) for e in edges), math.inf]

    def name(lo: float, hi: float) -> str:
        f = lambda v: f"{v:g}"  # noqa: E731
        return f"< {f(hi)}" if lo == -math.inf else f">= {f(lo)}" if hi == math.inf else f"[{f(lo)}, {f(hi)})"

    labels = [name(lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)]
    out = pd.cut(num, cuts, right=False, labels=labels).astype("string")
    return out.fillna("missing")


def _order(label: str) -> tuple:
    """Bands in numeric order ("< 18", "[18, 40)", ..., ">= 80"), other values alphabetically, missing last."""
    label = str(label)
    try:
        if label.startswith("< "):
            return (0, float(label[2:]), "")
        if label.startswith("[") and "," in label:
            return (1, float(label[1:].split(",")[0]), "")
        if label.startswith(">= "):
            return (2, float(label[3:]), "")
    except ValueError:
        pass
    return (4 if label == "missing" else 3, 0.0, label)


def check_columns(attrs: pd.DataFrame, columns: Sequence[str], where: str) -> None:
    """Every requested subgroup column exists; else an error listing the columns there are."""
    missing = [c for c in columns if c not in attrs.columns]
    if missing:
        known = ", ".join(map(str, attrs.columns)) or "none (this dataset has no per-case table)"
        raise ConfigError(f"subgroups: column(s) {missing} not in the case table of {where}; columns: {known}")


def _per_group(
    case_ids: Sequence[str],
    patient_ids: Sequence[str],
    attrs: pd.DataFrame,
    columns: Sequence[str],
    where: str,
    bands: Mapping[str, Sequence[float]] | None,
    min_patients: int,
    score: Callable[[np.ndarray, np.ndarray, str], dict[str, Any] | str],
) -> dict[str, Any]:
    """{column: {group: case and patient counts, then `score(mask, patient ids, name)`'s metrics, or
    too small}}: the one walk over the subgroups that the classifiers' and the segmenter's reports share.
    Groups come in report order; `score` returns a reason string for a group it cannot score."""
    columns = [str(c) for c in columns]
    check_columns(attrs, columns, where)
    table = attrs.reindex([str(c) for c in case_ids])
    pids = np.asarray([str(p) for p in patient_ids])
    out: dict[str, Any] = {}
    for col in columns:
        labels = group_labels(table[col].reset_index(drop=True), col, (bands or {}).get(col)).to_numpy()
        groups: dict[str, Any] = {}
        for value in sorted(set(labels.tolist()), key=_order):
            m = labels == value
            n_pat = len(set(pids[m].tolist()))
            entry: dict[str, Any] = {"n_cases": int(m.sum()), "n_patients": n_pat}
            res = (f"fewer than {max(int(min_patients), 2)} patients" if n_pat < max(int(min_patients), 2)
                   else score(m, pids[m], f"subgroup {col}={value}"))  # fmt: skip
            entry.update({"too_small": True, "reason": res} if isinstance(res, str) else {"too_small": False, **res})
            groups[str(value)] = entry
        out[col] = groups
    return out


def subgroup_metrics(
    probs: np.ndarray,
    targets: np.ndarray,
    names: Sequence[str],
    case_ids: Sequence[str],
    patient_ids: Sequence[str],
    attrs: pd.DataFrame,
    columns: Sequence[str],
    where: str,
    bands: Mapping[str, Sequence[float]] | None = None,
    min_patients: int = 10,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """{column: {group: metrics with intervals | too small}} for the cases given."""

    def score(m: np.ndarray, pids: np.ndarray, what: str) -> dict[str, Any] | str:
        t = targets[m]
        if not any(np.nansum(t[:, c] == 1) > 0 and np.nansum(t[:, c] == 0) > 0 for c in range(t.shape[1])):
            return "one class only"
        res = classification_intervals(probs[m], t, names, PatientBootstrap(pids, n_resamples, seed, what=what),
                                       thresholds=())  # fmt: skip
        return {"mean_auc": res["mean_auc"], "auc": {k: v["auc"] for k, v in res["per_output"].items()}}

    return _per_group(case_ids, patient_ids, attrs, columns, where, bands, min_patients, score)


def plot_forest(subgroups: Mapping[str, Any], overall: Mapping[str, Any] | None, path: Path) -> Path | None:
    """Forest plot of mean AUC [95% CI] per subgroup (too-small groups listed without a point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{col}: {g}", e) for col, groups in subgroups.items() for g, e in groups.items()]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.42 * len(rows) + 1.4))
    for i, (_label, e) in enumerate(rows):
        y = len(rows) - 1 - i
        r = e.get("mean_auc") or {}
        if not e.get("too_small") and r.get("value") is not None:
            lo, hi = r.get("ci_low"), r.get("ci_high")
            if lo is not None and hi is not None:
                ax.plot([lo, hi], [y, y], "k-", lw=1.2)
            ax.plot([r["value"]], [y], "s", color="tab:blue", ms=6)
        else:
            ax.text(0.5, y, "too small", va="center", ha="center", fontsize=8, color="grey")
    if overall and overall.get("value") is not None:
        ax.axvline(overall["value"], color="tab:red", ls="--", lw=0.9, label="all cases")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{lab} (n={e['n_patients']})" for lab, e in reversed(rows)], fontsize=8)
    ax.set(xlim=(0, 1), xlabel="mean AUC [95% CI]", title="Subgroups")
    return save_figure(fig, path, dpi=110)


def segmentation_subgroup_metrics(
    values: Mapping[str, np.ndarray],
    case_ids: Sequence[str],
    patient_ids: Sequence[str],
    attrs: pd.DataFrame,
    columns: Sequence[str],
    where: str,
    bands: Mapping[str, Sequence[float]] | None = None,
    min_patients: int = 10,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """{column: {group: mean of each per-case value (Dice per region, HD95) with a patient-bootstrap
    interval | too small}} over the labelled cases given; the same grouping and minimum group size rule
    as the classifiers' `subgroup_metrics`."""
    from medens.evaluation.statistics import mean_intervals

    def score(m: np.ndarray, pids: np.ndarray, what: str) -> dict[str, Any]:
        boot = PatientBootstrap(pids, n_resamples, seed, level, what=what)
        return {"metrics": mean_intervals({k: np.asarray(v)[m] for k, v in values.items()}, boot)}

    return _per_group(case_ids, patient_ids, attrs, columns, where, bands, min_patients, score)
