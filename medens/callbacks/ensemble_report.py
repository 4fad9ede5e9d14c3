"""After the meta-learner's test run: fit the weighted average and write the ensemble report.

Runs at `on_test_end`, when the best meta-learner checkpoint is loaded, so everything in the report
(base models, weighted average, meta-learner) is scored on the same held-out patients.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback

from medens.ensemble.report import plot_roc, write_report
from medens.ensemble.weighted_average import apply_weighted_average, fit_weighted_average, source_scores
from medens.errors import ConfigError
from medens.evaluation.statistics import (
    PatientBootstrap,
    bootstrap_info,
    paired_auc_comparison,
    weighted_auc,
)
from medens.metrics.classification import binary_auroc
from medens.utils.atomic import write_csv
from medens.utils.jsonio import read_json_object, write_json_strict

log = logging.getLogger(__name__)


def _atomic_json(path: Path, obj: Any) -> None:
    write_json_strict(path, obj)  # atomic, and no NaN ever reaches the file


def score_methods(
    y: np.ndarray, scores: Mapping[str, np.ndarray], patient_ids: Any, n_resamples: int, seed: int
) -> dict[str, dict[str, Any]]:
    """AUC with a patient-bootstrap interval of every method on exactly the same patients (those with a
    label for this target) and the same resamples; a method with a missing score is an error, never a
    silently smaller set of patients."""
    known = np.isfinite(y)
    for m, s in scores.items():
        bad = known & ~np.isfinite(s)
        if bad.any():
            raise ValueError(f"ensemble report: method {m!r} has no score for {int(bad.sum())} labelled patient(s)")
    nan = {"auc": None, "ci_low": None, "ci_high": None, "n": int(known.sum())}
    if known.sum() < 2 or len(np.unique(y[known])) < 2:
        return {m: dict(nan) for m in scores}
    boot = PatientBootstrap(np.asarray(patient_ids)[known], n_resamples, seed, what="ensemble report")
    yk = y[known] == 1
    out = {}
    for m, s in scores.items():
        r = boot.interval(lambda w, s=s[known]: weighted_auc(yk, s, w))
        out[m] = {"auc": r["value"], "ci_low": r["ci_low"], "ci_high": r["ci_high"], "n": int(known.sum())}
    return out


class EnsembleReport(Callback):
    """Writes `weighted_average.json` (saved_models/ensemble) and the report folder (run folder)."""

    def __init__(
        self,
        weighted_average_path: str,
        report_dir: str,
        target_sources: Mapping[str, Mapping[str, Sequence[str]]],
        objective: str = "auc",
        grid_step: float = 0.02,
        auc_tolerance: float = 0.005,
        n_bootstrap: int = 1000,
        seed: int = 0,
        min_gain: float | None = None,
    ) -> None:
        self.weighted_average_path = Path(weighted_average_path)
        self.report_dir = Path(report_dir)
        self.target_sources = {t: {m: list(v) for m, v in s.items()} for t, s in target_sources.items()}
        self.objective = objective
        self.grid_step = grid_step
        self.auc_tolerance = auc_tolerance
        self.n_bootstrap = n_bootstrap
        self.seed = seed
        self.min_gain = min_gain
        self.summary: dict[str, Any] | None = None

    def _sources(self, target: str, dm: Any) -> dict[str, list[str]]:
        if target not in self.target_sources:
            raise ConfigError(f"callbacks.ensemble_report.target_sources has no entry for target {target!r}")
        out = {}
        for m, names in self.target_sources[target].items():
            if m not in dm.base:
                continue  # that base model is not part of this run (on_missing_base=skip)
            cols = [n if "." in n else f"{m}.{n}" for n in names]
            unknown = [c for c in cols if c not in dm.feature_names]
            if unknown:
                raise ConfigError(
                    f"target_sources.{target}.{m}: unknown feature(s) {unknown}; known: {dm.feature_names}"
                )
            out[m] = cols
        if not out:
            raise ConfigError(
                f"target {target!r}: none of its sources {list(self.target_sources[target])} is available"
            )
        return out

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        fit = pd.concat([dm.frames["train"], dm.frames["val"]], ignore_index=True)
        test = dm.frames["test"]
        x_test = torch.from_numpy(dm.inputs(test))
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            meta = pl_module.predict_proba(x_test.to(pl_module.device)).cpu().numpy()
        pl_module.train(was_training)

        wa_json: dict[str, Any] = {
            "objective": self.objective,
            "search": {"grid_step": self.grid_step, "auc_tolerance": self.auc_tolerance if self.objective == "auc" else None},
            "fit_on": {
                "split": "meta (meta-train + meta-val): cases no base model trained on",
                "n_patients": int(len(fit)),
                "manifest": str(dm.manifest_path.resolve()),
                "base_checkpoints": {
                    m: {"path": str(b.path.resolve()), "sha256": b.sha256} for m, b in dm.base.items()
                },
            },
            "combination": "sum_k w_k * sigmoid(coef_k * score_k + intercept_k) over the sources present, "
            "weights renormalised when one is missing; score_k = mean of the listed base-model outputs; "
            "a patient with every source missing gets all_missing_output (the fit patients' prevalence)",
            "targets": {},
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        methods = [*dm.base.keys(), "weighted_average", "meta_learner"]
        scores: dict[str, dict[str, np.ndarray]] = {}
        y: dict[str, np.ndarray] = {}
        for j, target in enumerate(dm.targets):
            sources = self._sources(target, dm)
            raw_fit = source_scores(fit, sources)
            fitted = fit_weighted_average(
                raw_fit, fit[target].to_numpy(float), self.objective, self.grid_step, self.auc_tolerance,
                target=target,
            )
            value = fitted["fit_objective_value"]
            wa_json["targets"][target] = {
                "sources": sources,
                "weights": {m: float(w) for m, w in zip(sources, fitted["weights"], strict=True)},
                "calibration": dict(zip(sources, fitted["calibration"], strict=True)),
                "fit_" + self.objective: value if self.objective == "auc" else -value,
                "n_fit": fitted["n_fit"],
                "all_missing_output": fitted["all_missing_output"],
            }
            raw_test = source_scores(test, sources)
            fill = np.nanmean(raw_fit, axis=0)
            s = {
                m: np.where(np.isfinite(raw_test[:, k]), raw_test[:, k], fill[k])
                for k, m in enumerate(sources)
            }
            s["weighted_average"] = apply_weighted_average(raw_test, fitted)
            s["meta_learner"] = meta[:, j]
            scores[target] = s
            y[target] = test[target].to_numpy(float)
        _atomic_json(self.weighted_average_path, wa_json)

        pids = test["patient_id"].to_numpy()
        auc: dict[str, dict[str, Any]] = {m: {} for m in methods}
        for t in dm.targets:
            scored = score_methods(y[t], scores[t], pids, self.n_bootstrap, self.seed)
            for m in methods:
                auc[m][t] = scored.get(m, {"auc": None, "ci_low": None, "ci_high": None, "n": 0})

        def _mean(m: str) -> float:
            vals = [auc[m][t]["auc"] for t in dm.targets if auc[m][t]["auc"] is not None]
            return float(np.mean(vals)) if vals else float("nan")

        mean_auc = {m: _mean(m) for m in methods}
        single = max(dm.base, key=lambda m: -np.inf if np.isnan(mean_auc[m]) else mean_auc[m])
        comparison: dict[str, Any] = {}
        for t in dm.targets:
            known = np.isfinite(y[t])
            comparison[t] = {}
            if known.sum() < 2 or len(np.unique(y[t][known])) < 2 or single not in scores[t]:
                continue
            for m in ("meta_learner", "weighted_average"):
                comparison[t][m] = paired_auc_comparison(
                    y[t][known], scores[t][m][known], scores[t][single][known], pids[known],
                    self.n_bootstrap, self.seed,
                )  # fmt: skip
        summary: dict[str, Any] = {
            "targets": list(dm.targets),
            "methods": methods,
            "auc": auc,
            "mean_auc": mean_auc,
            "best_single": {"method": single, "mean_auc": mean_auc[single]},
            "gain_over_best_single": mean_auc["meta_learner"] - mean_auc[single],
            "n_test": int(len(test)),
            "n_bootstrap": self.n_bootstrap,
            "bootstrap": bootstrap_info(self.n_bootstrap, self.seed),
            "vs_best_single": comparison,
            "missing_test": {m: int(test[f"missing.{m}"].sum()) for m in dm.base},
            "sources": {t: {m: v for m, v in wa_json["targets"][t]["sources"].items()} for t in dm.targets},
            "weighted_average": {"objective": self.objective, "targets": wa_json["targets"]},
            "oracle_auc": self._oracle(dm, test),
            "meta_learner_checkpoint": getattr(trainer, "ckpt_path", None),
        }
        self.report_dir.mkdir(parents=True, exist_ok=True)
        plot_roc(y, scores, self.report_dir / "roc_curves.png")
        pred = test[["patient_id", *dm.targets]].copy()
        for t in dm.targets:
            for m, s in scores[t].items():
                pred[f"{t}.{m}"] = s
        write_csv(pred, self.report_dir / "predictions.csv")
        write_report(self.report_dir, summary)
        self.summary = summary
        log.info(
            "ensemble report %s: meta-learner mean AUC %.3f vs best single (%s) %.3f (%+.3f); weighted average %.3f",
            self.report_dir, mean_auc["meta_learner"], single, mean_auc[single], summary["gain_over_best_single"],
            mean_auc["weighted_average"],
        )  # fmt: skip
        if self.min_gain is not None and summary["gain_over_best_single"] < self.min_gain:
            log.warning(
                "meta-learner gain %.3f is below the configured min_gain %.3f",
                summary["gain_over_best_single"],
                self.min_gain,
            )

    @staticmethod
    def _oracle(dm: Any, test: pd.DataFrame) -> dict[str, float] | None:
        """AUC of the noise-free hidden state, when the cohort is the synthetic one (latent.csv present)."""
        root = dm.manifest_path.parent
        stamp, latent = root / "cohort.json", root / "latent.csv"
        if not (stamp.is_file() and latent.is_file()):
            return None
        spec = read_json_object(stamp, "synthetic cohort stamp", ConfigError).get("targets", {})
        lat = pd.read_csv(latent, dtype={"patient_id": str}).set_index("patient_id").loc[test["patient_id"]]
        out = {}
        for t in dm.targets:
            if t in spec:
                score = lat[["a_xray", "a_ct", "a_mri"]].to_numpy() @ np.asarray(spec[t]["weights"])
                if (auc := binary_auroc(test[t].to_numpy(float), score)) is not None:
                    out[t] = auc
        return out or None
