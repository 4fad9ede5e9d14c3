"""Patient-grouped k-fold cross-validation of a classifier, against a one-number baseline on the same cases.

`python scripts/cross_validate.py experiment=ct_lidc_voi` trains every fold of `data.n_folds` with
`train()` (each fold in `<run>/fold_<k>/`, with its own `saved_models/`), predicts the fold's held-out
patients with the weights at the end of training (`cv.checkpoint: last`) or its best checkpoint
(`best`), and scores the baseline column (e.g. `diameter_mm`) on exactly the same cases. No held-out case steers training: the datamodule's `inner_val_fraction` makes each fold's
held-out patients the `test` split, and early stopping, best-checkpoint selection and the operating
thresholds use a validation split drawn from that fold's training patients only.

`cv.seeds` (e.g. `[1, 2, 3]`) trains one model per seed on each fold (same folds: the split seed is
`data.seed`) and scores the mean of their probabilities (in `<run>/fold_<k>/seed_<s>/`).

Written to the run folder: `cv_predictions.csv` (one row per held-out case), `cv_report.json` and
`cv_report.md` (per fold and pooled AUC of model and baseline, mean and spread, a paired patient-level
bootstrap interval of the difference, operating points at the inner-validation thresholds).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict

from medens.checkpoint.io import load_checkpoint, load_network_weights
from medens.errors import ConfigError, DataError
from medens.evaluation.classification import operating_points, threshold_for_sensitivity
from medens.evaluation.predict import predict_all
from medens.evaluation.report_html import fmt_num
from medens.evaluation.statistics import paired_auc_comparison
from medens.metrics.classification import binary_auroc
from medens.training.train import train
from medens.training.validation import TRAIN_KEYS, validate_config
from medens.utils.atomic import write_csv
from medens.utils.jsonio import read_json_object, write_json_and_markdown

log = logging.getLogger(__name__)

CV_KEYS = {"folds", "seeds", "checkpoint", "bootstrap", "baseline", "xray", "mri", "merge"}


def recipe_options(cfg: DictConfig, name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """``cv.<name>`` merged over a recipe's `defaults` (one level deep); an unknown key is a ConfigError."""
    user = OmegaConf.to_container(cfg.cv.get(name) or {}, resolve=True)
    assert isinstance(user, dict)
    unknown = set(user) - set(defaults)
    if unknown:
        raise ConfigError(f"unknown config key(s) cv.{name}.{sorted(unknown)}; known: {sorted(defaults)}")
    return {k: {**v, **(user.get(k) or {})} if isinstance(v, dict) else user.get(k, v) for k, v in defaults.items()}


def predict_cases(model: Any, loader: Any) -> pd.DataFrame:
    """case_id, label and malignancy probability of every item of a loader, through `trainer.predict`
    and the module's own `predict_step` (its test-time flips included), on the device the model is on."""
    rows = [
        {"case_id": cid, "label": float(y), "prob": float(p)}
        for out in predict_all(model, loader, str(model.device))
        for cid, y, p in zip(out["case_id"], out["label"].tolist(), out["probs"][:, 0].float().tolist(), strict=True)
    ]
    return pd.DataFrame(rows)


def read_runs(dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The ``cv_report.json`` of each run a merge combines (an error naming a missing or torn one)."""
    return [read_json_object(Path(d) / "cv_report.json", "cross-validation report", DataError) for d in dirs]


def merged_from(reports: Sequence[Mapping[str, Any]], dirs: Sequence[str | Path]) -> dict[str, Any]:
    """What a merged report records of its runs: CPU time summed, the slowest run's wall time, the folders."""
    return {"cpu_seconds": round(sum(r["cpu_seconds"] for r in reports), 1),
            "wall_seconds": round(max(r["wall_seconds"] for r in reports), 1),
            "merged_from": [str(d) for d in dirs], "experiment": reports[0]["experiment"]}  # fmt: skip


def time_line(report: Mapping[str, Any]) -> list[str]:
    """The Markdown report's closing line on CPU and wall time (none when the report has no CPU time)."""
    if "cpu_seconds" not in report:
        return []
    return [f"- CPU time {report['cpu_seconds']:.0f} s (process + children), wall {report['wall_seconds']:.0f} s"]


def _fold_config(cfg: DictConfig, fold: int, out_dir: Path, seed: int | None = None) -> DictConfig:
    fcfg = copy.deepcopy(cfg)
    with open_dict(fcfg):
        del fcfg["cv"]
        fcfg.data.fold = int(fold)
        if seed is not None:  # another initialisation and batch order; the folds stay those of data.seed
            fcfg.data.seed = int(cfg.data.seed)
            fcfg.seed = int(seed)
        fcfg.paths.output_dir = str(out_dir)
        fcfg.paths.saved_models_dir = str(out_dir / "saved_models")
        fcfg.test = False  # the held-out fold is predicted below, with the selected checkpoint
        fcfg.ckpt_path = None
    return fcfg


def _train_fold(
    cfg: DictConfig, fold: int, out_dir: Path, seed: int | None, checkpoint: str
) -> dict[str, Any]:
    """Train one model on one fold; its predictions on the fold's inner-validation and held-out cases."""
    metrics, objects = train(_fold_config(cfg, fold, out_dir, seed))
    model, dm = objects["model"], objects["datamodule"]
    best = objects.get("best_checkpoint")
    used = "last"
    if checkpoint == "best" and best:
        load_network_weights(model.net, load_checkpoint(best), strict=True)
        used = str(best)
    return {
        "val": predict_cases(model, dm.val_dataloader()),
        "test": predict_cases(model, dm.test_dataloader()),
        "datamodule": dm,
        "model": model,
        "seed": int(objects["cfg"].seed),
        "checkpoint": used,
        "epochs": int(objects["trainer"].current_epoch),
        "best_inner_val_auc": metrics.get("best/val/auc"),
    }


def _mean_prob(frames: list[pd.DataFrame]) -> pd.DataFrame:
    out = frames[0][["case_id", "label"]].copy()
    probs = [f.set_index("case_id").loc[out["case_id"], "prob"].to_numpy() for f in frames]
    out["prob"] = np.mean(probs, axis=0)
    return out


def _check(cfg: DictConfig) -> dict[str, Any]:
    validate_config(cfg, allowed_top=TRAIN_KEYS | {"cv"})
    cv = OmegaConf.to_container(cfg.get("cv") or {}, resolve=True)
    assert isinstance(cv, dict)
    unknown = set(cv) - CV_KEYS
    if unknown:
        raise ConfigError(f"unknown config key(s) cv.{sorted(unknown)}; known: {sorted(CV_KEYS)}")
    n_folds = cfg.data.get("n_folds")
    if not n_folds:
        raise ConfigError("cross-validation needs data.n_folds (e.g. data.n_folds=5)")
    if not float(cfg.data.get("inner_val_fraction") or 0) > 0:
        raise ConfigError(
            "cross-validation needs data.inner_val_fraction > 0: checkpoint selection and early stopping "
            "must use the fold's training patients, never its held-out ones"
        )
    folds = cv.get("folds")
    folds = list(range(int(n_folds))) if folds is None else [int(f) for f in folds]
    if not folds or any(not 0 <= f < int(n_folds) for f in folds):
        raise ConfigError(f"cv.folds must be in 0..{int(n_folds) - 1}, got {folds}")
    if cv.get("checkpoint", "last") not in ("best", "last"):
        raise ConfigError(f"cv.checkpoint must be best or last, got {cv.get('checkpoint')!r}")
    seeds = cv.get("seeds")
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"cv.seeds must be null or a list of distinct seeds, got {seeds}")
    return {
        "folds": folds,
        "seeds": None if seeds is None else [int(v) for v in seeds],
        "checkpoint": cv.get("checkpoint", "last"),
        "bootstrap": int(cv.get("bootstrap", 2000) or 0),
        "baseline": str(cv.get("baseline", "diameter_mm")),
        "n_folds": int(n_folds),
    }


def cross_validate(cfg: DictConfig) -> dict[str, Any]:
    """Train and score every fold; returns the report (also written to `cfg.paths.output_dir`).

    By `modality`: CT trains the experiment's model per fold with `train()` (below); X-ray and MRI run
    their recipes of `medens.evaluation.cv_xray` / `cv_mri` against the pixel / FLAIR baselines.
    """
    modality = str(cfg.get("modality") or "")
    if modality in ("xray", "mri"):
        validate_config(cfg, allowed_top=TRAIN_KEYS | {"cv"})
        unknown = set(cfg.get("cv") or {}) - CV_KEYS
        if unknown:
            raise ConfigError(f"unknown config key(s) cv.{sorted(unknown)}; known: {sorted(CV_KEYS)}")
        merge = cfg.cv.get("merge")
        n_boot = int(cfg.cv.get("bootstrap", 2000) or 1)
        if modality == "xray":
            from medens.evaluation.cv_xray import cross_validate_xray, merge_xray

            return merge_xray(list(merge), Path(cfg.paths.output_dir), n_boot) if merge else cross_validate_xray(cfg)
        from medens.evaluation.cv_mri import cross_validate_mri, merge_mri

        return merge_mri(list(merge), Path(cfg.paths.output_dir), n_boot) if merge else cross_validate_mri(cfg)
    opts = _check(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    baseline = opts["baseline"]
    t_start = time.perf_counter()
    frames, folds = [], []
    for k in opts["folds"]:
        t0 = time.perf_counter()
        fold_dir = out_dir / f"fold_{k}"
        log.info("cross-validation: fold %d of %d -> %s", k, opts["n_folds"], fold_dir)
        if opts["seeds"] is None:
            runs = [_train_fold(cfg, k, fold_dir, None, opts["checkpoint"])]
        else:
            runs = [_train_fold(cfg, k, fold_dir / f"seed_{s}", s, opts["checkpoint"]) for s in opts["seeds"]]
        dm, model = runs[-1]["datamodule"], runs[-1]["model"]
        val, test = _mean_prob([r["val"] for r in runs]), _mean_prob([r["test"] for r in runs])
        info = pd.DataFrame(dm.split_records("test"))
        if baseline not in info.columns:
            raise ConfigError(f"cv.baseline {baseline!r} is not a per-case field ({sorted(info.columns)})")
        frame = test.merge(info.drop(columns="label"), on="case_id", how="left", validate="one_to_one")
        frame.insert(0, "fold", k)
        frames.append(frame)
        y, p, b = frame["label"].to_numpy(), frame["prob"].to_numpy(), frame[baseline].to_numpy()
        row: dict[str, Any] = {
            "fold": k,
            "n_cases": int(len(frame)),
            "n_malignant": int(y.sum()),
            "n_patients": int(frame["patient_id"].nunique()),
            "n_train": len(dm.datasets["train"]),
            "n_inner_val": len(dm.datasets["val"]),
            "auc_model": binary_auroc(y, p),
            f"auc_{baseline}": binary_auroc(y, b),
            "inner_val_auc": binary_auroc(val["label"].to_numpy(), val["prob"].to_numpy()),
            "models": [
                {
                    "seed": r["seed"],
                    "auc": binary_auroc(y, r["test"].set_index("case_id").loc[frame["case_id"], "prob"].to_numpy()),
                    "best_inner_val_auc": r["best_inner_val_auc"],
                    "epochs": r["epochs"],
                    "checkpoint": r["checkpoint"],
                }
                for r in runs
            ],
            "epochs": max(r["epochs"] for r in runs),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        # Operating point at the target sensitivity: the threshold is fixed on the inner validation cases
        # (for the model and the baseline alike), then applied to the held-out ones.
        target = float(getattr(model, "target_sensitivity", 0.9))
        vy = val["label"].to_numpy()
        vb = pd.DataFrame(dm.split_records("val")).set_index("case_id").loc[val["case_id"], baseline]
        row["target_sensitivity"] = target
        for name, score, vscore in (("model", p, val["prob"].to_numpy()), (baseline, b, vb.to_numpy())):
            th = threshold_for_sensitivity(vscore, vy, target)["threshold"]
            frame[f"pred_{name}"] = score >= th if math.isfinite(th) else np.nan
            row[f"held_out_at_target_{name}"] = operating_points(score, y, [th])[0]
        row["held_out_at_configured_threshold"] = operating_points(
            p, y, [float(getattr(model, "threshold", 0.5))]
        )[0]
        folds.append(row)
        log.info("fold %d: AUC model %s vs %s %s (%d cases)", k, row["auc_model"], baseline,
                 row[f"auc_{baseline}"], row["n_cases"])  # fmt: skip
    allp = pd.concat(frames, ignore_index=True)
    report = summarise(allp, folds, baseline, opts)
    report["objective"] = report["pooled_auc_model"]
    report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    report["experiment"] = {
        "task_name": cfg.get("task_name"),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "trainer": {k: cfg.trainer.get(k) for k in ("max_epochs", "precision", "accelerator")},
        "seed": cfg.get("seed"),
    }
    write_csv(allp, out_dir / "cv_predictions.csv")
    write_json_and_markdown(out_dir, "cv_report", report, markdown_report)
    log.info("cross-validation report: %s", out_dir / "cv_report.md")
    return report


def summarise(
    allp: pd.DataFrame, folds: list[dict[str, Any]], baseline: str, opts: dict[str, Any]
) -> dict[str, Any]:
    """Mean/std over folds and pooled AUCs of model and baseline, plus the paired bootstrap."""

    def stats(key: str) -> dict[str, float | None]:
        vals = [f[key] for f in folds if f[key] is not None]
        if not vals:
            return {"mean": None, "std": None}
        return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}

    y = allp["label"].to_numpy()
    report: dict[str, Any] = {
        "n_folds": opts["n_folds"],
        "folds_run": opts["folds"],
        "checkpoint_selection": opts["checkpoint"],
        "seeds": opts["seeds"],
        "baseline": baseline,
        "n_cases": int(len(allp)),
        "n_malignant": int(y.sum()),
        "n_patients": int(allp["patient_id"].nunique()),
        "per_fold": folds,
        "mean_auc_model": stats("auc_model"),
        f"mean_auc_{baseline}": stats(f"auc_{baseline}"),
        "pooled_auc_model": binary_auroc(y, allp["prob"].to_numpy()),
        f"pooled_auc_{baseline}": binary_auroc(y, allp[baseline].to_numpy()),
    }
    wins = [
        f["auc_model"] > f[f"auc_{baseline}"]
        for f in folds
        if f["auc_model"] is not None and f[f"auc_{baseline}"] is not None
    ]
    report["folds_model_better"] = f"{sum(wins)}/{len(wins)}"
    for name in ("model", baseline):
        pred = allp[f"pred_{name}"].astype(float).to_numpy()
        report[f"pooled_at_target_{name}"] = {
            "sensitivity": float(np.nanmean(pred[y == 1])) if (y == 1).any() else None,
            "specificity": float(1.0 - np.nanmean(pred[y == 0])) if (y == 0).any() else None,
        }
    # DeLong's test (cases independent) and the patient-level paired bootstrap of medens.evaluation.statistics
    report["pooled_comparison"] = (
        paired_auc_comparison(y, allp["prob"].to_numpy(), allp[baseline].to_numpy(float),
                              allp["patient_id"].astype(str).to_numpy(), max(opts["bootstrap"], 1), 0)
        if len(np.unique(y)) == 2 and len(allp) >= 4 else None
    )  # fmt: skip
    return report


_SELECTION = {
    "best": "checkpoint with the best AUC on an inner validation split of each fold's training patients",
    "last": "weights at the end of training (inner validation split of the training patients: early "
    "stopping and thresholds only)",
}


def markdown_report(report: dict[str, Any]) -> str:
    """The report as a short Markdown page (per-fold table, summary, bootstrap)."""
    b = report["baseline"]
    lines = [
        f"# Cross-validation: {report.get('experiment', {}).get('task_name', '')}",
        "",
        f"{report['n_folds']}-fold, patient-grouped; {report['n_cases']} held-out cases "
        f"({report['n_malignant']} malignant) from {report['n_patients']} patients; "
        + _SELECTION[report["checkpoint_selection"]]
        + (
            f"; model = mean probability of {len(report['seeds'])} seeds {report['seeds']}."
            if report.get("seeds")
            else "."
        ),
        "",
        f"| fold | cases | malignant | AUC model | AUC {b} | epochs | seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in report["per_fold"]:
        lines.append(
            f"| {f['fold']} | {f['n_cases']} | {f['n_malignant']} | {fmt_num(f['auc_model'])} | "
            f"{fmt_num(f[f'auc_{b}'])} | {f['epochs']} | {f['seconds']} |"
        )
    m, mb = report["mean_auc_model"], report[f"mean_auc_{b}"]
    lines += [
        "",
        f"- mean AUC over folds: model {fmt_num(m['mean'])} (sd {fmt_num(m['std'])}), {b} {fmt_num(mb['mean'])} (sd {fmt_num(mb['std'])})",
        f"- pooled AUC (all held-out cases): model {fmt_num(report['pooled_auc_model'])}, "
        f"{b} {fmt_num(report[f'pooled_auc_{b}'])}",
        f"- folds where the model is better: {report['folds_model_better']}",
    ]
    pm, pb = report.get("pooled_at_target_model"), report.get(f"pooled_at_target_{b}")
    if pm and pb and report["per_fold"]:
        t = report["per_fold"][0].get("target_sensitivity", 0.9)
        lines.append(
            f"- at {t:.0%} sensitivity (threshold fixed on each fold's inner validation split), held-out "
            f"sensitivity / specificity: model {fmt_num(pm['sensitivity'])} / {fmt_num(pm['specificity'])}, "
            f"{b} {fmt_num(pb['sensitivity'])} / {fmt_num(pb['specificity'])}"
        )
    pc = report.get("pooled_comparison")
    if pc and "p_value" in (pc.get("delong") or {}):
        dl, bd = pc["delong"], pc["bootstrap_difference"]
        lines.append(
            f"- DeLong's test, pooled AUC model vs {b}: difference {dl['difference']:+.4f} (95% CI "
            f"[{dl['ci_low']:+.4f}, {dl['ci_high']:+.4f}]), z = {'n/a' if dl['z'] is None else format(dl['z'], '.3f')}, p = {dl['p_value']:.4g}; paired patient "
            f"bootstrap ({bd['n_resamples']} resamples, seed {bd['seed']}): [{bd['ci_low']:+.4f}, {bd['ci_high']:+.4f}], "
            f"share of resamples with no gain {fmt_num(bd.get('share_a_not_better'))}"
        )
    if "wall_seconds" in report:
        lines.append(f"- wall time: {report['wall_seconds']:.0f} s")
    return "\n".join(lines) + "\n"
