"""The stacking stage's report: each base model, the weighted average and the meta-learner on the
same held-out cases, per target AUC with patient-bootstrap 95% intervals, ROC curves, Markdown/HTML."""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from medens.evaluation.classification import save_figure
from medens.evaluation.report_html import table, write_page
from medens.metrics.classification import binary_auroc
from medens.utils.atomic import atomic_write_text
from medens.utils.jsonio import write_json_strict

log = logging.getLogger(__name__)


def plot_roc(y: Mapping[str, np.ndarray], scores: Mapping[str, Mapping[str, np.ndarray]], path: Path) -> None:
    """One panel per target, one curve per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(y)
    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4.6), squeeze=False)
    for ax, t in zip(axes[0], targets, strict=True):
        for method, s in scores[t].items():
            ok = np.isfinite(y[t]) & np.isfinite(s)
            auc = binary_auroc(y[t], s)
            if auc is not None:
                fpr, tpr, _ = roc_curve(y[t][ok], s[ok])
                ax.plot(fpr, tpr, lw=2.2 if method == "meta_learner" else 1.3, label=f"{method} ({auc:.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(title=t, xlabel="1 - specificity", ylabel="sensitivity")
        ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path, dpi=110)


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _fmt(r: Mapping[str, Any]) -> str:
    if r.get("auc") is None or not math.isfinite(r["auc"]):
        return "n/a"
    lo, hi = _num(r.get("ci_low")), _num(r.get("ci_high"))
    return f"{r['auc']:.3f} [{lo:.3f}, {hi:.3f}]"


def _comparison_lines(summary: Mapping[str, Any]) -> list[str]:
    """'Ensemble vs best single model' per target: DeLong p-value and paired bootstrap interval."""
    lines = []
    best = summary["best_single"]["method"]
    for t, per in (summary.get("vs_best_single") or {}).items():
        for m, c in per.items():
            bd, dl = c["bootstrap_difference"], c.get("delong") or {}
            p = dl.get("p_value")
            lines.append(
                f"- {t}: {m} - {best}: AUC difference {_num(bd['value']):+.3f}, paired patient bootstrap 95% CI "
                f"[{_num(bd['ci_low']):+.3f}, {_num(bd['ci_high']):+.3f}], DeLong p = "
                + ("n/a" if p is None else f"{p:.3g}")
            )
    return lines


def write_report(out_dir: Path, summary: Mapping[str, Any]) -> dict[str, Path]:
    """`report.json`, `report.md` and `report.html` from the summary built by the report callback."""
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = summary["methods"]
    targets = summary["targets"]
    lines = [
        "# Stacking ensemble report",
        "",
        f"Held-out cases: {summary['n_test']} patients (split `test`, never seen by a base model or the "
        f"meta-learner's training); AUC with patient-bootstrap 95% intervals ({summary['n_bootstrap']} resamples).",
        "",
        "| method | " + " | ".join(targets) + " | mean AUC |",
        "|---" * (len(targets) + 2) + "|",
    ]
    for m in methods:
        row = summary["auc"][m]
        lines.append(
            f"| {m} | " + " | ".join(_fmt(row[t]) for t in targets) + f" | {_num(summary['mean_auc'][m]):.3f} |"
        )
    best = summary["best_single"]
    lines += [
        "",
        f"Best single modality: **{best['method']}** (mean AUC {_num(best['mean_auc']):.3f}). "
        f"Meta-learner: **{_num(summary['mean_auc']['meta_learner']):.3f}** "
        f"({_num(summary['gain_over_best_single']):+.3f}); weighted average: "
        f"{_num(summary['mean_auc']['weighted_average']):.3f}.",
        "",
        "Ensemble vs best single model on the same patients (same bootstrap resamples):",
        "",
        *_comparison_lines(summary),
        "",
        "Base-model scores per target (what each single modality contributes, and what the weighted "
        "average combines): " + "; ".join(f"{k}: {v}" for k, v in summary["sources"].items()) + ".",
        "",
        f"Missing modalities among held-out cases: {summary['missing_test']}.",
        "",
        f"Weighted-average weights ({summary['weighted_average']['objective']}): "
        + "; ".join(
            f"{t}: " + ", ".join(f"{m} {w:.2f}" for m, w in v["weights"].items())
            for t, v in summary["weighted_average"]["targets"].items()
        ),
        "",
        "![ROC curves](roc_curves.png)",
        "",
    ]
    if summary.get("oracle_auc"):
        lines.insert(-2, "Ceiling (the hidden disease state the synthetic cohort was drawn from): "
                     + ", ".join(f"{t} {v:.3f}" for t, v in summary["oracle_auc"].items()) + ".")  # fmt: skip
        lines.insert(-2, "")
    md = "\n".join(lines)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "html": out_dir / "report.html"}
    write_json_strict(paths["json"], summary)
    atomic_write_text(paths["md"], md)
    rows = [[m, *(_fmt(summary["auc"][m][t]) for t in targets), f"{_num(summary['mean_auc'][m]):.3f}"] for m in methods]
    body = (table(["method", *targets, "mean AUC"], rows)
            + f"<p>Meta-learner vs best single modality ({html.escape(best['method'])}): "
            f"{_num(summary['gain_over_best_single']):+.3f} mean AUC.</p>"
            + "".join(f"<p>{html.escape(line[2:])}</p>" for line in _comparison_lines(summary))
            + "<img src='roc_curves.png' width='100%'>")  # fmt: skip
    write_page(paths["html"], "Stacking ensemble report", [("AUC [95% CI]", body)],
               f"{summary['n_test']} held-out patients")  # fmt: skip
    return paths
