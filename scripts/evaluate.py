"""Evaluate a checkpoint: `python scripts/evaluate.py ckpt_path=saved_models/xray/resnet50_best.pth`.

`data.<key>=value` changes one key of the checkpoint's own data config (`data.root=<folder> split=all`:
external validation); `data=<group>` replaces the data config."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from medens.evaluation.evaluate import evaluate
from medens.evaluation.external import hydra_data_overrides


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    report = evaluate(cfg)
    return report.get("mean_auc")


if __name__ == "__main__":
    sys.argv[1:] = hydra_data_overrides(sys.argv[1:])
    main()
