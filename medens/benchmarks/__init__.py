"""Benchmarks: one module per benchmark, each a sub-command of `python scripts/benchmark.py` (see `cli.py`),
writing its JSON under outputs/benchmarks/; `gpu_check` runs as `python -m medens.benchmarks.gpu_check`."""
