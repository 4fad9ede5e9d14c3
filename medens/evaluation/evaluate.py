"""Evaluate a `*_best.pth` on a split of its data: the model travels with its own config.

The checkpoint's `hyperparameters` hold the resolved training config, so `ckpt_path=` alone rebuilds
the network and the datamodule (same split seed, same preprocessing); `data=<group>` evaluates on
another dataset instead, and `data.<key>=...` (e.g. `data.root=<another hospital's folder> split=all`)
changes only those keys of the checkpoint's own data config (external validation, see `external.py`).
Classifier reports: every metric with a patient-bootstrap interval, calibration, subgroups, report.html
(`classifier_report.py`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from medens.checkpoint.safe_build import (
    check_data_modality,
    load_checkpoint_verified,
    rebuild_module,
    safe_instantiate,
    validate_checkpoint,
)
from medens.data.reader import upgrade_legacy_data_config
from medens.errors import CheckpointError, ConfigError
from medens.evaluation.classification import (
    operating_points,
    threshold_for_sensitivity,
)
from medens.training.validation import validate_values

log = logging.getLogger(__name__)



def build_from_checkpoint(
    ckpt: dict[str, Any], path: str | Path, data_cfg: DictConfig | None = None
) -> tuple[Any, Any, dict[str, Any]]:
    """(LightningModule with the checkpoint's weights, datamodule, training config) from one file."""
    hyper = validate_checkpoint(ckpt, path)  # checkpoints are data, never code: nothing runs unchecked
    if "model" not in hyper or "data" not in hyper:
        raise CheckpointError(f"{path}: checkpoint has no model/data config in 'hyperparameters'")
    check_data_modality(hyper, data_cfg, path)
    model = rebuild_module(ckpt, path)
    dm_cfg = data_cfg if data_cfg is not None else OmegaConf.create(upgrade_legacy_data_config(hyper["data"]))
    if "generate_if_missing" in dm_cfg:
        with open_dict(dm_cfg):
            dm_cfg.generate_if_missing = bool(dm_cfg.generate_if_missing)
    if data_cfg is None:  # the checkpoint's own data config: as untrusted as its model config
        datamodule = safe_instantiate(dm_cfg, path, "hyperparameters.data")
    else:
        datamodule = hydra.utils.instantiate(dm_cfg)
    return model, datamodule, hyper


def predict_split(model: Any, loader: Any, device: str = "cpu") -> dict[str, Any]:
    """`trainer.predict` with the module's own `predict_step` (CT: sigmoid or softmax head, optional flip
    TTA): stacked probabilities, targets, case and patient ids (the patient is the bootstrap unit)."""
    from medens.evaluation.predict import predict_all

    outputs = predict_all(model, loader, device)
    if not outputs:
        raise ConfigError("the evaluation split holds no case")
    if any(o.get("label") is None for o in outputs):
        raise ConfigError("the evaluation data has no labels: a classifier report needs them")
    probs = torch.cat([o["probs"].float() for o in outputs])
    targets = torch.cat([o["label"].float().reshape(len(o["probs"]), -1) for o in outputs])
    ids = [str(c) for o in outputs for c in o["case_id"]]
    patients = [str(p) for o in outputs for p in o["patient_id"]]
    return {"probs": probs.numpy(), "targets": targets.numpy(), "case_ids": ids, "patient_ids": patients}


def binary_operating_table(
    ckpt: dict[str, Any], probs: np.ndarray, targets: np.ndarray, thresholds: Any = None
) -> list[dict[str, Any]]:
    """Sensitivity and specificity at the checkpoint's own thresholds (the configured one and the one that
    reached the target sensitivity on validation), at a 0.1-0.9 grid (or `thresholds`), and at the
    highest threshold reaching the target sensitivity on these cases."""
    op = ckpt.get("operating_point") or {}
    target = float(op.get("target_sensitivity") or 0.9)
    named: list[tuple[str, float]] = []
    if op.get("threshold") is not None:
        named.append(("configured threshold", float(op["threshold"])))
    if op.get("threshold_at_target_sensitivity") is not None:
        th = float(op["threshold_at_target_sensitivity"])
        named.append((f"{target:.0%} sensitivity on validation", th))
    grid = [round(0.1 * i, 1) for i in range(1, 10)] if thresholds is None else [float(t) for t in thresholds]
    named += [("grid", t) for t in grid]
    known = ~np.isnan(targets)
    p, t = probs[known], targets[known]
    table = operating_points(p, t, [v for _, v in named])
    rows = [{"source": name, **row} for (name, _), row in zip(named, table, strict=True)]
    here = threshold_for_sensitivity(p, t, target)
    rows.append({"source": f"{target:.0%} sensitivity on these cases", **here})
    return rows


def evaluate_classifier(cfg: DictConfig, out_dir: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """Per-class AUC (JSON), ROC curves (PNG) and per-case predictions (CSV) of a classifier checkpoint
    (`ckpt`: `cfg.ckpt_path` as `evaluate` loaded it)."""
    ckpt_path = Path(cfg.ckpt_path)
    data_cfg = resolve_data_config(cfg, ckpt, ckpt_path)
    model, dm, hyper = build_from_checkpoint(ckpt, ckpt_path, data_cfg)
    from medens.evaluation.classifier_report import report_classifier  # metrics with intervals, report.html

    return report_classifier(cfg, ckpt_path, ckpt, model, dm, hyper, out_dir,
                             own_val=lambda: build_from_checkpoint(ckpt, ckpt_path, None)[:2])  # fmt: skip


def resolve_data_config(cfg: DictConfig, ckpt: dict[str, Any], ckpt_path: Path) -> DictConfig | None:
    """The checkpoint's data config with the `data.<key>=` overrides merged on (external validation), a
    whole `data=<group>`, or None (the checkpoint's own data, untouched)."""
    from medens.checkpoint.safe_build import validate_safe_config
    from medens.evaluation.external import merge_data_config

    data_cfg = merge_data_config(ckpt, cfg.get("data"), ckpt_path, str(cfg.get("split", "test")))
    if data_cfg is not None:
        validate_safe_config(data_cfg, ckpt_path, "data")  # its _target_ may come from the checkpoint
        if data_cfg.get("seed") is None:
            with open_dict(data_cfg):
                data_cfg.seed = ckpt["hyperparameters"].get("seed", 0)
    return data_cfg


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Dispatch on the checkpoint's modality; writes into `cfg.paths.output_dir`."""
    validate_values(cfg)  # types and ranges of every value (e.g. data.batch_size=-4) before any work
    from medens.evaluation.classifier_report import options as report_options

    report_options(cfg)  # bootstrap, calibration and subgroup options, before any data is read
    out_dir = Path(cfg.paths.output_dir)
    ckpt = load_checkpoint_verified(cfg.ckpt_path)  # SHA-256 of a versioned file; config checked as data
    hyper = ckpt.get("hyperparameters") or {}
    check_data_modality(hyper, cfg.get("data"), cfg.ckpt_path)  # before any data is read
    modality = hyper.get("modality", "xray")
    if modality in ("xray", "ct"):
        return evaluate_classifier(cfg, out_dir, ckpt)
    if modality == "mri":
        from medens.evaluation.segmentation import evaluate_segmenter

        return evaluate_segmenter(cfg, out_dir, ckpt)
    raise ConfigError(f"{cfg.ckpt_path}: no evaluator for modality {modality!r}")
