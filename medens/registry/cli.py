"""The body of `scripts/promote.py`: promote a checkpoint to a version, or list versions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from medens.errors import ConfigError
from medens.registry.tracking import MlflowRegistry
from medens.registry.versioning import (
    PromotedVersion,
    VersionInfo,
    list_versions,
    promote_checkpoint,
    split_checkpoint_name,
)


def registry_from_config(cfg: DictConfig | None) -> MlflowRegistry | None:
    """An `MlflowRegistry` from the `registry` config section, or None when disabled."""
    if cfg is None or not cfg.get("enabled", False):
        return None
    return MlflowRegistry(
        tracking_uri=str(cfg.tracking_uri),
        registry_uri=cfg.get("registry_uri"),
        experiment_name=str(cfg.get("experiment_name", "medens-registry")),
        model_name=str(cfg.get("model_name", "medens-{modality}-{model_name}")),
        artifact_location=cfg.get("artifact_location"),
        timeout_s=float(cfg.get("timeout_s", 10)),
        max_retries=int(cfg.get("max_retries", 2)),
    )


def _none_or_str(value: Any) -> str | None:
    return None if value is None else str(value)


def run_promote(cfg: DictConfig) -> PromotedVersion | list[VersionInfo]:
    """`action=promote`: version `cfg.ckpt_path`; `action=list`: print and return the versions beside it."""
    from medens.training.validation import validate_values

    validate_values(cfg)  # types and ranges (registry.timeout_s, max_retries...) before any work
    action = cfg.get("action", "promote")
    path = Path(str(cfg.ckpt_path))
    if action == "list":
        folder, name = (path, None) if path.is_dir() else (path.parent, split_checkpoint_name(path)[0])
        versions = list_versions(folder, name)
        for v in versions:
            state = (
                "" if v.complete else "  (incomplete: " + ("no metadata" if v.path else "no checkpoint") + ")"
            )
            print(f"{v.model_name}  {v.version}  {(v.path or v.metadata_path).name}{state}")
        if not versions:
            print(f"no versions in {folder}" + (f" of {name}" if name else ""))
        return versions
    if action != "promote":
        raise ConfigError(f"action must be 'promote' or 'list', got {action!r}")
    store = _store_if_enabled(cfg)  # an unusable bucket fails before anything is written
    result = promote_checkpoint(
        path,
        version=_none_or_str(cfg.get("version")),
        bump=_none_or_str(cfg.get("bump")),
        notes=_none_or_str(cfg.get("notes")),
        report=cfg.get("report"),
        registry=registry_from_config(cfg.get("registry")),
    )
    print(f"{result.model_name} {result.version}: {result.path} (sha256 {result.metadata['sha256']})")
    print(f"metadata: {result.metadata_path}")
    if result.registry:
        r = result.registry
        print(
            f"MLflow: {r['registered_model']} version {r['model_version']} (run {r['run_id']}) in {r['tracking_uri']}"
        )
    if store is not None:
        from medens.registry.object_store import StoreError

        try:
            sv = store.push(result.path, cfg.get("exports_dir"))
        except StoreError as exc:
            raise StoreError(
                f"{result.path} was promoted locally, but publishing it failed: {exc}. Retry with "
                f"scripts/store.py action=push path={result.path}"
            ) from exc
        print(f"published to {store.uri(sv.prefix)} ({len(sv.objects)} objects)")
    return result


def _store_if_enabled(cfg: DictConfig):  # noqa: ANN202 (ModelStore | None; boto3 is imported lazily)
    """The S3 store of `cfg.store` when `store.enabled`, its bucket checked (reachable, versioned)."""
    section = cfg.get("store")
    if section is None or not section.get("enabled", False):
        return None
    from medens.registry.object_store import store_from_config

    store = store_from_config(section)
    store.check_bucket()
    return store
