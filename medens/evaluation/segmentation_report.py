"""The segmenter's evaluation report: Dice per class and region and HD95 with patient-bootstrap 95%
intervals, `predictions.csv` (one row per case: case id, patient id, Dice and HD95 per region),
voxel-level calibration per region (`voxel_calibration.py`), subgroups by any column of the dataset's own
case table (patient id; `grade` from BraTS 2015-2018 `HGG/`/`LGG/` folders) or of `data.case_table=<csv>`,
and a self-contained `report.html` with the overlays.

    scripts/evaluate.py ckpt_path=saved_models/mri/unet_best.pth [calibration=temperature]
        [data.case_table=survival_info.csv subgroups=[Age,Extent_of_Resection] subgroup_min_patients=10]
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from medens.data.mri.brats import REGIONS
from medens.errors import ConfigError
from medens.evaluation.report_html import embed_png, fmt_ci, fmt_num, table, write_page
from medens.evaluation.statistics import PatientBootstrap, bootstrap_info, mean_intervals
from medens.evaluation.subgroups import check_columns, segmentation_subgroup_metrics
from medens.evaluation.voxel_calibration import (
    DEFAULT_VOXELS,
    VoxelSample,
    calibration_document,
    fit_temperature,
    reliability_report,
    temperature_of,
)
from medens.utils.atomic import write_csv

log = logging.getLogger(__name__)
MAX_OVERLAYS = 12


def _patient(case_id: str, dm: Any) -> str:
    try:
        from medens.data.mri.brats import patient_id_from_case

        return patient_id_from_case(case_id, getattr(dm, "patient_id_pattern", None))
    except Exception:  # noqa: BLE001  (an unknown naming: the case is its own patient)
        return case_id


@dataclass
class ReportInputs:
    """What the report needs besides the per-case metrics: the voxel sample for calibration (filled by the
    evaluation loop, `sample.add(case_id, logits, label, image)`), the options, and the case table."""

    options: dict[str, Any]
    sample: VoxelSample
    attrs: pd.DataFrame = field(default_factory=pd.DataFrame)
    case_table: Path | None = None


def prepare_report(cfg: DictConfig, dm: Any) -> ReportInputs:
    """Options checked and the case table's columns checked against `subgroups` before any prediction."""
    from medens.evaluation.classifier_report import options
    from medens.evaluation.external import case_attributes, case_table_path

    opts = options(cfg)
    opts["voxels_per_case"] = int(cfg.get("calibration_voxels_per_case") or DEFAULT_VOXELS)
    sample = VoxelSample(opts["voxels_per_case"], opts["seed"])
    table = case_table_path(cfg)
    attrs = pd.DataFrame()
    if opts["subgroups"] or table is not None:
        ids = dm.split_case_ids("all")
        attrs = case_attributes(dm, table, ids, [_patient(c, dm) for c in ids])
        if opts["subgroups"]:
            check_columns(attrs, opts["subgroups"], str(table or getattr(dm, "root", "")))
    return ReportInputs(opts, sample, attrs, table)


def add_intervals_and_report(
    cfg: DictConfig, report: dict[str, Any], rows: Sequence[Mapping[str, Any]], metric_keys: Sequence[str],
    dm: Any, out_dir: Path, inputs: ReportInputs | None = None, ckpt: Mapping[str, Any] | None = None,
    ckpt_path: Path | None = None,
) -> None:  # fmt: skip
    """Adds `intervals`, `bootstrap`, `calibration` and `subgroups` to `report`; writes predictions.csv,
    the reliability diagram and report.html."""
    from medens.evaluation.classifier_report import bootstrap_options

    n, seed, level = bootstrap_options(cfg)
    labelled = [r for r in rows if r.get("has_label")]
    for r in rows:
        r.setdefault("patient_id", _patient(str(r["case_id"]), dm))  # type: ignore[union-attr]
    keys = [k for k in metric_keys if not k.endswith("_undefined")]
    if len(labelled) >= 2 and len({r["patient_id"] for r in labelled}) >= 2:
        boot = PatientBootstrap([r["patient_id"] for r in labelled], n, seed, level, what="labelled cases")
        values = {k: np.array([np.nan if r.get(k) is None else float(r[k]) for r in labelled]) for k in keys}
        report["intervals"] = mean_intervals(values, boot)
        report["bootstrap"] = bootstrap_info(n, seed, level)
    else:
        report["intervals"] = None
        report["bootstrap"] = {"skipped": f"{len(labelled)} labelled case(s): an interval needs two patients"}
        if labelled:
            log.warning("no confidence intervals: %s", report["bootstrap"]["skipped"])
    figs: dict[str, Path] = {}
    if inputs is not None:
        if ckpt_path is not None:
            report["calibration"], fig = mri_calibration(cfg, inputs, ckpt, ckpt_path, dm, out_dir)
            if fig is not None:
                figs["Reliability diagram (sampled brain voxels)"] = fig
        if inputs.options["subgroups"] and labelled:
            o = inputs.options
            values = {k: np.array([np.nan if r.get(k) is None else float(r[k]) for r in labelled]) for k in keys}
            report["subgroups"] = segmentation_subgroup_metrics(
                values, [r["case_id"] for r in labelled], [r["patient_id"] for r in labelled], inputs.attrs,
                o["subgroups"], str(inputs.case_table or report.get("data", "")), o["bands"], o["min_patients"],
                n, seed, level,
            )  # fmt: skip
            report["subgroup_min_patients"] = o["min_patients"]
    frame = pd.DataFrame(
        [{"case_id": r["case_id"], "patient_id": r["patient_id"], "has_label": r.get("has_label"),
          "prediction": f"predictions/{r['case_id']}_pred.nii.gz", **{k: r.get(k) for k in keys},
          "inference_seconds": r.get("inference_seconds")} for r in rows]  # fmt: skip
    )
    if inputs is not None and len(inputs.attrs.columns):
        extra = inputs.attrs.drop(columns=[c for c in inputs.attrs.columns if c in frame.columns])
        frame = frame.join(extra, on="case_id")
    write_csv(frame, out_dir / "predictions.csv")
    if bool(cfg.get("report_html", True)):
        write_segmentation_html(out_dir, report, keys, frame, figs)


def mri_calibration(
    cfg: DictConfig, inputs: ReportInputs, ckpt: Mapping[str, Any] | None, ckpt_path: Path, dm: Any,
    out_dir: Path,
) -> tuple[dict[str, Any], Path | None]:  # fmt: skip
    """Voxel-level ECE/Brier/bins per region of the evaluated cases, with the checkpoint's temperature
    applied (fitted now on its own validation split with `calibration=temperature`, loaded with `auto`)."""
    from medens.evaluation import calibration as calib

    method = inputs.options["calibration"]
    if method == "platt":
        raise ConfigError("calibration=platt is for classifiers; a segmenter takes calibration=temperature")
    sample = inputs.sample
    regions = REGIONS
    names = [r.upper() for r in regions]
    doc = None
    if method == "temperature":
        doc = fit_mri_temperature(cfg, inputs, ckpt, ckpt_path)
    elif method == "auto":
        doc = calib.load_calibration(ckpt_path)
    temperature = temperature_of(doc)
    out: dict[str, Any] = {"sampling": sample.describe(), "regions": {k.upper(): list(v) for k, v in regions.items()},
                           "applied": None, "file": None}  # fmt: skip
    if doc:
        out["applied"] = {k: doc.get(k) for k in ("method", "kind", "formula", "temperature", "fitted_on")}
        out["file"] = str(calib.calibration_path(ckpt_path))
    if not len(sample):
        out["metrics"] = None
        out["skipped"] = "no labelled case: voxel calibration needs ground truth"
        return out, None
    probs, targets, summary = reliability_report(sample, regions, temperature)
    out["metrics"] = summary
    if doc:
        raw = reliability_report(sample, regions, 1.0)[2]
        out["uncalibrated"] = {k: {"ece": v["ece"], "brier": v["brier"]} for k, v in raw.items()}
    fig = calib.plot_reliability(probs, targets, names, out_dir / "reliability.png",
                                 title=f"Voxel reliability ({len(sample)} brain voxels, {sample.n_cases} cases)")  # fmt: skip
    return out, fig


def fit_mri_temperature(
    cfg: DictConfig, inputs: ReportInputs, ckpt: Mapping[str, Any] | None, ckpt_path: Path
) -> dict[str, Any]:
    """Fit the softmax temperature on the sampled voxels of the checkpoint's own validation split (its
    training data and split, whatever data this evaluation reads) and store it beside the checkpoint."""
    from medens.evaluation import calibration as calib
    from medens.evaluation.evaluate import build_from_checkpoint
    from medens.evaluation.predict import predict_each_batch

    if ckpt is None:
        raise ConfigError(f"{ckpt_path}: calibration=temperature needs the checkpoint to fit on its validation split")
    model, dm, _ = build_from_checkpoint(dict(ckpt), ckpt_path, None)
    dm.prepare_data()
    dm.setup("fit")
    val = VoxelSample(inputs.options["voxels_per_case"], inputs.options["seed"])

    def sample(batch: dict[str, Any], pred: dict[str, Any], _seconds: float) -> None:
        if "label" in batch:
            for i, cid in enumerate(batch["case_id"]):
                val.add(cid, pred["logits"][i], batch["label"][i, 0], batch["image"][i])

    predict_each_batch(model, dm.val_dataloader(), sample, str(cfg.get("device", "cpu")))
    if not len(val):
        raise ConfigError(f"{ckpt_path}: calibration=temperature: the checkpoint's validation split has no labelled case")
    fitted = fit_temperature(val.logits, val.labels)
    doc = calibration_document(fitted, [r.upper() for r in REGIONS])
    calib.save_calibration(ckpt_path, doc, {"split": "val", "data": str(getattr(dm, "root", "")), **val.describe()})
    log.info("MRI softmax temperature %.4f fitted on %d validation voxels (%d cases); NLL %.4f -> %.4f",
             fitted["temperature"], len(val), val.n_cases, fitted["nll_before"], fitted["nll_after"])  # fmt: skip
    return calib.load_calibration(ckpt_path, required=True)  # type: ignore[return-value]


def write_segmentation_html(
    out_dir: Path, report: Mapping[str, Any], keys: Sequence[str], frame: pd.DataFrame | None = None,
    figs: Mapping[str, Path] | None = None,
) -> Path:  # fmt: skip
    iv = report.get("intervals") or {}
    mean = report.get("mean") or {}
    b = report.get("bootstrap") or {}
    intro = (
        f"Checkpoint <code>{report['checkpoint']}</code> (SHA-256 {report['checkpoint_sha256'][:16]}...); data "
        f"<code>{report['data']}</code>, split <b>{report['split']}</b>: {report['n_cases']} cases, "
        f"{report['n_labelled']} with ground truth. "
        + (f"Intervals: {b['level']:.0%} {b['method']}, {b['n_resamples']} resamples, seed {b['seed']}."
           if "method" in b else b.get("skipped", ""))  # fmt: skip
    )
    rows = []
    for k in keys:
        r = iv.get(k)
        value = fmt_ci(r) if r else ("n/a" if mean.get(k) is None else f"{mean[k]:.3f}")
        rows.append([k, value])
    sections = [("Dice per class and region, HD95 (mm) [95% CI]", table(["metric", "mean [95% CI]"], rows))]
    case_keys = [k for k in ("dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc", "hd95_et") if k in keys]
    if frame is not None and "has_label" in frame:
        labelled = frame[frame["has_label"].astype(bool)]
        case_rows = [[r["case_id"], r["patient_id"], *(fmt_num(r.get(k), 3) for k in case_keys)]
                     for _, r in labelled.iterrows()]  # fmt: skip
    else:
        case_rows = [[cid, v.get("patient_id", ""), *(fmt_num(v.get(k), 3) for k in case_keys)]
                     for cid, v in report.get("per_case", {}).items() if v.get("has_label")]  # fmt: skip
    if case_rows:
        header = ["case", "patient", *(k.replace("dice_", "Dice ").replace("hd95_", "HD95 ").upper() for k in case_keys)]
        sections.append(("Per case (HD95 in mm)", table(header, case_rows)))
    cal = report.get("calibration") or {}
    if cal.get("metrics"):
        smp = cal["sampling"]
        applied = cal.get("applied")
        text = (f"<p>One-vs-rest region probabilities from the softmax, on {smp['voxels']} brain voxels of "
                f"{smp['cases']} labelled cases (at most {smp['voxels_per_case']} per case, {smp['where']}, "
                f"seed {smp['seed']}). "
                + (f"Applied: softmax temperature {applied['temperature']:.4g} fitted on {applied.get('fitted_on', {}).get('split')} "
                   "(the label map and Dice do not change)." if applied else "No calibration applied.")
                + "</p>")  # fmt: skip
        unc = cal.get("uncalibrated") or {}
        c_rows = [[r, v["n"], fmt_num(v["ece"], 4), fmt_num(v["brier"], 4),
                   *([fmt_num(unc[r]["ece"], 4), fmt_num(unc[r]["brier"], 4)] if unc else [])]
                  for r, v in cal["metrics"].items()]  # fmt: skip
        head = ["region", "voxels", "ECE", "Brier", *(["ECE uncalibrated", "Brier uncalibrated"] if unc else [])]
        sections.append(("Voxel calibration per region", text + table(head, c_rows)))
    for col, groups in (report.get("subgroups") or {}).items():
        g_keys = [k for k in ("dice_wt", "dice_tc", "dice_et", "hd95_wt") if k in keys]
        g_rows = [[g, e["n_patients"], e["n_cases"],
                   *(["too small (" + e.get("reason", "") + ")"] + [""] * (len(g_keys) - 1) if e["too_small"]
                     else [fmt_ci(e["metrics"].get(k)) for k in g_keys])] for g, e in groups.items()]  # fmt: skip
        sections.append((f"Subgroups: {col} (minimum {report.get('subgroup_min_patients')} patients)",
                         table([col, "patients", "cases", *(k.upper() + " [95% CI]" for k in g_keys)], g_rows)))  # fmt: skip
    for title, p in (figs or {}).items():
        sections.append((title, embed_png(p, title, "620")))
    figs = sorted((out_dir / "figures").glob("*.png"))[:MAX_OVERLAYS]
    if figs:
        sections.append(("Overlays (top: ground truth, bottom: prediction)",
                         "".join(embed_png(p, p.stem, "900") for p in figs)))  # fmt: skip
    path = out_dir / "report.html"
    write_page(path, f"medens evaluation: mri {report['split']}", sections, intro)
    return path

