"""Calibration: reliability diagrams, expected calibration error, Brier score, and post-hoc scaling.

A discriminating model can still be badly calibrated (its 0.8 is not 80%). Evaluation reports ECE and
Brier per output and draws a reliability diagram; `calibration=temperature|platt` fits a scaling on the
checkpoint's own validation split and stores it beside the checkpoint, never inside it (the training's
best file is not touched):

    <ckpt stem>.calibration.json   e.g. saved_models/xray/resnet50_best.calibration.json

Formula, per output (the keys serving and the exports' manifest use):
``p = sigmoid(scale * logit + bias)`` where ``logit`` is the network's output logit (equivalently
``log(p_raw / (1 - p_raw))``). Temperature scaling is ``scale = 1 / temperature, bias = 0``.
The file records the SHA-256 of the checkpoint it was fitted for; applying it to another file is
refused. A segmenter's file (`kind: softmax_temperature`) holds one softmax temperature instead:
``p = softmax(logits / temperature)`` (see `medens.evaluation.voxel_calibration`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize

from medens.errors import CheckpointError, ConfigError
from medens.utils.hashing import sha256_file
from medens.utils.jsonio import read_json_object, write_json_strict

log = logging.getLogger(__name__)

METHODS = ("none", "auto", "temperature", "platt")
SUFFIX = ".calibration.json"
FORMULA = "p = sigmoid(scale * logit + bias); temperature scaling: scale = 1/temperature, bias = 0"
EPS = 1e-6


def calibration_path(ckpt_path: str | Path) -> Path:
    """Where the calibration of a checkpoint lives: beside it, `<stem>.calibration.json`."""
    p = Path(ckpt_path)
    return p.with_name(p.stem + SUFFIX)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def brier_score(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean squared difference between probability and outcome (0 best)."""
    return float(np.mean((np.asarray(probs, float) - np.asarray(y, float)) ** 2))


def reliability_bins(probs: np.ndarray, y: np.ndarray, n_bins: int = 10) -> list[dict[str, Any]]:
    """Equal-width bins over [0, 1]: count, mean predicted probability and observed frequency."""
    probs, y = np.asarray(probs, float), np.asarray(y, float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(probs, edges[1:-1], right=True), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        m = which == b
        rows.append({
            "low": float(edges[b]), "high": float(edges[b + 1]), "count": int(m.sum()),
            "mean_predicted": float(probs[m].mean()) if m.any() else None,
            "observed": float(y[m].mean()) if m.any() else None,
        })  # fmt: skip
    return rows


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = 10) -> float:
    """ECE: count-weighted mean |observed - predicted| over equal-width bins."""
    bins = reliability_bins(probs, y, n_bins)
    n = sum(b["count"] for b in bins)
    if n == 0:
        return math.nan
    return float(sum(b["count"] * abs(b["observed"] - b["mean_predicted"]) for b in bins if b["count"]) / n)


def calibration_summary(probs: np.ndarray, targets: np.ndarray, names: Sequence[str], n_bins: int = 10) -> dict:
    """Per output: ECE, Brier score, the reliability bins (known labels only)."""
    out = {}
    for c, name in enumerate(names):
        known = np.isfinite(targets[:, c])
        p, y = probs[known, c], targets[known, c]
        out[name] = {
            "ece": expected_calibration_error(p, y, n_bins) if len(p) else None,
            "brier": brier_score(p, y) if len(p) else None,
            "n": int(len(p)),
            "bins": reliability_bins(p, y, n_bins),
        }
    return out


def plot_reliability(probs: np.ndarray, targets: np.ndarray, names: Sequence[str], path: Path,
                     n_bins: int = 10, title: str = "Reliability") -> Path:  # fmt: skip
    """Reliability diagram: observed frequency against mean predicted probability, per output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 6.5))
    ax.set_prop_cycle(color=[plt.cm.tab20(i % 20) for i in range(max(len(names), 1))])
    for c, name in enumerate(names):
        known = np.isfinite(targets[:, c])
        if not known.any():
            continue
        bins = [b for b in reliability_bins(probs[known, c], targets[known, c], n_bins) if b["count"]]
        ece = expected_calibration_error(probs[known, c], targets[known, c], n_bins)
        ax.plot([b["mean_predicted"] for b in bins], [b["observed"] for b in bins], "o-", ms=3, lw=1.1,
                label=f"{name} (ECE {ece:.3f})")  # fmt: skip
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="mean predicted probability", ylabel="observed frequency", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7, loc="upper left")
    from medens.evaluation.classification import save_figure

    return save_figure(fig, path, dpi=110)


def _nll(z: np.ndarray, y: np.ndarray) -> float:
    # log(1 + exp(-z)) for y=1, log(1 + exp(z)) for y=0, stably
    return float(np.mean(np.logaddexp(0.0, -z) * y + np.logaddexp(0.0, z) * (1 - y)))


def fit_scaling(probs: np.ndarray, y: np.ndarray, method: str) -> dict[str, float]:
    """Fit temperature (one parameter) or Platt (scale and bias) scaling by minimising the log-loss."""
    z, y = _logit(probs), np.asarray(y, float)
    if method == "temperature":
        res = minimize(lambda t: _nll(z / np.exp(t[0]), y), x0=[0.0], method="L-BFGS-B", bounds=[(-4, 4)])
        temperature = float(np.exp(res.x[0]))
        return {"scale": 1.0 / temperature, "bias": 0.0, "temperature": temperature}
    if method == "platt":
        res = minimize(lambda v: _nll(v[0] * z + v[1], y), x0=[1.0, 0.0], method="L-BFGS-B",
                       bounds=[(1e-3, 100.0), (-20.0, 20.0)])  # fmt: skip
        return {"scale": float(res.x[0]), "bias": float(res.x[1])}
    raise ConfigError(f"calibration must be one of {list(METHODS)}, got {method!r}")


def fit_calibration(probs: np.ndarray, targets: np.ndarray, names: Sequence[str], method: str) -> dict[str, Any]:
    """Per output scaling parameters; an output without both classes on the fit cases keeps identity."""
    outputs = {}
    for c, name in enumerate(names):
        known = np.isfinite(targets[:, c])
        y = targets[known, c]
        if known.sum() < 2 or len(np.unique(y)) < 2:
            log.warning("calibration: output %r has one class on the fit cases; left uncalibrated", name)
            outputs[name] = {"scale": 1.0, "bias": 0.0, "fitted": False}
            continue
        outputs[name] = {**fit_scaling(probs[known, c], y, method), "fitted": True, "n": int(known.sum())}
    return {"method": method, "formula": FORMULA, "outputs": outputs}


def apply_calibration(probs: np.ndarray, calibration: Mapping[str, Any] | None, names: Sequence[str]) -> np.ndarray:
    """Calibrated probabilities ([n, k]); identity where the calibration has no entry."""
    if not calibration:
        return probs
    out = np.array(probs, dtype=np.float64, copy=True)
    outputs = calibration.get("outputs", {})
    for c, name in enumerate(names):
        par = outputs.get(name)
        if par is not None:
            out[:, c] = _sigmoid(par["scale"] * _logit(probs[:, c]) + par["bias"])
    return out


def save_calibration(ckpt_path: str | Path, calibration: Mapping[str, Any], fitted_on: Mapping[str, Any]) -> Path:
    """Write `<stem>.calibration.json` beside the checkpoint (atomically), bound to its SHA-256."""
    path = calibration_path(ckpt_path)
    doc = {
        **calibration,
        "checkpoint": Path(ckpt_path).name,
        "checkpoint_sha256": sha256_file(ckpt_path),
        "fitted_on": dict(fitted_on),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_strict(path, doc)
    log.info("calibration (%s) written to %s", calibration.get("method"), path)
    return path


def load_calibration(ckpt_path: str | Path, required: bool = False) -> dict[str, Any] | None:
    """The stored calibration of a checkpoint, checked against its SHA-256; None when there is none."""

    path = calibration_path(ckpt_path)
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: no calibration stored for {ckpt_path}")
        return None
    doc = read_json_object(path, "calibration file", CheckpointError)
    digest = sha256_file(ckpt_path)
    if doc.get("checkpoint_sha256") != digest:
        raise CheckpointError(
            f"{path}: calibration was fitted for SHA-256 {doc.get('checkpoint_sha256')}, but {ckpt_path} has "
            f"{digest}; refit it with calibration=temperature|platt or delete the file"
        )
    return doc


def manifest_entry(ckpt_path: str | Path) -> dict[str, Any] | None:
    """What the exports' manifest records about a checkpoint's calibration (None: uncalibrated)."""
    doc = load_calibration(ckpt_path)
    if doc is None:
        return None
    entry = {
        "method": doc["method"],
        "formula": doc.get("formula", FORMULA),
        "outputs": {k: {"scale": v["scale"], "bias": v["bias"]} for k, v in doc["outputs"].items()},
        "file": calibration_path(ckpt_path).name,
        "fitted_on": doc.get("fitted_on"),
    }
    if doc.get("kind"):  # a segmenter's softmax temperature (medens.evaluation.voxel_calibration)
        entry.update(kind=doc["kind"], temperature=doc.get("temperature"), regions=doc.get("regions"))
    return entry
