"""Paired comparison of two models on the same cases (`scripts/compare.py a=... b=...`).

Each side is a checkpoint (evaluated here, with the same `split`/`data.*` options) or a
`predictions.csv` written by `scripts/evaluate.py` (or `cv_predictions.csv` of cross-validation).
Classifiers: per output, the AUC difference with DeLong's test and a paired patient-bootstrap interval
(the same resamples for both models). Segmenters: per Dice key, the per-case difference with a paired
bootstrap interval and the Wilcoxon signed-rank test. The two sides must hold exactly the same cases
(and the same labels): anything else is an error naming the unmatched ids.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict

from medens.errors import ConfigError, DataError
from medens.evaluation.statistics import bootstrap_info, paired_auc_comparison, paired_dice_comparison
from medens.utils.atomic import atomic_write_text
from medens.utils.jsonio import write_json_strict

log = logging.getLogger(__name__)
DICE_PREFIX = "dice_"


def _evaluate_side(cfg: DictConfig, ckpt: Path, out_dir: Path) -> Path:
    """Evaluate a checkpoint with the comparison's data options; returns its predictions.csv."""
    from medens.evaluation.evaluate import evaluate

    ecfg = OmegaConf.create(
        {
            "ckpt_path": str(ckpt), "split": cfg.get("split", "test"), "device": cfg.get("device", "cpu"),
            "seed": None, "thresholds": None, "bootstrap": OmegaConf.to_container(cfg.bootstrap),
            "calibration": cfg.get("calibration", "auto"), "subgroups": [], "subgroup_bands": {},
            "subgroup_min_patients": 10, "report_html": False, "paths": {"output_dir": str(out_dir)},
        }
    )  # fmt: skip
    if cfg.get("data") is not None:
        with open_dict(ecfg):
            ecfg.data = cfg.data
    evaluate(ecfg)
    return out_dir / "predictions.csv"


def read_predictions(path: str | Path) -> tuple[pd.DataFrame, str]:
    """(frame indexed by case_id with patient_id and per-output prob_/target_ or dice_ columns, kind)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found")
    df = pd.read_csv(path, dtype={"case_id": str, "patient_id": str})
    if "case_id" not in df.columns:
        raise DataError(f"{path}: no case_id column (columns: {list(df.columns)})")
    if "prob" in df.columns and "label" in df.columns:  # cross-validation's cv_predictions.csv
        df = df.rename(columns={"prob": "prob_malignant", "label": "target_malignant"})
    if "patient_id" not in df.columns:
        df["patient_id"] = df["case_id"]
    dup = df["case_id"].duplicated()
    if dup.any():
        raise DataError(f"{path}: case_id {df.loc[dup, 'case_id'].iloc[0]!r} appears twice")
    df = df.set_index("case_id")
    if any(c.startswith("prob_") and not c.startswith("uncalibrated") for c in df.columns):
        return df, "classification"
    if any(c.startswith(DICE_PREFIX) for c in df.columns):
        return df, "segmentation"
    raise DataError(f"{path}: neither prob_<output> nor dice_<key> columns (columns: {list(df.columns)})")


def _match(a: pd.DataFrame, b: pd.DataFrame, name_a: str, name_b: str) -> list[str]:
    only_a = sorted(set(a.index) - set(b.index))
    only_b = sorted(set(b.index) - set(a.index))
    if only_a or only_b:
        raise DataError(
            f"compare: the two predictions hold different cases: {len(only_a)} only in a ({name_a}): "
            f"{only_a[:10]}{' ...' if len(only_a) > 10 else ''}; {len(only_b)} only in b ({name_b}): "
            f"{only_b[:10]}{' ...' if len(only_b) > 10 else ''}"
        )
    return sorted(a.index)


def compare_frames(a: pd.DataFrame, b: pd.DataFrame, kind: str, n_resamples: int, seed: int,
                   name_a: str = "a", name_b: str = "b", outputs: Any = None) -> dict[str, Any]:  # fmt: skip
    """The comparison of two prediction frames of the same cases."""
    ids = _match(a, b, name_a, name_b)
    a, b = a.loc[ids], b.loc[ids]
    pids = a["patient_id"].astype(str).to_numpy()
    result: dict[str, Any] = {"kind": kind, "n_cases": len(ids), "n_patients": len(set(pids)),
                              "bootstrap": bootstrap_info(n_resamples, seed)}  # fmt: skip
    if kind == "classification":
        names = [c[5:] for c in a.columns if c.startswith("prob_")]
        names = [n for n in names if f"prob_{n}" in b.columns and f"target_{n}" in a.columns]
        if outputs:
            missing = [o for o in outputs if o not in names]
            if missing:
                raise ConfigError(f"compare: outputs {missing} not in both files (common: {names})")
            names = list(outputs)
        if not names:
            raise DataError(f"compare: {name_a} and {name_b} share no output")
        per = {}
        for n in names:
            ya, yb = a[f"target_{n}"].to_numpy(float), b.get(f"target_{n}", a[f"target_{n}"]).to_numpy(float)
            both = np.isfinite(ya) & np.isfinite(yb)
            if not np.array_equal(ya[both], yb[both]):
                bad = [i for i, x, y in zip(ids, ya, yb, strict=True) if np.isfinite(x) and np.isfinite(y) and x != y]
                raise DataError(f"compare: output {n!r}: the files disagree on the label of case(s) {bad[:10]}")
            y = np.where(np.isfinite(ya), ya, yb)
            ok = np.isfinite(y)
            if ok.sum() < 4 or len(np.unique(y[ok])) < 2:
                per[n] = {"skipped": "fewer than two classes among the labelled cases"}
                continue
            per[n] = paired_auc_comparison(y[ok], a[f"prob_{n}"].to_numpy(float)[ok],
                                           b[f"prob_{n}"].to_numpy(float)[ok], pids[ok], n_resamples, seed)  # fmt: skip
        result["outputs"] = per
    else:
        keys = [c for c in a.columns if c.startswith(DICE_PREFIX) and c in b.columns]
        result["dice"] = {
            k: paired_dice_comparison(a[k].to_numpy(float), b[k].to_numpy(float), ids, pids, n_resamples, seed)
            for k in keys
        }
    return result


def markdown(result: Mapping[str, Any], a: str, b: str) -> str:
    lines = [f"# Paired comparison: a = {a}, b = {b}", "",
             f"{result['n_cases']} cases from {result['n_patients']} patients; intervals: "
             f"{result['bootstrap']['method']}, {result['bootstrap']['n_resamples']} resamples.", ""]  # fmt: skip

    def f(v: Any, spec: str = "+.4f") -> str:
        return "n/a" if v is None else format(v, spec)

    if result["kind"] == "classification":
        lines += ["| output | AUC a | AUC b | a - b [95% bootstrap CI] | DeLong p |", "|---|---:|---:|---:|---:|"]
        for n, r in result["outputs"].items():
            if "skipped" in r:
                lines.append(f"| {n} | | | {r['skipped']} | |")
                continue
            d, dl = r["bootstrap_difference"], r["delong"]
            lines.append(f"| {n} | {f(r['auc_a']['value'], '.4f')} | {f(r['auc_b']['value'], '.4f')} | "
                         f"{f(d['value'])} [{f(d['ci_low'])}, {f(d['ci_high'])}] | {f(dl.get('p_value'), '.4g')} |")  # fmt: skip
    else:
        lines += ["| Dice | mean a - b [95% CI] | Wilcoxon p | cases |", "|---|---:|---:|---:|"]
        for k, r in result["dice"].items():
            d = r["mean_difference"]
            lines.append(f"| {k} | {f(d['value'])} [{f(d['ci_low'])}, {f(d['ci_high'])}] | "
                         f"{f(r['wilcoxon']['p_value'], '.4g')} | {r['n_cases']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def compare(cfg: DictConfig) -> dict[str, Any]:
    """Run the comparison of `cfg.a` and `cfg.b`; writes compare.json and compare.md to the run folder."""
    t0 = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from medens.evaluation.classifier_report import bootstrap_options

    n, seed, _ = bootstrap_options(cfg)
    frames = {}
    for side in ("a", "b"):
        src = cfg.get(side)
        if not src:
            raise ConfigError(f"compare needs {side}=<checkpoint .pth | predictions.csv>")
        path = Path(str(src))
        if path.suffix in (".pth", ".pt", ".ckpt"):
            path = _evaluate_side(cfg, path, out_dir / side)
        frames[side] = read_predictions(path)
    (fa, ka), (fb, kb) = frames["a"], frames["b"]
    if ka != kb:
        raise DataError(f"compare: a is a {ka} result and b a {kb} result")
    outputs = list(cfg.get("outputs") or []) or None
    result = compare_frames(fa, fb, ka, n, seed, str(cfg.a), str(cfg.b), outputs)
    result.update({"a": str(cfg.a), "b": str(cfg.b), "seconds": round(time.perf_counter() - t0, 2)})
    write_json_strict(out_dir / "compare.json", result)
    md = markdown(result, str(cfg.a), str(cfg.b))
    atomic_write_text(out_dir / "compare.md", md)
    log.info("comparison -> %s\n%s", out_dir / "compare.md", md)
    return result
