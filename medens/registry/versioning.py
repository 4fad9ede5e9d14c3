"""Versioned copies of checkpoints: `resnet50_best.pth` -> `resnet50_v1.1.0_best.pth` + `resnet50_v1.1.0_best.json`.

Naming rule (every modality, the ensemble included): a checkpoint's stem is a model name followed by an
optional role suffix, `_best` or `_epoch_<N>`; the version goes between them and the extension stays:

    resnet50_best.pth      -> resnet50_v1.1.0_best.pth      (+ resnet50_v1.1.0_best.json)
    meta_learner.pth       -> meta_learner_v1.0.0.pth       (+ meta_learner_v1.0.0.json)
    3dcnn_epoch_15.pth     -> 3dcnn_v0.2.0_epoch_15.pth     (+ 3dcnn_v0.2.0_epoch_15.json)

Versions are per model name and folder: one version number is used once, whatever the role. The
metadata file is written last and holds the copy's SHA-256, so a versioned file without its metadata
is an unfinished promotion and `load_versioned` refuses it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Protocol

from medens.errors import CheckpointError, RegistryError
from medens.registry.semver import BUMPS, NO_VERSION, SEMVER_PATTERN, SemVer
from medens.utils.atomic import atomic_path, atomic_write_text
from medens.utils.hashing import sha256_file, sha256_json
from medens.utils.jsonio import read_json_object

log = logging.getLogger(__name__)

METADATA_FORMAT = "medens-version/1"
CHECKPOINT_SUFFIXES = (".pth", ".pt")
_ROLE = r"_best|_epoch_\d+"
_VERSIONED_RE = re.compile(rf"^(?P<name>.+?)_v(?P<version>{SEMVER_PATTERN})(?P<role>{_ROLE})?$")
_PLAIN_RE = re.compile(rf"^(?P<name>.+?)(?P<role>{_ROLE})?$")
#: Data config keys that identify a dataset (whichever the datamodule has; the reader's own under `source`).
_DATASET_KEYS = ("root", "path", "source", "manifest", "annotations", "label_preset", "modalities",
                 "image_size", "spacing_mm", "seed")  # fmt: skip
_CHUNK = 1 << 20


class Registrar(Protocol):
    """What `promote_checkpoint` needs from a model registry (see `medens.registry.tracking.MlflowRegistry`)."""

    def check(self, metadata: dict[str, Any]) -> None: ...

    def register(self, path: Path, metadata: dict[str, Any]) -> dict[str, Any]: ...

    def rollback(self, info: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class VersionInfo:
    """One version of a model in a folder; `path` or `metadata_path` is None when that file is missing."""

    model_name: str
    version: SemVer
    role: str
    path: Path | None
    metadata_path: Path | None

    @property
    def complete(self) -> bool:
        """Both the checkpoint and its metadata exist (a finished promotion)."""
        return self.path is not None and self.metadata_path is not None


@dataclass
class PromotedVersion:
    """The result of a promotion: the versioned file, its metadata, and the registry entry if any."""

    model_name: str
    version: str
    path: Path
    metadata_path: Path
    metadata: dict[str, Any] = field(default_factory=dict)
    registry: dict[str, Any] | None = None


def split_checkpoint_name(path: str | os.PathLike) -> tuple[str, str, SemVer | None]:
    """(model name, role suffix, version or None) of a checkpoint file name, by the rule above."""
    stem = Path(path).stem
    m = _VERSIONED_RE.match(stem)
    if m:
        return m.group("name"), m.group("role") or "", SemVer.parse(m.group("version"))
    m = _PLAIN_RE.match(stem)
    if not m or not stem:
        raise RegistryError(f"{path}: cannot tell the model name from this file name")
    return m.group("name"), m.group("role") or "", None


def versioned_name(model_name: str, version: SemVer | str, role: str = "", suffix: str = ".pth") -> str:
    """`<model>_v<version><role><suffix>`, e.g. `resnet50_v1.1.0_best.pth`."""
    return f"{model_name}_v{SemVer.parse(version)}{role}{suffix}"


def metadata_path_for(path: str | os.PathLike) -> Path:
    """The metadata file beside a versioned checkpoint (same stem, `.json`)."""
    return Path(path).with_suffix(".json")


def list_versions(directory: str | os.PathLike, model_name: str | None = None) -> list[VersionInfo]:
    """Versions found in `directory` (of `model_name`, or of every model), oldest first by semver precedence.

    A version appears when its checkpoint or its metadata exists; `VersionInfo.complete` tells which.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found: dict[tuple[str, str, str], dict[str, Path]] = {}
    for p in directory.iterdir():
        if p.name.startswith(".") or not p.is_file():
            continue
        kind = "metadata" if p.suffix == ".json" else "path" if p.suffix in CHECKPOINT_SUFFIXES else None
        m = _VERSIONED_RE.match(p.stem) if kind else None
        if m is None or (model_name is not None and m.group("name") != model_name):
            continue
        key = (m.group("name"), m.group("version"), m.group("role") or "")
        found.setdefault(key, {})[kind] = p
    out = [
        VersionInfo(name, SemVer.parse(ver), role, files.get("path"), files.get("metadata"))
        for (name, ver, role), files in found.items()
    ]
    return sorted(out, key=lambda v: (v.model_name, v.version, str(v.version), v.role))


def latest_version(directory: str | os.PathLike, model_name: str) -> VersionInfo | None:
    """The highest version of `model_name` in `directory` (semver precedence), or None."""
    versions = list_versions(directory, model_name)
    return versions[-1] if versions else None


def next_version(
    existing: Iterable[SemVer | VersionInfo], version: str | SemVer | None = None, bump: str | None = None
) -> SemVer:
    """The version a promotion gets: `version` as given, or `bump` applied to the latest existing one.

    With no version yet, bumping starts from 0.0.0: major -> 1.0.0, minor -> 0.1.0, patch -> 0.0.1.
    A version whose precedence equals an existing one (e.g. `1.0.0+b2` beside `1.0.0+b1`) is refused.
    """
    entries: list[tuple[SemVer, Path | None]] = [
        (e.version, e.path or e.metadata_path) if isinstance(e, VersionInfo) else (SemVer.parse(e), None)
        for e in existing
    ]
    have = sorted(v for v, _ in entries)
    if (version is None) == (bump is None):
        raise RegistryError(
            f"give exactly one of version=MAJOR.MINOR.PATCH or bump={'|'.join(BUMPS)} "
            f"(got version={version!r}, bump={bump!r})"
        )
    if bump is not None:
        target = (have[-1] if have else NO_VERSION).bump(str(bump))
    else:
        target = SemVer.parse(version)
    for v, where in entries:
        if v == target:
            what = where.name if where is not None else str(v)
            same = " (same precedence: build metadata does not count)" if str(v) != str(target) else ""
            raise RegistryError(
                f"version {target} already exists: {what}{same}; versions are never overwritten"
            )
    return target


def _copy_stream(src: IO[bytes], dst: IO[bytes], hasher: Any) -> None:
    while chunk := src.read(_CHUNK):
        hasher.update(chunk)
        dst.write(chunk)


def _atomic_copy(src: Path, dst: Path) -> str:
    """Copy `src` to a new `dst` (never replacing one) through medens' atomic write; returns the copy's SHA-256,
    checked against what reads back from disk before it is published."""
    try:
        with atomic_path(dst, exclusive=True) as tmp:
            hasher = hashlib.sha256()
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                _copy_stream(fin, fout, hasher)
            digest = hasher.hexdigest()
            on_disk = sha256_file(tmp)
            if on_disk != digest:
                raise RegistryError(f"{dst}: copy of {src} reads back with SHA-256 {on_disk}, expected {digest}")
    except FileExistsError:
        raise RegistryError(f"{dst} already exists; versions are never overwritten") from None
    return digest


def _atomic_write_json(path: Path, doc: dict[str, Any]) -> None:
    try:
        atomic_write_text(path, json.dumps(doc, indent=2, default=str) + "\n", exclusive=True)
    except FileExistsError:
        raise RegistryError(f"{path} already exists; versions are never overwritten") from None


def _dataset(hyper: dict[str, Any]) -> dict[str, Any]:
    from medens.data.reader import upgrade_legacy_data_config

    data = hyper.get("data") or {}
    if not isinstance(data, dict):
        return {"description": str(data)}
    data = upgrade_legacy_data_config(data)  # older checkpoints: the reader's keys beside the datamodule's
    out: dict[str, Any] = {"datamodule": data.get("_target_")}
    out.update({k: data[k] for k in _DATASET_KEYS if data.get(k) is not None})
    return out


def _report_metrics(report_path: Path) -> tuple[str, dict[str, Any], str | None]:
    """(split, scalar metrics, checkpoint_sha256 it claims) of an evaluation report (`metrics.json`)."""
    report = read_json_object(report_path, "evaluation report", RegistryError)
    metrics: dict[str, Any] = {"report": str(report_path.resolve())}
    for key, value in report.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) or value is None:
            metrics[key] = value
        elif isinstance(value, dict) and all(isinstance(v, (int, float, type(None))) for v in value.values()):
            metrics[key] = value
    return str(report.get("split") or "test"), metrics, report.get("checkpoint_sha256")


def _performance(ckpt: dict[str, Any]) -> dict[str, Any]:
    perf: dict[str, Any] = {}
    for key in ("monitor", "best_metric", "val_auc", "val_dice", "val_loss", "train_loss", "epoch"):
        if ckpt.get(key) is not None:
            perf[key] = ckpt[key]
    for key, value in ckpt.items():  # test metrics, when a checkpoint carries them
        if key.startswith("test") and isinstance(value, (int, float, dict)):
            perf[key] = value
    return perf


def build_metadata(
    ckpt: dict[str, Any],
    src: Path,
    model_name: str,
    version: SemVer,
    file_name: str,
    notes: str | None = None,
) -> dict[str, Any]:
    """The metadata document of a versioned copy (everything but `sha256`, which the copy provides)."""
    import medens

    hyper = ckpt.get("hyperparameters") or {}
    return {
        "format": METADATA_FORMAT,
        "model_name": model_name,
        "version": str(version),
        "modality": hyper.get("modality") or src.parent.name,
        "file": file_name,
        "sha256": None,
        "size_bytes": src.stat().st_size,
        "dataset": _dataset(hyper),
        "training_date": ckpt.get("timestamp"),
        "epoch": ckpt.get("epoch"),
        "hyperparameters": hyper,
        "hyperparameters_sha256": sha256_json(hyper),
        "performance": _performance(ckpt),
        "notes": notes,
        "source": str(src.resolve()),
        "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "medens_version": medens.__version__,
        "registry": None,
    }


def promotion_lock_path(directory: str | os.PathLike, model_name: str) -> Path:
    """The lock a promotion of `model_name` in `directory` holds (also checked by housekeeping)."""
    return Path(directory) / f".{model_name}.promote.lock"


def rollback_interrupted_promotions(
    directory: str | os.PathLike, model_name: str | None = None
) -> list[Path]:
    """Remove versioned copies that have no metadata: promotions killed between the copy and the metadata
    (the metadata is written last). Their version numbers become free again. The caller holds the
    promotion lock (or has checked that no promotion runs). Returns the removed files (logged)."""
    removed = []
    for v in list_versions(directory, model_name):
        if v.path is not None and v.metadata_path is None:
            v.path.unlink(missing_ok=True)
            log.warning("rolled back an interrupted promotion: removed %s (no metadata; version %s is free again)",
                        v.path, v.version)  # fmt: skip
            removed.append(v.path)
    for p in Path(directory).glob(".*.tmp") if Path(directory).is_dir() else []:
        m = _VERSIONED_RE.match(p.name[1:].split(".pth.")[0].split(".json.")[0].split(".pt.")[0])
        if m and (model_name is None or m.group("name") == model_name):
            p.unlink(missing_ok=True)
            log.warning("removed %s: temporary file of an interrupted promotion", p)
            removed.append(p)
    return removed


def promote_checkpoint(
    ckpt_path: str | os.PathLike,
    version: str | SemVer | None = None,
    bump: str | None = None,
    notes: str | None = None,
    report: str | os.PathLike | None = None,
    registry: Registrar | None = None,
) -> PromotedVersion:
    """Copy a checkpoint to its versioned name beside it, write its metadata, and optionally register it.

    Order, so that a failure leaves nothing behind: resolve and check the version -> check the registry is
    reachable (before any file is written) -> atomic copy -> register -> metadata (last, atomic). If
    registering or writing the metadata fails, the copy (and any registry entry made) is removed again.
    """
    src = Path(ckpt_path)
    if not src.is_file():
        raise RegistryError(f"{src}: checkpoint file not found")
    model_name, role, _ = split_checkpoint_name(src)
    from medens.utils.locking import owned_lock

    lock = promotion_lock_path(src.parent, model_name)
    interrupted = lock.exists()  # a finished promotion removes its lock file; a killed one leaves it
    with owned_lock(lock, f"promoting {src.name}"):
        if interrupted:
            rollback_interrupted_promotions(src.parent, model_name)
        return _promote_locked(src, model_name, role, version, bump, notes, report, registry)


def _promote_locked(
    src: Path, model_name: str, role: str, version: str | SemVer | None, bump: str | None, notes: str | None,
    report: str | os.PathLike | None, registry: Registrar | None,
) -> PromotedVersion:  # fmt: skip
    from medens.checkpoint.io import load_checkpoint
    from medens.checkpoint.safe_build import validate_checkpoint

    try:
        ckpt = load_checkpoint(src)
    except CheckpointError as exc:
        raise RegistryError(f"cannot promote {src}: {exc}") from exc
    validate_checkpoint(ckpt, src)  # never version a file whose config names code (UnsafeCheckpointError)
    target = next_version(list_versions(src.parent, model_name), version, bump)
    dst = src.parent / versioned_name(model_name, target, role, src.suffix)
    meta_path = metadata_path_for(dst)
    metadata = build_metadata(ckpt, src, model_name, target, dst.name, notes)
    del ckpt
    evaluation = _report_metrics(Path(report)) if report is not None else None
    if registry is not None:
        registry.check(metadata)

    sha = _atomic_copy(src, dst)
    info: dict[str, Any] | None = None
    try:
        metadata["sha256"] = sha
        if evaluation is not None:
            split, metrics, claimed = evaluation
            if claimed and claimed != sha:
                raise RegistryError(
                    f"{report}: this evaluation report is of another checkpoint "
                    f"(checkpoint_sha256 {claimed}, {src.name} has {sha})"
                )
            metadata["performance"][split] = metrics
        if registry is not None:
            info = registry.register(dst, metadata)
            metadata["registry"] = info
        _atomic_write_json(meta_path, metadata)
    except BaseException:
        dst.unlink(missing_ok=True)
        if info is not None and registry is not None:
            try:
                registry.rollback(info)
            except Exception as exc:  # the original error matters more
                log.error("could not roll back registry entry %s: %s", info, exc)
        raise
    log.info("promoted %s -> %s (sha256 %s)", src, dst, sha)
    from medens.evaluation.model_card import write_model_card_safely  # model_card.md beside the version

    write_model_card_safely(dst, metadata, report)
    return PromotedVersion(model_name, str(target), dst, meta_path, metadata, info)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a versioned checkpoint; a missing or unreadable file raises `RegistryError`."""
    path = Path(path)
    meta_path = path if path.suffix == ".json" else metadata_path_for(path)
    if not meta_path.is_file():
        raise RegistryError(
            f"{path}: metadata file {meta_path.name} is missing; a versioned checkpoint is only trusted "
            "with its metadata (it holds the SHA-256)"
        )
    meta = read_json_object(meta_path, "metadata", RegistryError)
    if not meta.get("sha256"):
        raise RegistryError(f"{meta_path}: metadata has no 'sha256'")
    return meta


def _check_sha(path: Path, meta: dict[str, Any], actual: str) -> None:
    expected = str(meta["sha256"])
    if actual != expected:
        raise RegistryError(
            f"{path}: SHA-256 mismatch: metadata {metadata_path_for(path).name} expects {expected}, "
            f"the file has {actual}. The file changed after it was promoted; do not use it."
        )


def verify_versioned(path: str | os.PathLike) -> dict[str, Any]:
    """Check a versioned checkpoint against its metadata's SHA-256; returns the metadata."""
    path = Path(path)
    if not path.is_file():
        raise RegistryError(f"{path}: versioned checkpoint not found")
    meta = read_metadata(path)
    _check_sha(path, meta, sha256_file(path))
    return meta


def load_versioned(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a versioned checkpoint after verifying its SHA-256 against the metadata beside it.

    The bytes that are hashed are the bytes that are loaded (`weights_only=True`), so a file swapped
    between the check and the load cannot slip through.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise RegistryError(f"{path}: versioned checkpoint not found")
    meta = read_metadata(path)
    data = path.read_bytes()
    _check_sha(path, meta, hashlib.sha256(data).hexdigest())
    try:
        ckpt = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a medens checkpoint (no 'model_state_dict')")
    from medens.checkpoint.safe_build import validate_checkpoint, validate_safe_config

    validate_checkpoint(ckpt, path)  # checkpoints are data, never code
    validate_safe_config(meta.get("hyperparameters"), metadata_path_for(path), "hyperparameters")
    return ckpt
