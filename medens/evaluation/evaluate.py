"""Evaluate a `*_best.pth` on a split of its data: the model travels with its own config.

The checkpoint's `hyperparameters` hold the resolved training config, so `ckpt_path=` alone rebuilds
the network and the datamodule (same split seed, same preprocessing); `data=<group>` evaluates on
another dataset instead.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from medens.checkpoint.io import load_checkpoint, load_network_weights
from medens.errors import CheckpointError, ConfigError
from medens.evaluation.classification import (
    auc_per_class,
    operating_points,
    plot_roc_curves,
    threshold_for_sensitivity,
)
from medens.utils.hashing import sha256_file

log = logging.getLogger(__name__)


sha256_of = sha256_file  # the name evaluation reports and older callers use


def build_from_checkpoint(
    ckpt: dict[str, Any], path: str | Path, data_cfg: DictConfig | None = None
) -> tuple[Any, Any, dict[str, Any]]:
    """(LightningModule with the checkpoint's weights, datamodule, training config) from one file."""
    hyper = ckpt.get("hyperparameters") or {}
    if "model" not in hyper or "data" not in hyper:
        raise CheckpointError(f"{path}: checkpoint has no model/data config in 'hyperparameters'")
    model_cfg = OmegaConf.create(hyper["model"])
    if "pretrained_path" in model_cfg.get("net", {}):
        with open_dict(model_cfg):
            model_cfg.net.pretrained_path = None  # the weights come from the checkpoint
    model = hydra.utils.instantiate(model_cfg)
    load_network_weights(model.net, ckpt, strict=True)
    model.io_contract = hyper.get("io_contract", {})
    dm_cfg = data_cfg if data_cfg is not None else OmegaConf.create(hyper["data"])
    if "generate_if_missing" in dm_cfg:
        with open_dict(dm_cfg):
            dm_cfg.generate_if_missing = bool(dm_cfg.generate_if_missing)
    datamodule = hydra.utils.instantiate(dm_cfg)
    return model, datamodule, hyper


@torch.no_grad()
def predict_split(model: Any, loader: Any, device: str = "cpu") -> dict[str, Any]:
    """Run the network over a loader: stacked probabilities, targets and case ids."""
    model.eval().to(device)
    probs, targets, ids = [], [], []
    for batch in loader:
        x = batch["image"].to(device)
        # a model with predict_proba (CT: sigmoid or softmax head, optional flip TTA) scores itself
        if hasattr(model, "predict_proba"):
            out = model.predict_proba(x)
        else:
            out = torch.sigmoid(model.net(x).float())
        probs.append(out.float().cpu())
        targets.append(batch["label"].float().reshape(len(out), -1))
        ids += list(batch["case_id"])
    return {"probs": torch.cat(probs).numpy(), "targets": torch.cat(targets).numpy(), "case_ids": ids}


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


def evaluate_classifier(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Per-class AUC (JSON), ROC curves (PNG) and per-case predictions (CSV) of a classifier checkpoint."""
    ckpt_path = Path(cfg.ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    data_cfg = cfg.get("data")
    if data_cfg is not None and data_cfg.get("seed") is None:
        with open_dict(data_cfg):
            data_cfg.seed = ckpt["hyperparameters"].get("seed", 0)
    model, dm, hyper = build_from_checkpoint(ckpt, ckpt_path, data_cfg)
    dm.prepare_data()
    dm.setup("test")
    if cfg.split not in ("val", "test"):
        raise ConfigError(f"split must be 'val' or 'test', got {cfg.split!r}")
    loader = dm.val_dataloader() if cfg.split == "val" else dm.test_dataloader()
    pred = predict_split(model, loader, cfg.get("device", "cpu"))
    names = list(model.io_contract.get("label_names") or getattr(dm, "labels", []))
    if len(names) != pred["probs"].shape[1]:
        names = [f"output_{i}" for i in range(pred["probs"].shape[1])]
    report = auc_per_class(pred["probs"], pred["targets"], names)
    report.update(
        {
            "checkpoint": str(ckpt_path.resolve()),
            "checkpoint_sha256": sha256_of(ckpt_path),
            "checkpoint_epoch": ckpt.get("epoch"),
            "split": cfg.split,
            "n_cases": len(pred["case_ids"]),
            "data": str(getattr(dm, "root", getattr(dm, "path", ""))),
        }
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    if pred["probs"].shape[1] == 1:  # binary (CT): sensitivity/specificity table
        table = binary_operating_table(
            ckpt, pred["probs"][:, 0], pred["targets"][:, 0], cfg.get("thresholds")
        )
        report["operating_points"] = table
        pd.DataFrame(table).to_csv(out_dir / "operating_points.csv", index=False)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    plot_roc_curves(pred["probs"], pred["targets"], names, out_dir / "roc_curves.png",
                    title=f"{hyper.get('modality', '')} {cfg.split}: mean AUC {report['mean_auc'] or float('nan'):.3f}")  # fmt: skip
    frame = pd.DataFrame(pred["probs"], columns=[f"prob_{n}" for n in names])
    frame.insert(0, "case_id", pred["case_ids"])
    for i, n in enumerate(names):
        frame[f"target_{n}"] = pred["targets"][:, i]
    frame.to_csv(out_dir / "predictions.csv", index=False)
    log.info(
        "mean AUC %.4f on %d %s cases -> %s",
        report["mean_auc"] or np.nan,
        report["n_cases"],
        cfg.split,
        out_dir,
    )
    return report


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Dispatch on the checkpoint's modality; writes into `cfg.paths.output_dir`."""
    out_dir = Path(cfg.paths.output_dir)
    ckpt = load_checkpoint(cfg.ckpt_path)
    modality = (ckpt.get("hyperparameters") or {}).get("modality", "xray")
    if modality in ("xray", "ct"):
        return evaluate_classifier(cfg, out_dir)
    if modality == "mri":
        from medens.evaluation.segmentation import evaluate_segmenter

        return evaluate_segmenter(cfg, out_dir)
    raise ConfigError(f"{cfg.ckpt_path}: no evaluator for modality {modality!r}")
