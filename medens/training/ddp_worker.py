"""Entry point of DDP ranks 1..N-1: train on the launching job's resolved config file."""

from __future__ import annotations

import logging
import sys

from omegaconf import OmegaConf


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m medens.training.ddp_worker <resolved-config.yaml>")
    logging.basicConfig(level=logging.INFO, format="[ddp rank worker][%(name)s][%(levelname)s] - %(message)s")
    from medens.training.train import train

    train(OmegaConf.load(argv[0]))


if __name__ == "__main__":
    main()
