"""Build callbacks and loggers from config: every entry with a `_target_` is instantiated."""

from __future__ import annotations

import logging
from typing import Any

import hydra
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def _instantiate_group(cfg: DictConfig | None, kind: str) -> list[Any]:
    items: list[Any] = []
    if not cfg:
        return items
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"{kind} config must be a mapping of name -> config, got {type(cfg).__name__}")
    for name, conf in cfg.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            log.info("instantiating %s %s <%s>", kind, name, conf._target_)
            items.append(hydra.utils.instantiate(conf))
    return items


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    """Callbacks from the `callbacks` group (adding one is a YAML edit)."""
    return _instantiate_group(cfg, "callback")


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    """Loggers from the `logger` group."""
    return _instantiate_group(cfg, "logger")
