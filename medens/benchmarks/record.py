"""Where and how every benchmark records its result: one JSON file under `--out`, with the machine it ran on."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medens.utils.atomic import atomic_write_text


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
    atomic_write_text(path, json.dumps(result, indent=2))
    return path
