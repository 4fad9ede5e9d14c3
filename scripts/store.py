"""S3 model store: `python scripts/store.py action=push|pull|list|verify ...` (see conf/store.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from medens.registry.store_cli import run_store
from medens.serving import main_argv


@hydra.main(version_base="1.3", config_path="../conf", config_name="store")
def main(cfg: DictConfig) -> None:
    run_store(cfg)


if __name__ == "__main__":
    main_argv("model", "model_ref")  # model=xray/resnet50 (conf/model/ is a config group)
    main()
