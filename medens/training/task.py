"""`task_wrapper`: log failures with context, always close loggers, return the optimised metric."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from medens.errors import ConfigError

log = logging.getLogger(__name__)


def close_loggers(objects: dict[str, Any]) -> None:
    """Finalize every logger of a finished (or failed) run, e.g. end the MLflow run."""
    trainer = objects.get("trainer")
    for logger in getattr(trainer, "loggers", []) or []:
        try:
            logger.finalize("success" if objects.get("ok") else "failed")
        except Exception as exc:  # closing must not hide the original error
            log.warning("could not finalize logger %s: %s", type(logger).__name__, exc)


def task_wrapper(task: Callable[[DictConfig], tuple[dict[str, Any], dict[str, Any]]]) -> Callable:
    """Wrap a stage function `task(cfg) -> (metrics, objects)`: on failure log the error and the output
    folder, then re-raise; always finalize loggers."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
        objects: dict[str, Any] = {}
        try:
            metrics, objects = task(cfg)
            objects["ok"] = True
            return metrics, objects
        except Exception:
            out = cfg.get("paths", {}).get("output_dir", "?") if isinstance(cfg, DictConfig) else "?"
            log.exception("task %s failed (output folder: %s)", cfg.get("task_name", "?"), out)
            raise
        finally:
            close_loggers(objects)

    return wrapped


def get_metric_value(metrics: dict[str, Any], name: str | None) -> float | None:
    """The value a sweeper optimises; a missing or non-finite metric is an error, never a silent None."""
    if not name:
        return None
    if name not in metrics:
        raise ConfigError(
            f"optimized_metric {name!r} was not produced by the run; available: {sorted(metrics)}"
        )
    value = float(metrics[name])
    if not math.isfinite(value):
        raise ConfigError(f"optimized_metric {name!r} is {value}: the sweep cannot rank this run")
    return value
