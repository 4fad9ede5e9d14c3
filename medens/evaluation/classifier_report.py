"""A classifier's evaluation as a journal reviewer wants it: every metric with a patient-bootstrap 95%
interval, calibration (ECE, Brier, reliability diagram, optional scaling), subgroups, and one
self-contained `report.html` beside `metrics.json` (strict JSON) and `predictions.csv`."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from medens.errors import ConfigError
from medens.evaluation import calibration as calib
from medens.evaluation.classification import auc_per_class, plot_pr_curves, plot_roc_curves
from medens.evaluation.external import SPLITS, all_cases_loader, case_attributes, case_table_path
from medens.evaluation.report_html import embed_png, fmt_ci, fmt_num, table, write_page
from medens.evaluation.statistics import PatientBootstrap, bootstrap_info, classification_intervals
from medens.evaluation.subgroups import check_columns, plot_forest, subgroup_metrics
from medens.utils.atomic import write_csv
from medens.utils.hashing import sha256_file
from medens.utils.jsonio import write_json_strict

log = logging.getLogger(__name__)


def bootstrap_options(cfg: DictConfig) -> tuple[int, int, float]:
    """(n_resamples, seed, level) from `bootstrap.*`, checked: errors name the key and the value."""
    boot = cfg.get("bootstrap") or {}
    out = []
    for key, kind, default, ok, allowed in (
        ("n_resamples", int, 2000, lambda v: v >= 1, "an integer >= 1"),
        ("seed", int, 0, lambda v: v >= 0, "an integer >= 0"),
        ("level", float, 0.95, lambda v: 0 < v < 1, "a number in (0, 1)"),
    ):
        raw = boot.get(key, default)
        try:
            value = kind(raw)
            if isinstance(raw, bool) or not ok(value):
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"bootstrap.{key}={raw!r}: must be {allowed}") from None
        out.append(value)
    return out[0], out[1], out[2]


def options(cfg: DictConfig) -> dict[str, Any]:
    """The evaluation's reporting options, checked before any work."""
    method = str(cfg.get("calibration") or "auto")
    if method not in calib.METHODS:
        raise ConfigError(f"calibration must be one of {list(calib.METHODS)}, got {method!r}")
    n, seed, level = bootstrap_options(cfg)
    try:
        min_patients = int(cfg.get("subgroup_min_patients", 10))
    except (TypeError, ValueError):
        raise ConfigError(f"subgroup_min_patients={cfg.get('subgroup_min_patients')!r}: must be an integer") from None
    subgroups = cfg.get("subgroups") or []
    subgroups = [subgroups] if isinstance(subgroups, str) else [str(s) for s in subgroups]
    bands = cfg.get("subgroup_bands") or {}
    return {
        "n_resamples": n,
        "seed": seed,
        "level": level,
        "calibration": method,
        "subgroups": subgroups,
        "bands": OmegaConf.to_container(bands, resolve=True) if OmegaConf.is_config(bands) else dict(bands),
        "min_patients": min_patients,
        "report_html": bool(cfg.get("report_html", True)),
    }


def _loader(dm: Any, split: str) -> Any:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {list(SPLITS)}, got {split!r}")
    dm.prepare_data()
    if split == "all":
        return all_cases_loader(dm, int(getattr(dm, "eval_batch_size", None) or getattr(dm, "batch_size", 16)))
    dm.setup("test")
    return dm.val_dataloader() if split == "val" else dm.test_dataloader()


def _calibration(cfg: DictConfig, opts: Mapping[str, Any], ckpt_path: Path, ckpt: dict, names: list[str],
                 own_val: Any) -> dict[str, Any] | None:  # fmt: skip
    """Fit (temperature|platt, on the checkpoint's own validation split) and store, or load (auto)."""
    from medens.evaluation.evaluate import predict_split

    method = opts["calibration"]
    if method == "none":
        return None
    if method == "auto":
        return calib.load_calibration(ckpt_path)
    model, dm = own_val()
    dm.prepare_data()
    dm.setup("fit")
    val = predict_split(model, dm.val_dataloader(), cfg.get("device", "cpu"))
    fitted = calib.fit_calibration(val["probs"], val["targets"], names, method)
    calib.save_calibration(ckpt_path, fitted, {"split": "val", "n_cases": len(val["case_ids"]),
                                               "data": str(getattr(dm, "root", ""))})  # fmt: skip
    return calib.load_calibration(ckpt_path, required=True)


def report_classifier(cfg: DictConfig, ckpt_path: Path, ckpt: dict[str, Any], model: Any, dm: Any,
                      hyper: dict[str, Any], out_dir: Path, own_val: Any) -> dict[str, Any]:  # fmt: skip
    """Predict the split, compute every metric with intervals, write metrics.json, predictions.csv,
    figures and report.html into `out_dir`. `own_val()` rebuilds (model, datamodule) on the checkpoint's
    own training data (for fitting a calibration on its validation split)."""
    from medens.evaluation.evaluate import binary_operating_table, predict_split

    t0 = time.perf_counter()
    opts = options(cfg)
    split = str(cfg.split)
    loader = _loader(dm, split)
    attrs = case_attributes(dm) if opts["subgroups"] else pd.DataFrame()
    table = case_table_path(cfg)  # data.case_table=<csv>: more columns to group by, joined on case/patient id
    if table is not None and opts["subgroups"]:
        pcol = next((c for c in ("patient_id", "Patient ID") if c in attrs.columns), None)
        ids = [str(i) for i in attrs.index]
        attrs = case_attributes(dm, table, ids, [str(p) for p in attrs[pcol]] if pcol else ids)
    where = str(getattr(dm, "root", ""))
    if opts["subgroups"]:
        check_columns(attrs, opts["subgroups"], where)  # before the (slow) prediction
    t_pred = time.perf_counter()
    pred = predict_split(model, loader, cfg.get("device", "cpu"))
    t_pred = time.perf_counter() - t_pred
    names = list(model.io_contract.get("label_names") or getattr(dm, "labels", []))
    if len(names) != pred["probs"].shape[1]:
        names = [f"output_{i}" for i in range(pred["probs"].shape[1])]
    raw = pred["probs"]
    cal = _calibration(cfg, opts, ckpt_path, ckpt, names, own_val)
    probs = calib.apply_calibration(raw, cal, names) if cal else raw
    targets = pred["targets"]

    report = auc_per_class(probs, targets, names)
    report.update(
        {
            "checkpoint": str(ckpt_path.resolve()),
            "checkpoint_sha256": sha256_file(ckpt_path),
            "checkpoint_epoch": ckpt.get("epoch"),
            "modality": hyper.get("modality"),
            "split": split,
            "n_cases": len(pred["case_ids"]),
            "n_patients": len(set(pred["patient_ids"])),
            "data": where,
        }
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    thresholds = [float(t) for t in (cfg.get("thresholds") or [0.5])]
    if probs.shape[1] == 1:  # binary (CT): sensitivity/specificity table
        op = binary_operating_table(ckpt, probs[:, 0], targets[:, 0], cfg.get("thresholds"))
        report["operating_points"] = op
        write_csv(pd.DataFrame(op), out_dir / "operating_points.csv")
        thresholds = [r["threshold"] for r in op[:-1] if r["source"] != "grid"] + (
            [float(t) for t in cfg.get("thresholds")] if cfg.get("thresholds") else [0.5]
        )
        thresholds = list(dict.fromkeys(round(t, 6) for t in thresholds))
    boot = PatientBootstrap(pred["patient_ids"], opts["n_resamples"], opts["seed"], opts["level"],
                            what=f"{split} of {where}")  # fmt: skip
    report["bootstrap"] = bootstrap_info(opts["n_resamples"], opts["seed"], opts["level"])
    report["intervals"] = classification_intervals(probs, targets, names, boot, thresholds)
    report["calibration"] = {
        "applied": None if not cal else {k: cal[k] for k in ("method", "formula", "outputs", "fitted_on")},
        "file": str(calib.calibration_path(ckpt_path)) if cal else None,
        "metrics": {k: {kk: vv for kk, vv in v.items() if kk != "bins"} | {"bins": v["bins"]}
                    for k, v in calib.calibration_summary(probs, targets, names).items()},  # fmt: skip
    }
    if cal:
        report["calibration"]["uncalibrated"] = {
            k: {"ece": v["ece"], "brier": v["brier"]} for k, v in calib.calibration_summary(raw, targets, names).items()
        }
    if opts["subgroups"]:
        report["subgroups"] = subgroup_metrics(
            probs, targets, names, pred["case_ids"], pred["patient_ids"], attrs, opts["subgroups"], where,
            opts["bands"], opts["min_patients"], opts["n_resamples"], opts["seed"],
        )  # fmt: skip
        report["subgroup_min_patients"] = opts["min_patients"]
    title = f"{hyper.get('modality', '')} {split}: mean AUC {report['mean_auc'] or float('nan'):.3f}"
    figs = {
        "ROC curves": plot_roc_curves(probs, targets, names, out_dir / "roc_curves.png", title=title),
        "Precision-recall curves": plot_pr_curves(probs, targets, names, out_dir / "pr_curves.png"),
        "Reliability diagram": calib.plot_reliability(probs, targets, names, out_dir / "reliability.png"),
    }
    if report.get("subgroups"):
        forest = plot_forest(report["subgroups"], report["intervals"]["mean_auc"], out_dir / "subgroups_forest.png")
        if forest:
            figs["Subgroups (forest plot)"] = forest
    frame = pd.DataFrame(probs, columns=[f"prob_{n}" for n in names])
    frame.insert(0, "case_id", pred["case_ids"])
    frame.insert(1, "patient_id", pred["patient_ids"])
    for i, n in enumerate(names):
        frame[f"target_{n}"] = targets[:, i]
    if cal:
        for i, n in enumerate(names):
            frame[f"uncalibrated_prob_{n}"] = raw[:, i]
    write_csv(frame, out_dir / "predictions.csv")
    if opts["report_html"]:
        write_classifier_html(out_dir / "report.html", report, names, figs)
    # timing: network inference vs everything else (intervals, calibration, subgroups, figures, files)
    report["timing_seconds"] = {"prediction": round(t_pred, 2),
                                "report": round(time.perf_counter() - t0 - t_pred, 2)}  # fmt: skip
    write_json_strict(out_dir / "metrics.json", report)
    log.info("mean AUC %s on %d %s cases (%d patients) -> %s", fmt_ci(report["intervals"]["mean_auc"]),
             report["n_cases"], split, report["n_patients"], out_dir)  # fmt: skip
    return report


def write_classifier_html(path: Path, report: Mapping[str, Any], names: list[str], figs: Mapping[str, Path]) -> Path:
    """report.html: summary, per-output table with intervals, operating points, calibration, subgroups."""
    iv = report["intervals"]
    b = report["bootstrap"]
    intro = (
        f"Checkpoint <code>{report['checkpoint']}</code> (SHA-256 {report['checkpoint_sha256'][:16]}..., epoch "
        f"{report.get('checkpoint_epoch')}); data <code>{report['data']}</code>, split <b>{report['split']}</b>: "
        f"{report['n_cases']} cases from {report['n_patients']} patients. Intervals: {b['level']:.0%} "
        f"{b['method']}, {b['n_resamples']} resamples, seed {b['seed']}. Mean AUC "
        f"<b>{fmt_ci(iv['mean_auc'])}</b>."
    )
    cal_metrics = report["calibration"]["metrics"]
    rows = []
    for n in names:
        r = iv["per_output"][n]
        rows.append([n, r["positives"], r["negatives"], fmt_ci(r["auc"]), fmt_ci(r["average_precision"]),
                     fmt_num(cal_metrics[n]["ece"]), fmt_num(cal_metrics[n]["brier"])])  # fmt: skip
    sections = [("Discrimination and calibration per output",
                 table(["output", "positives", "negatives", "AUC [95% CI]", "average precision [95% CI]", "ECE",
                        "Brier"], rows))]  # fmt: skip
    op_rows = []
    for n in names:
        for t in iv["per_output"][n]["thresholds"]:
            op_rows.append([n, f"{t['threshold']:.4g}", fmt_ci(t["sensitivity"]), fmt_ci(t["specificity"])])
    sections.append(("Sensitivity and specificity at the reported thresholds",
                     table(["output", "threshold", "sensitivity [95% CI]", "specificity [95% CI]"], op_rows)))
    applied = report["calibration"]["applied"]
    if applied:
        par = [[k, f"{v['scale']:.4g}", f"{v['bias']:.4g}"] for k, v in applied["outputs"].items()]
        sections.append(("Calibration applied", f"<p>{applied['method']} scaling fitted on "
                         f"{applied.get('fitted_on')}: {applied['formula']}</p>" + table(["output", "scale", "bias"], par)))  # fmt: skip
    for col, groups in (report.get("subgroups") or {}).items():
        g_rows = [[g, e["n_patients"], e["n_cases"],
                   "too small (" + e.get("reason", "") + ")" if e["too_small"] else fmt_ci(e["mean_auc"])]
                  for g, e in groups.items()]  # fmt: skip
        sections.append((f"Subgroups: {col}", table([col, "patients", "cases", "mean AUC [95% CI]"], g_rows)))
    for title, p in figs.items():
        sections.append((title, embed_png(p, title, "720")))
    return write_page(path, f"medens evaluation: {report.get('modality') or ''} {report['split']}", sections, intro)


