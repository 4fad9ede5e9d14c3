"""Storage housekeeping for saved_models/: report, prune periodic checkpoints, archive (standard library only)."""

from medens.storage.housekeeping import (
    KINDS,
    ArchiveResult,
    Removal,
    StorageError,
    StorageReport,
    StoredFile,
    archive_saved_models,
    check_saved_models_dir,
    classify,
    human_size,
    plan_explicit_removal,
    plan_prune,
    prune,
    run_housekeeping,
    scan,
    storage_report,
)

__all__ = [
    "KINDS",
    "ArchiveResult",
    "Removal",
    "StorageError",
    "StorageReport",
    "StoredFile",
    "archive_saved_models",
    "check_saved_models_dir",
    "classify",
    "human_size",
    "plan_explicit_removal",
    "plan_prune",
    "prune",
    "run_housekeeping",
    "scan",
    "storage_report",
]
