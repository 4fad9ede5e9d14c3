"""Uncertainty for every reported metric: patient bootstrap intervals, DeLong's test, paired comparisons.

Why patients: images of one patient (X-ray), nodules of one patient (CT) and follow-up scans are not
independent, so intervals that resample cases are too narrow. A resample draws ``n_patients``
patients with replacement and keeps all their cases; a case drawn twice counts twice.

Resamples are reproducible and documented so that anyone can recompute them: patients are the sorted
unique ids, ``draws = numpy.random.default_rng(seed).integers(0, n_patients, (n_resamples,
n_patients))``, and resample ``b`` is the concatenation of the cases of patients ``draws[b]``.
Metrics are computed from per-case weights (how often each case was drawn), which is exactly the
metric of the concatenated resample but vectorised over all resamples at once. The interval is the
percentile interval of the resamples where the metric is defined (e.g. both classes present);
resamples where it is not are counted in ``n_undefined``.

DeLong's test is the fast algorithm of Sun & Xu (2014, IEEE Signal Processing Letters 21:1389),
treating cases as independent (the paired bootstrap beside it is the patient-level answer).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sps

from medens.errors import DataError

DEFAULT_N_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95
METHOD = "percentile bootstrap over patients (all cases of a drawn patient kept)"

WeightedStat = Callable[[np.ndarray], np.ndarray]  # weights [m, n] -> statistic [m]


# ----------------------------------------------------------------------------- weighted metrics
def _ordered_groups(scores: np.ndarray, descending: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Case order by score and the index of each case's tie group in that order."""
    order = np.argsort(-scores if descending else scores, kind="mergesort")
    s = scores[order]
    new = np.r_[True, s[1:] != s[:-1]]
    return order, np.cumsum(new) - 1


def _group_sums(w: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum the columns of w [m, n] (already ordered, so tie groups are contiguous) -> [m, n_groups]."""
    if n_groups == 0:
        return np.zeros((w.shape[0], 0))
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    return np.add.reduceat(w, starts, axis=1)


def weighted_auc(y: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC (ties count one half) of each weight row; NaN where a class has no weight.

    ``weights`` [m, n] of integer draw counts gives the AUC of each resampled case list.
    """
    y = np.asarray(y, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order, group = _ordered_groups(score)
    k = int(group[-1]) + 1 if len(group) else 0
    wo, yo = w[:, order], y[order]
    pos = _group_sums(wo * yo, group, k)
    neg = _group_sums(wo * ~yo, group, k)
    neg_below = np.cumsum(neg, axis=1) - neg
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    num = (pos * (neg_below + 0.5 * neg)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), num / (n_pos * n_neg), np.nan)


def weighted_average_precision(y: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average precision (sklearn's definition: sum over thresholds of recall step x precision)."""
    y = np.asarray(y, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order, group = _ordered_groups(score, descending=True)
    k = int(group[-1]) + 1 if len(group) else 0
    wo, yo = w[:, order], y[order]
    tp = np.cumsum(_group_sums(wo * yo, group, k), axis=1)
    fp = np.cumsum(_group_sums(wo * ~yo, group, k), axis=1)
    n_pos = tp[:, -1:] if k else np.zeros((w.shape[0], 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = tp / n_pos
        step = np.diff(np.concatenate([np.zeros((w.shape[0], 1)), recall], axis=1), axis=1)
        ap = (step * precision).sum(1)
    return np.where(n_pos[:, 0] > 0, ap, np.nan)


def weighted_rate(hit: np.ndarray, among: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted share of ``hit`` among the cases where ``among`` (e.g. sensitivity: predicted positive
    among the positives); NaN where ``among`` has no weight."""
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    among = np.asarray(among, dtype=bool)
    den = (w * among).sum(1)
    num = (w * (among & np.asarray(hit, dtype=bool))).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean of per-case values, ignoring NaN values (e.g. an undefined HD95)."""
    v = np.asarray(values, dtype=np.float64)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    ok = np.isfinite(v)
    den = (w * ok).sum(1)
    num = (w * np.where(ok, v, 0.0)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


# ----------------------------------------------------------------------------- the bootstrap
@dataclass
class PatientBootstrap:
    """Patient-level resamples of one list of cases, shared by every metric (and both models of a
    paired comparison) so that intervals are computed on identical resamples."""

    patient_ids: Sequence[Any]
    n_resamples: int = DEFAULT_N_RESAMPLES
    seed: int = 0
    level: float = DEFAULT_LEVEL
    what: str = "cases"
    patients: np.ndarray = field(init=False)
    case_patient: np.ndarray = field(init=False)
    draws: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        ids = np.asarray([str(p) for p in self.patient_ids])
        self.patients, self.case_patient = np.unique(ids, return_inverse=True)
        if len(self.patients) < 2:
            raise DataError(
                f"bootstrap over {self.what}: needs at least two patients, got {len(self.patients)} "
                f"({len(ids)} case(s)); a confidence interval cannot be estimated"
            )
        if int(self.n_resamples) < 1:
            raise DataError(f"bootstrap: n_resamples must be >= 1, got {self.n_resamples}")
        if not 0 < float(self.level) < 1:
            raise DataError(f"bootstrap: level must be in (0, 1), got {self.level}")
        rng = np.random.default_rng(int(self.seed))
        p = len(self.patients)
        self.draws = rng.integers(0, p, size=(int(self.n_resamples), p))

    @property
    def n_cases(self) -> int:
        return int(len(self.case_patient))

    def case_weights(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """[len(rows), n_cases] draw count of each case in resamples ``rows``."""
        d = self.draws[rows]
        p = len(self.patients)
        flat = (np.arange(d.shape[0])[:, None] * p + d).ravel()
        counts = np.bincount(flat, minlength=d.shape[0] * p).reshape(d.shape[0], p).astype(np.float64)
        return counts[:, self.case_patient]

    def replicates(self, stat: WeightedStat, mask: np.ndarray | None = None) -> np.ndarray:
        """The statistic on every resample ([n_resamples], NaN where undefined). ``mask`` restricts the
        statistic to some cases (e.g. known labels) while keeping the patient draws."""
        chunk = max(1, int(4_000_000 // max(self.n_cases, 1)))
        out = []
        for start in range(0, int(self.n_resamples), chunk):
            w = self.case_weights(slice(start, start + chunk))
            out.append(stat(w if mask is None else w[:, mask]))
        return np.concatenate(out)

    def interval(self, stat: WeightedStat, mask: np.ndarray | None = None) -> dict[str, Any]:
        """Point estimate (all cases once), percentile interval and the bookkeeping a reader needs."""
        n = self.n_cases if mask is None else int(np.count_nonzero(mask))
        value = float(stat(np.ones((1, n)))[0])
        reps = self.replicates(stat, mask)
        return summarise_replicates(value, reps, self.level) | self.record(mask)

    def record(self, mask: np.ndarray | None = None) -> dict[str, Any]:
        ids = self.case_patient if mask is None else self.case_patient[mask]
        return {
            "n_resamples": int(self.n_resamples),
            "seed": int(self.seed),
            "n_patients": int(len(np.unique(ids))),
            "n_cases": int(len(ids)),
        }


def summarise_replicates(value: float, reps: np.ndarray, level: float = DEFAULT_LEVEL) -> dict[str, Any]:
    """Percentile interval of the defined replicates."""
    ok = np.isfinite(reps)
    alpha = (1.0 - level) / 2.0
    if math.isfinite(value) and ok.any():
        lo, hi = np.percentile(reps[ok], [100 * alpha, 100 * (1 - alpha)])
    else:
        lo = hi = math.nan
    return {
        "value": value if math.isfinite(value) else None,
        "ci_low": float(lo) if math.isfinite(lo) else None,
        "ci_high": float(hi) if math.isfinite(hi) else None,
        "level": float(level),
        "n_undefined": int((~ok).sum()),
    }


def bootstrap_info(n_resamples: int, seed: int, level: float = DEFAULT_LEVEL) -> dict[str, Any]:
    """What metrics.json records once about how its intervals were made."""
    return {
        "method": METHOD,
        "n_resamples": int(n_resamples),
        "seed": int(seed),
        "level": float(level),
        "draws": "numpy.random.default_rng(seed).integers(0, n_patients, (n_resamples, n_patients)) over the "
        "sorted unique patient ids",
    }


# ----------------------------------------------------------------------------- metric families
def classification_intervals(
    probs: np.ndarray,
    targets: np.ndarray,
    names: Sequence[str],
    boot: PatientBootstrap,
    thresholds: Sequence[float] = (0.5,),
) -> dict[str, Any]:
    """Per output: AUC, average precision, sensitivity and specificity at each threshold, with intervals;
    the mean AUC over outputs with intervals (mean over the outputs defined in each resample)."""
    probs = np.asarray(probs, dtype=np.float64).reshape(len(targets), -1)
    targets = np.asarray(targets, dtype=np.float64).reshape(len(probs), -1)
    per: dict[str, Any] = {}
    auc_stats: list[tuple[np.ndarray, WeightedStat]] = []
    for c, name in enumerate(names):
        known = np.isfinite(targets[:, c])
        y, s = targets[known, c] == 1, probs[known, c]
        auc_fn: WeightedStat = lambda w, y=y, s=s: weighted_auc(y, s, w)  # noqa: E731
        ap_fn: WeightedStat = lambda w, y=y, s=s: weighted_average_precision(y, s, w)  # noqa: E731
        row: dict[str, Any] = {
            "positives": int(y.sum()),
            "negatives": int((~y).sum()),
            "auc": boot.interval(auc_fn, known),
            "average_precision": boot.interval(ap_fn, known),
            "thresholds": [],
        }
        for th in thresholds:
            pred = s >= float(th)
            sens: WeightedStat = lambda w, p=pred, y=y: weighted_rate(p, y, w)  # noqa: E731
            spec: WeightedStat = lambda w, p=pred, y=y: weighted_rate(~p, ~y, w)  # noqa: E731
            row["thresholds"].append(
                {"threshold": float(th), "sensitivity": boot.interval(sens, known),
                 "specificity": boot.interval(spec, known)}  # fmt: skip
            )
        per[name] = row
        auc_stats.append((known, auc_fn))

    def mean_auc(w: np.ndarray) -> np.ndarray:
        cols = np.stack([fn(w[:, known]) for known, fn in auc_stats], 1)
        ok = np.isfinite(cols)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(ok.any(1), np.where(ok, cols, 0.0).sum(1) / ok.sum(1), np.nan)

    return {"per_output": per, "mean_auc": boot.interval(mean_auc)}


def mean_intervals(values: dict[str, np.ndarray], boot: PatientBootstrap) -> dict[str, Any]:
    """Interval of the mean of each per-case value (Dice per class/region, HD95, Brier, ...)."""
    out = {}
    for k, v in values.items():
        arr = np.asarray(v, dtype=np.float64)
        out[k] = boot.interval(lambda w, arr=arr: weighted_mean(arr, w))
    return out


# ----------------------------------------------------------------------------- DeLong
def _midranks(x: np.ndarray) -> np.ndarray:
    return sps.rankdata(x, method="average", axis=-1)


def fast_delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs [k] and their DeLong covariance [k, k] for k score rows [k, n] (Sun & Xu 2014)."""
    y = np.asarray(y).astype(bool).ravel()
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise DataError(f"DeLong's test needs at least two positive and two negative cases, got {m} and {n}")
    x_pos, x_neg = scores[:, y], scores[:, ~y]
    tx, ty = _midranks(x_pos), _midranks(x_neg)
    tz = _midranks(np.concatenate([x_pos, x_neg], axis=1))
    aucs = tz[:, :m].sum(axis=1) / m / n - (m + 1.0) / 2.0 / n
    v01 = (tz[:, :m] - tx) / n  # structural components of the positives
    v10 = 1.0 - (tz[:, m:] - ty) / m  # of the negatives
    sx = np.atleast_2d(np.cov(v01))
    sy = np.atleast_2d(np.cov(v10))
    return aucs, sx / m + sy / n


def delong_test(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> dict[str, Any]:
    """Two correlated AUCs on the same cases: difference, its DeLong standard error, 95% CI, z and
    two-sided p-value."""
    aucs, cov = fast_delong(y, np.vstack([score_a, score_b]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = math.sqrt(max(var, 0.0))
    z = diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    p = float(2 * sps.norm.sf(abs(z))) if math.isfinite(z) else 0.0
    q = float(sps.norm.ppf(0.975))
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "difference": diff,
        "se": se,
        "ci_low": diff - q * se,
        "ci_high": diff + q * se,
        "z": z if math.isfinite(z) else None,
        "p_value": p,
        "method": "DeLong et al. 1988, fast algorithm of Sun & Xu 2014 (cases independent)",
    }


def paired_auc_comparison(
    y: np.ndarray,
    score_a: np.ndarray,
    score_b: np.ndarray,
    patient_ids: Sequence[Any],
    n_resamples: int = DEFAULT_N_RESAMPLES,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> dict[str, Any]:
    """AUC(a) - AUC(b) on the same cases: DeLong's test and a paired patient-bootstrap interval."""
    y = np.asarray(y, dtype=np.float64)
    a, b = np.asarray(score_a, np.float64), np.asarray(score_b, np.float64)
    ok = np.isfinite(y) & np.isfinite(a) & np.isfinite(b)
    y, a, b = y[ok] == 1, a[ok], b[ok]
    boot = PatientBootstrap(np.asarray(patient_ids)[ok], n_resamples, seed, level, what="paired AUC")
    diff: WeightedStat = lambda w: weighted_auc(y, a, w) - weighted_auc(y, b, w)  # noqa: E731
    reps = boot.replicates(diff)
    out = {
        "n_cases": int(len(y)),
        "n_positive": int(y.sum()),
        "auc_a": boot.interval(lambda w: weighted_auc(y, a, w)),
        "auc_b": boot.interval(lambda w: weighted_auc(y, b, w)),
        "bootstrap_difference": summarise_replicates(float(diff(np.ones((1, len(y))))[0]), reps, level)
        | boot.record()
        | {"share_a_not_better": float(np.mean(reps[np.isfinite(reps)] <= 0)) if np.isfinite(reps).any() else None},
    }
    try:
        out["delong"] = delong_test(y, a, b)
    except DataError as exc:
        out["delong"] = {"error": str(exc)}
    return out


def paired_dice_comparison(
    dice_a: np.ndarray, dice_b: np.ndarray, case_ids: Sequence[str], patient_ids: Sequence[Any] | None = None,
    n_resamples: int = DEFAULT_N_RESAMPLES, seed: int = 0, level: float = DEFAULT_LEVEL,
) -> dict[str, Any]:  # fmt: skip
    """Per-case Dice difference (a - b): mean with a paired patient-bootstrap interval and the Wilcoxon
    signed-rank test (scipy; cases with a NaN Dice in either are left out and counted)."""
    a, b = np.asarray(dice_a, np.float64), np.asarray(dice_b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    d = (a - b)[ok]
    pids = np.asarray(list(patient_ids) if patient_ids is not None else list(case_ids))[ok]
    boot = PatientBootstrap(pids, n_resamples, seed, level, what="paired Dice")
    res: dict[str, Any] = {
        "n_cases": int(ok.sum()),
        "n_left_out": int((~ok).sum()),
        "mean_difference": boot.interval(lambda w: weighted_mean(d, w)),
        "median_difference": float(np.median(d)) if d.size else None,
    }
    if np.any(d != 0):
        w = sps.wilcoxon(d)
        res["wilcoxon"] = {"statistic": float(w.statistic), "p_value": float(w.pvalue),
                           "method": "scipy.stats.wilcoxon, two-sided, zero differences dropped"}  # fmt: skip
    else:
        res["wilcoxon"] = {"statistic": None, "p_value": 1.0, "method": "all differences are zero"}
    return res
