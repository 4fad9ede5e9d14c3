"""Checkpoint housekeeping: `python scripts/housekeeping.py action=report|prune|remove|archive [--dry-run]`."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from medens.storage import run_housekeeping


@hydra.main(version_base="1.3", config_path="../conf", config_name="housekeeping")
def main(cfg: DictConfig) -> None:
    run_housekeeping(cfg)


if __name__ == "__main__":
    # `--dry-run`, as the issue spells it, is the Hydra override `dry_run=true`.
    sys.argv = ["dry_run=true" if a == "--dry-run" else a for a in sys.argv]
    main()
