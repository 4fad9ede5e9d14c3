"""Patient-grouped cross-validation against a trivial baseline: `python scripts/cross_validate.py experiment=<x>`
(ct_lidc_voi, xray_samples, mri_brats2015)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from medens.evaluation.cross_validation import cross_validate


@hydra.main(version_base="1.3", config_path="../conf", config_name="cross_validate")
def main(cfg: DictConfig) -> float | None:
    report = cross_validate(cfg)
    objective = report.get("objective")
    return None if objective is None else float(objective)


if __name__ == "__main__":
    main()
