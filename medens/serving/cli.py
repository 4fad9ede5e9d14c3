"""The body of `scripts/serve.py`: resolve and verify the export, then run uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from medens.serving.models import ServedModel, ServeError, resolve_bundle

log = logging.getLogger(__name__)


def load_from_config(cfg: DictConfig) -> ServedModel:
    """The verified, loaded model of `cfg` (start-up errors are `ServeError` / `StoreError` naming the cause)."""
    import torch

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
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
    return ServedModel(
        model, bundle, [str(f) for f in cfg.get("formats") or ["onnx", "torchscript", "export"]]
    )


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
