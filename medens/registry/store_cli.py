"""The body of `scripts/store.py`: push, pull, list and verify versions in the S3 model store."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from medens.errors import ConfigError
from medens.registry.object_store import (
    ModelStore,
    StoredVersion,
    StoreError,
    parse_model_ref,
    store_from_config,
)

ACTIONS = ("push", "pull", "list", "verify")


def _perf_summary(perf: dict[str, Any]) -> str:
    keys = [
        k for k in ("monitor", "best_metric", "val_auc", "val_dice", "val_loss") if perf.get(k) is not None
    ]
    parts = [f"{k}={perf[k]:.4g}" if isinstance(perf[k], float) else f"{k}={perf[k]}" for k in keys]
    for split, value in perf.items():
        if isinstance(value, dict):
            for metric in ("mean_auc", "auc", "mean_dice"):
                if isinstance(value.get(metric), (int, float)):
                    parts.append(f"{split}.{metric}={value[metric]:.4g}")
    return " ".join(parts)


def version_row(sv: StoredVersion) -> dict[str, Any]:
    """What `list` shows of one version (JSON form)."""
    return {
        "modality": sv.modality,
        "model_name": sv.model_name,
        "version": str(sv.version),
        "prefix": sv.prefix,
        "published_at": sv.marker.get("published_at"),
        "sha256": sv.marker.get("sha256"),
        "exports": sv.marker.get("exports") or [],
        "performance": sv.performance,
        "notes": sv.marker.get("notes"),
        "size_bytes": sum(o.size for o in sv.objects),
    }


def _ref(cfg: DictConfig) -> tuple[str, str, str]:
    ref = cfg.get("model_ref")
    if not ref or not cfg.get("version"):
        raise ConfigError(f"action={cfg.action} needs model=<modality>/<name> and version=<semver>")
    modality, name = parse_model_ref(str(ref))
    return modality, name, str(cfg.version)


def run_store(cfg: DictConfig, store: ModelStore | None = None) -> Any:
    """Dispatch `cfg.action`; prints a human summary (or JSON with format=json) and returns the result.

    `verify` that finds a problem raises `StoreError` after printing the per-object report.
    """
    action = str(cfg.get("action", "list"))
    if action not in ACTIONS:
        raise ConfigError(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)  # "found credentials in ..." per call
    store = store or store_from_config(cfg.store)
    as_json = str(cfg.get("format", "text")) == "json"
    if action == "push":
        if not cfg.get("path"):
            raise ConfigError(
                "action=push needs path=<a promoted checkpoint>, e.g. saved_models/xray/resnet50_v1.1.0_best.pth"
            )
        sv = store.push(Path(str(cfg.path)), cfg.get("exports_dir"))
        row = version_row(sv)
        if as_json:
            print(json.dumps(row, indent=2))
        else:
            print(f"published {sv.modality}/{sv.model_name} {sv.version} -> {store.uri(sv.prefix)}")
            for o in sv.objects:
                print(f"  {o.name}  {o.size} bytes  sha256 {o.sha256[:16]}  version {o.version_id}"
                      + ("  (multipart)" if o.multipart else ""))  # fmt: skip
        return sv
    if action == "list":
        versions = store.list_versions(cfg.get("modality"))
        rows = [version_row(v) for v in versions]
        if as_json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                print(f"{r['modality']}/{r['model_name']}  {r['version']}  {r['published_at']}  "
                      f"{_perf_summary(r['performance'])}  exports={','.join(r['exports']) or '-'}")  # fmt: skip
            if not rows:
                print(f"no published versions in s3://{store.settings.bucket}/{store.prefix}")
        return versions
    modality, name, version = _ref(cfg)
    if action == "pull":
        dest = Path(str(cfg.dest)) if cfg.get("dest") else Path(str(cfg.paths.saved_models_dir)) / modality
        files = store.pull(modality, name, version, dest)
        if as_json:
            print(json.dumps({k: str(v) for k, v in files.items()}, indent=2))
        else:
            print(f"pulled {modality}/{name} {version} (every SHA-256 verified):")
            for path in files.values():
                print(f"  {path}")
        return files
    report = store.verify(modality, name, version)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        for row in report["objects"]:
            print(f"{'ok ' if row['ok'] else 'BAD'}  {row['name']}  {row.get('problem', '')}".rstrip())
    if not report["ok"]:
        bad = [r["name"] for r in report["objects"] if not r["ok"]]
        raise StoreError(f"{report['prefix']}: {len(bad)} object(s) failed verification: {', '.join(bad)}")
    return report
