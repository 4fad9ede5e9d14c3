"""What every benchmark shares: the project folder, medens' own composed configs, and how a result is recorded
(one JSON file under `--out`, with the machine it ran on)."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medens.utils.jsonio import write_json_strict

#: The checkout's project folder (conf/, scripts/, outputs/).
PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: Where results go unless `--out` says otherwise.
RESULTS_DIR = PROJECT_ROOT / "outputs" / "benchmarks"


def compose_config(*overrides: str, name: str = "train") -> Any:
    """medens' own ``conf/<name>.yaml`` with ``overrides``, as ``python scripts/<name>.py`` composes it."""
    from hydra import compose, initialize_config_dir

    import medens  # noqa: F401  (resolvers)

    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def write_benchmark_result(out_dir: str | os.PathLike, filename: str, result: dict[str, Any]) -> Path:
    """Add torch version, threads, CPUs, machine, 1-minute load and date (keys the benchmark set itself win),
    then write `<out_dir>/<filename>` atomically; returns its path. The load average says how quiet it was."""
    import torch

    environment = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for key, value in environment.items():
        result.setdefault(key, value)
    path = Path(out_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_strict(path, result)
    return path
