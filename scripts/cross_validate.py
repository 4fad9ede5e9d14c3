"""Patient-grouped k-fold cross-validation: `python scripts/cross_validate.py experiment=ct_lidc_voi`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from medens.evaluation.cross_validation import cross_validate


@hydra.main(version_base="1.3", config_path="../conf", config_name="cross_validate")
def main(cfg: DictConfig) -> float | None:
    report = cross_validate(cfg)
    return report["pooled_auc_model"]


if __name__ == "__main__":
    main()
