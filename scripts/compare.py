"""Compare two models on the same cases: `python scripts/compare.py a=<ckpt|predictions.csv> b=<...>`."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from medens.evaluation.compare import compare
from medens.evaluation.external import hydra_data_overrides


@hydra.main(version_base="1.3", config_path="../conf", config_name="compare")
def main(cfg: DictConfig) -> None:
    compare(cfg)


if __name__ == "__main__":
    sys.argv[1:] = hydra_data_overrides(sys.argv[1:])
    main()
