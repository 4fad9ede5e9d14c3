"""The body of `scripts/serve.py`: resolve and verify the export, then run uvicorn."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from medens.serving.models import ServedModel, ServeError, resolve_bundle

log = logging.getLogger(__name__)


def load_from_config(cfg: DictConfig) -> ServedModel:
    """The verified, loaded model of `cfg` (start-up errors are `ServeError` / `StoreError` naming the cause)."""
    import torch

    # intra-op threads for torch and onnxruntime (sessions read torch's count): all cores by default, so the
    # one batch worker thread uses the whole CPU while request decoding runs in the event loop's thread pool
    torch.set_num_threads(int(cfg.get("threads") or cpu_cores()))
    store = None
    section = cfg.get("store")
    if section is not None and section.get("enabled", False):
        from medens.registry.object_store import store_from_config

        store = store_from_config(section)
    model = str(cfg.model_ref)
    version = None if cfg.get("version") is None else str(cfg.version)
    bundle = resolve_bundle(
        model, version, Path(str(cfg.paths.saved_models_dir)), Path(str(cfg.exports_dir)), store
    )
    optimize = cfg.get("optimize")
    return ServedModel(
        model,
        bundle,
        [str(f) for f in cfg.get("formats") or ["onnx", "torchscript", "export"]],
        None if optimize is None else bool(optimize),
    )


def cpu_cores() -> int:
    """The cores this process may run on (the container's CPU set, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover (macOS)
        return max(1, os.cpu_count() or 1)


def settings_of(cfg: DictConfig) -> dict[str, Any]:
    keys = ("max_batch_size", "max_wait_ms", "max_body_mb")
    return {k: OmegaConf.select(cfg, k) for k in keys}


def run_serve(cfg: DictConfig) -> None:
    """Load the model (refusing a file that fails its SHA-256), then serve until stopped."""
    import uvicorn

    from medens.serving.app import create_app

    try:
        served = load_from_config(cfg)
    except ServeError:
        raise
    app = create_app(served, settings_of(cfg))
    d = served.describe()
    print(f"serving {d['model']} {d['model_name']} {d['version']} ({d['file']}, sha256 {d['sha256'][:16]}) "
          f"on http://{cfg.host}:{cfg.port}", flush=True)  # fmt: skip
    uvicorn.run(app, host=str(cfg.host), port=int(cfg.port), log_level=str(cfg.log_level), workers=1)
