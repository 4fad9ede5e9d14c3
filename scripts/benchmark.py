"""Every benchmark, one sub-command each; results are JSON files under outputs/benchmarks/.

    python scripts/benchmark.py --help                 # the list: xray-throughput, xray-data, xray-e2e, ct-cache,
                                                       # mri-inference, mri-cache, export, preflight, serve-load,
                                                       # gpu-check (one JSON document on stdout)
    python scripts/benchmark.py xray-data --help       # one benchmark's options

The code lives in medens/benchmarks/ (one module per benchmark, registered in medens/benchmarks/cli.py).
"""

from medens.benchmarks.cli import main

if __name__ == "__main__":
    main()
