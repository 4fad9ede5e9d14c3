"""The segmenter's evaluation report: Dice per class and region and HD95 with patient-bootstrap 95%
intervals, `predictions.csv` (one row per case) and a self-contained `report.html` with the overlays."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from medens.evaluation.report_html import embed_png, fmt_ci, table, write_page
from medens.evaluation.statistics import PatientBootstrap, bootstrap_info, mean_intervals

log = logging.getLogger(__name__)
MAX_OVERLAYS = 12


def _patient(case_id: str, dm: Any) -> str:
    try:
        from medens.data.mri.brats import patient_id_from_case

        return patient_id_from_case(case_id, getattr(dm, "patient_id_pattern", None))
    except Exception:  # noqa: BLE001  (an unknown naming: the case is its own patient)
        return case_id


def add_intervals_and_report(
    cfg: DictConfig, report: dict[str, Any], rows: Sequence[Mapping[str, Any]], metric_keys: Sequence[str],
    dm: Any, out_dir: Path,
) -> None:  # fmt: skip
    """Adds `intervals` and `bootstrap` to `report`; writes predictions.csv and report.html."""
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
    frame = pd.DataFrame(
        [{"case_id": r["case_id"], "patient_id": r["patient_id"], "has_label": r.get("has_label"),
          "prediction": f"predictions/{r['case_id']}_pred.nii.gz", **{k: r.get(k) for k in keys},
          "inference_seconds": r.get("inference_seconds")} for r in rows]  # fmt: skip
    )
    frame.to_csv(out_dir / "predictions.csv", index=False)
    if bool(cfg.get("report_html", True)):
        write_segmentation_html(out_dir, report, keys)


def write_segmentation_html(out_dir: Path, report: Mapping[str, Any], keys: Sequence[str]) -> Path:
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
    case_rows = [[cid, *(("n/a" if v.get(k) is None else f"{v[k]:.3f}") for k in ("dice_wt", "dice_tc", "dice_et"))]
                 for cid, v in report.get("per_case", {}).items() if v.get("has_label")]  # fmt: skip
    if case_rows:
        sections.append(("Per case", table(["case", "Dice WT", "Dice TC", "Dice ET"], case_rows)))
    figs = sorted((out_dir / "figures").glob("*.png"))[:MAX_OVERLAYS]
    if figs:
        sections.append(("Overlays (top: ground truth, bottom: prediction)",
                         "".join(embed_png(p, p.stem, "900") for p in figs)))  # fmt: skip
    path = out_dir / "report.html"
    write_page(path, f"medens evaluation: mri {report['split']}", sections, intro)
    return path

