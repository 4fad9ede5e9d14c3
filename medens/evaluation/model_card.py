"""`model_card.md` beside every promoted version: what the model is for, what it was trained and evaluated
on, its metrics with intervals, subgroups, calibration and known limitations (after Mitchell et al.,
"Model Cards for Model Reporting", 2019, and the TRIPOD-AI / CLAIM items a reviewer checks).

Written from the version's metadata and, when the promotion was given one (`report=.../metrics.json`),
the evaluation report of the same file. A calibration stored beside the source checkpoint (same SHA-256)
is copied beside the version, so exports and serving of the version apply it too.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medens.utils.atomic import atomic_write_text
from medens.utils.jsonio import read_json_or_none

log = logging.getLogger(__name__)

INTENDED_USE = {
    "xray": "multi-label screening support for 14 thoracic findings on frontal chest radiographs (NIH "
    "ChestX-ray14 label set); ranking and triage of studies for a radiologist's review",
    "ct": "malignancy risk of a detected lung nodule (CT patch around a given nodule position); one input "
    "to a clinician's work-up, not a detector",
    "mri": "segmentation of glioma sub-regions (necrotic core, oedema, enhancing tumour) on multi-parametric "
    "brain MRI for volumetry and research",
    "ensemble": "patient-level risk from the combination of the X-ray, CT and MRI models",
}


def card_path(version_file: str | Path) -> Path:
    """`<versioned file stem>.model_card.md` beside the version (one card per version)."""
    p = Path(version_file)
    return p.with_name(p.stem + ".model_card.md")


def _ci(r: Mapping[str, Any] | None) -> str:
    if not r or r.get("value") is None:
        return "n/a"
    if r.get("ci_low") is None:
        return f"{r['value']:.3f}"
    return f"{r['value']:.3f} (95% CI {r['ci_low']:.3f}-{r['ci_high']:.3f})"


def _load_report(metadata: Mapping[str, Any], report: str | Path | None) -> dict[str, Any] | None:
    path = Path(report) if report else None
    if path is None:
        for v in (metadata.get("performance") or {}).values():
            if isinstance(v, dict) and v.get("report"):
                path = Path(v["report"])
    if path is None or not path.is_file():
        return None
    return read_json_or_none(path)


def render_model_card(metadata: Mapping[str, Any], report: Mapping[str, Any] | None) -> str:
    """The card as Markdown."""
    hyper = metadata.get("hyperparameters") or {}
    modality = str(metadata.get("modality") or "")
    net = (hyper.get("model") or {}).get("net") or {}
    contract = hyper.get("io_contract") or {}
    data = metadata.get("dataset") or {}
    perf = metadata.get("performance") or {}
    lines = [
        f"# Model card: {metadata.get('model_name')} v{metadata.get('version')}",
        "",
        "## Model details",
        f"- Modality: {modality}; architecture: {net.get('arch') or net.get('_target_') or 'see hyperparameters'}",
        f"- File: `{metadata.get('file')}`, SHA-256 `{metadata.get('sha256')}`",
        f"- Trained: {metadata.get('training_date')} ({metadata.get('epoch')} epochs); promoted "
        f"{metadata.get('promoted_at')} with medens {metadata.get('medens_version')}",
        f"- Outputs: {', '.join(contract.get('label_names') or []) or contract.get('output') or 'see io_contract'}",
        f"- Input: {contract.get('input_shape')}; preprocessing {json.dumps(contract.get('preprocessing'), default=str)}",
        "",
        "## Intended use",
        f"- {INTENDED_USE.get(modality, 'research use')}.",
        "- Research use only: not a medical device, not validated for clinical decisions.",
        "",
        "## Data",
        f"- Training data: {json.dumps(data, default=str)}",
        f"- Patient-level splits (seed {hyper.get('seed')}); "
        f"{len(contract.get('seen_patients') or []) or 'unrecorded number of'} training patients recorded in the "
        "checkpoint.",
        "",
        "## Metrics",
        f"- Validation (training's monitor {perf.get('monitor')}): best {perf.get('best_metric')}",
    ]
    limitations = []
    if report:
        lines.append(
            f"- Evaluation: split `{report.get('split')}` of `{report.get('data')}`, {report.get('n_cases')} cases"
            + (f" from {report['n_patients']} patients" if report.get("n_patients") else "")
        )
        iv = report.get("intervals") or {}
        b = report.get("bootstrap") or {}
        if "mean_auc" in iv:
            lines.append(f"- Mean AUC: {_ci(iv['mean_auc'])} ({b.get('method')}, {b.get('n_resamples')} resamples, "
                         f"seed {b.get('seed')})")  # fmt: skip
            lines += ["", "| output | AUC | average precision |", "|---|---|---|"]
            for name, r in (iv.get("per_output") or {}).items():
                lines.append(f"| {name} | {_ci(r.get('auc'))} | {_ci(r.get('average_precision'))} |")
        elif iv:
            lines += ["", "| metric | mean (95% CI) |", "|---|---|"]
            lines += [f"| {k} | {_ci(r)} |" for k, r in iv.items()]
        if (report.get("n_patients") or 0) < 100:
            limitations.append(f"evaluated on {report.get('n_patients') or report.get('n_cases')} patients only: "
                               "intervals are wide")  # fmt: skip
        if report.get("split") != "all" or str(report.get("data")) == str(data.get("root")):
            limitations.append("no external validation recorded (evaluation on the training dataset's own split)")
        sub = report.get("subgroups") or {}
        lines += ["", "## Subgroups"]
        if sub:
            for col, groups in sub.items():
                seg = any("metrics" in e for e in groups.values())  # a segmenter's: mean Dice WT per group
                parts = [f"{g}: " + ("too small" if e.get("too_small") else
                                     _ci((e.get("metrics") or {}).get("dice_wt") if seg else e.get("mean_auc")))
                         + f" (n={e.get('n_patients')})" for g, e in groups.items()]  # fmt: skip
                lines.append(f"- {col}" + (" (Dice WT)" if seg else " (mean AUC)") + ": " + "; ".join(parts))
                small = [g for g, e in groups.items() if e.get("too_small")]
                if small:
                    limitations.append(f"{col}: groups {small} too small to score")
        else:
            lines.append("- not evaluated (give `subgroups=[...]` to scripts/evaluate.py)")
            limitations.append("no subgroup analysis")
        cal = report.get("calibration") or {}
        lines += ["", "## Calibration"]
        for name, c in (cal.get("metrics") or {}).items():
            ece, brier = c.get("ece"), c.get("brier")
            lines.append(f"- {name}: ECE {'n/a' if ece is None else f'{ece:.3f}'}, "
                         f"Brier {'n/a' if brier is None else f'{brier:.3f}'}")  # fmt: skip
        applied = cal.get("applied")
        if cal.get("sampling"):
            lines.append(f"- Voxel-level, one-vs-rest per region, on {cal['sampling'].get('voxels')} sampled brain voxels")
        lines.append(f"- Post-hoc scaling: {applied['method']} ({applied['formula']})" if applied
                     else "- Post-hoc scaling: none (raw network probabilities)")  # fmt: skip
    else:
        lines.append("- No evaluation report was given at promotion (`report=.../metrics.json`)")
        limitations.append("no held-out evaluation attached to this version")
    if "synthetic" in json.dumps(data).lower():
        limitations.append("trained on synthetic data: not representative of any patient population")
    limitations.append("performance on other scanners, sites, populations and label definitions is unknown "
                       "until evaluated there (scripts/evaluate.py data.root=<folder> split=all)")  # fmt: skip
    lines += ["", "## Known limitations", *[f"- {item}" for item in limitations], ""]
    if metadata.get("notes"):
        lines += ["## Notes", str(metadata["notes"]), ""]
    return "\n".join(lines)


def write_model_card(version_file: str | Path, metadata: Mapping[str, Any], report: str | Path | None = None) -> Path:
    """Write the card beside the version and copy the source's calibration (if any) beside it."""
    from medens.evaluation.calibration import calibration_path, load_calibration

    version_file = Path(version_file)
    src = metadata.get("source")
    if src and Path(src).is_file():
        try:
            if load_calibration(src) is not None and not calibration_path(version_file).exists():
                shutil.copy2(calibration_path(src), calibration_path(version_file))
        except Exception as exc:  # noqa: BLE001  (a stale calibration is not the version's)
            log.warning("calibration of %s not copied to the version: %s", src, exc)
    path = card_path(version_file)
    return atomic_write_text(path, render_model_card(metadata, _load_report(metadata, report)))


def write_model_card_safely(version_file: str | Path, metadata: Mapping[str, Any], report: Any = None) -> None:
    """The promotion hook: a card that cannot be written is a warning, never an undone promotion."""
    try:
        log.info("model card: %s", write_model_card(version_file, metadata, report))
    except Exception as exc:  # noqa: BLE001
        log.warning("model card for %s not written: %s", version_file, exc)
