"""Train one modality: `python scripts/train.py experiment=xray [key=value ...]` (a Hydra app)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from medens.training.task import get_metric_value
from medens.training.train import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    return get_metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
