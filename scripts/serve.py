"""Inference endpoint: `python scripts/serve.py model=<xray|ct|mri|ensemble> [version=1.2.0] [port=8080]`.

SageMaker container contract (`GET /ping`, `POST /invocations`); see conf/serve.yaml and medens.serving.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from medens.serving import main_argv
from medens.serving.cli import run_serve


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    run_serve(cfg)


if __name__ == "__main__":
    main_argv("model", "model_ref")  # model=xray (conf/model/ is a config group of training networks)
    main()
