"""Version a checkpoint: `python scripts/promote.py ckpt_path=saved_models/xray/resnet50_best.pth version=1.1.0`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from medens.registry.cli import run_promote


@hydra.main(version_base="1.3", config_path="../conf", config_name="promote")
def main(cfg: DictConfig) -> None:
    run_promote(cfg)


if __name__ == "__main__":
    main()
