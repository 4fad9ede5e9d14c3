"""Evaluate a checkpoint: `python scripts/evaluate.py ckpt_path=saved_models/xray/resnet50_best.pth`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from medens.evaluation.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    report = evaluate(cfg)
    return report.get("mean_auc")


if __name__ == "__main__":
    main()
