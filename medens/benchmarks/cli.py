"""The one benchmark entry point: `python scripts/benchmark.py <name> [options]`, one sub-command per benchmark.

Each benchmark lives in a module of this package with `add_parsers(subparsers)`, which registers its
sub-command(s) and sets `_run` to the function that runs it; every result is a JSON file under
outputs/benchmarks/ (the file names are in each module's docstring). `--help` lists them all.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

#: Modules registering sub-commands, in `--help` order.
MODULES = (
    "medens.benchmarks.xray_throughput",  # xray-throughput: the X-ray LightningModule vs a plain loop
    "medens.benchmarks.xray_data",  # xray-data, xray-e2e: PNGs vs the decoded-image cache; train.py vs a plain loop
    "medens.benchmarks.ct",  # ct-cache: CT patch cache on/off
    "medens.benchmarks.mri",  # mri-inference, mri-cache: sliding window; BraTS cache modes
    "medens.benchmarks.export",  # export: eager vs TorchScript vs ONNX Runtime vs torch.export latency
    "medens.benchmarks.preflight",  # preflight: the checkpoint round trip's cost vs one epoch
    "medens.serving.loadtest",  # serve-load: concurrent clients against the HTTP endpoint
    "medens.benchmarks.gpu_check",  # gpu-check: the one prepared GPU script (one JSON document on stdout)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/benchmark.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="name", required=True, metavar="benchmark")
    for name in MODULES:
        importlib.import_module(name).add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse `argv` (default: the command line) and run the chosen benchmark."""
    args = build_parser().parse_args(argv)
    args._run(args)
