"""Config validation: an unknown key or a value of the wrong type or range is an error naming the key.

Hydra already rejects CLI overrides of keys that do not exist. This catches the other half: a typo
inside a YAML file (an experiment, a local override). Every node with a `_target_` is checked against
the signature of what it builds; top-level keys are checked against the known sections.
"""

from __future__ import annotations

import difflib
from typing import Any

import hydra.utils
from omegaconf import DictConfig, ListConfig, OmegaConf

from medens.errors import ConfigError
from medens.training.value_checks import check_values, signature_of

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
#: Top-level keys of a training config and their meaning (see conf/train.yaml).
TRAIN_KEYS = {
    "task_name", "tags", "seed", "train", "test", "ckpt_path", "optimized_metric", "data", "model",
    "callbacks", "logger", "trainer", "paths", "extras", "stage", "notes", "modality", "monitor",
    "monitor_mode", "cohort", "resume_any_world_size",
    "on_existing", "publish", "run_id", "preflight",  # run ownership and preflight (medens/training/run_ownership.py)
}  # fmt: skip


def _suggest(key: str, allowed: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _target_params(target: str) -> tuple[set[str], bool] | None:
    try:
        obj = hydra.utils.get_object(target)
    except Exception as exc:  # an unimportable target is itself a config error
        raise ConfigError(f"cannot import _target_ {target!r}: {exc}") from exc
    try:
        params, _, var_kw = signature_of(obj)
    except (TypeError, ValueError):
        return None
    return set(params), var_kw


def _check_node(node: Any, path: str) -> None:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            found = _target_params(str(node._target_))
            if found is not None:
                params, var_kw = found
                if not var_kw:
                    for key in node.keys():
                        key = str(key)
                        if key not in params and key not in HYDRA_KEYS:
                            raise ConfigError(
                                f"unknown config key '{path}.{key}': {node._target_} takes "
                                f"{sorted(params)}.{_suggest(key, params)}"
                            )
        for key in node.keys():
            if OmegaConf.is_missing(node, key):
                continue
            _check_node(node._get_node(key), f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            _check_node(item, f"{path}[{i}]")


def validate_values(cfg: DictConfig) -> None:
    """Raise `ConfigError` naming the first value of a wrong type or out of range (key, value, what is
    allowed), from the `_target_` signatures' annotations and the rule table of
    `medens.training.value_checks`. Every entry point calls it before any work starts."""
    check_values(cfg)


def validate_resume_checkpoint(cfg: DictConfig) -> None:
    """A `ckpt_path=` to resume from is read (SHA-256 of a versioned file checked) and its config refused
    when it names code (`UnsafeCheckpointError`), before any data or model work starts."""
    path = cfg.get("ckpt_path") if "ckpt_path" in cfg and not OmegaConf.is_missing(cfg, "ckpt_path") else None
    if path:
        from medens.checkpoint.safe_build import load_checkpoint_verified

        load_checkpoint_verified(str(path))


def validate_config(cfg: DictConfig, allowed_top: set[str] = TRAIN_KEYS) -> None:
    """Raise `ConfigError` naming the first unknown key in `cfg` (top level or under a `_target_`), the first
    value of a wrong type or range, or (`CheckpointError`) an unsafe or tampered `ckpt_path` to resume from."""
    for key in cfg.keys():
        if key not in allowed_top:
            raise ConfigError(f"unknown config key '{key}' at the top level.{_suggest(str(key), allowed_top)}")
    _check_node(cfg, "")
    validate_values(cfg)
    validate_resume_checkpoint(cfg)
