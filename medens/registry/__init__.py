"""Semantic versions of checkpoints and their registration in MLflow (mlflow itself is imported lazily)."""

from medens.registry.semver import SemVer, parse_version
from medens.registry.tracking import MlflowRegistry, default_artifact_location, metadata_tags
from medens.registry.versioning import (
    PromotedVersion,
    VersionInfo,
    latest_version,
    list_versions,
    load_versioned,
    next_version,
    promote_checkpoint,
    read_metadata,
    split_checkpoint_name,
    verify_versioned,
    versioned_name,
)

__all__ = [
    "MlflowRegistry",
    "PromotedVersion",
    "SemVer",
    "VersionInfo",
    "default_artifact_location",
    "latest_version",
    "list_versions",
    "load_versioned",
    "metadata_tags",
    "next_version",
    "parse_version",
    "promote_checkpoint",
    "read_metadata",
    "split_checkpoint_name",
    "verify_versioned",
    "versioned_name",
]
