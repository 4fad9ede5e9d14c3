"""Checkpoint housekeeping for `saved_models/`: report storage, prune periodic checkpoints, archive.

Training writes periodic `<name>_epoch_{N}.pth` files that pile up across runs; this module frees that
space without ever touching what a user relies on. Only periodic checkpoints are pruned by rule. Best
files, versioned copies and their metadata, the JSON records and exports are removed only when a path
is named explicitly. Every change is planned first, so a dry run prints exactly what a real run does.
Pure standard library: importing it pulls in neither torch nor Hydra's CLI.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import tarfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from medens.errors import MedensError
from medens.utils.atomic import finish_temp, publish_first_free, temp_sibling

log = logging.getLogger(__name__)

#: File kinds, in report order. Only `periodic` is ever removed without being named explicitly.
KINDS = ("best", "periodic", "versioned", "records", "exports", "other")
RECORD_FILES = frozenset({"training_history.json", "weighted_average.json", "ensemble_history.json"})
BEST_FILES = frozenset({"meta_learner.pth"})
EXPORTS_DIR = "exports"
TOP_LEVEL = "."  # group of files lying directly in saved_models/

_PERIODIC_RE = re.compile(r"^(?P<name>.+)_epoch_(?P<epoch>\d+)\.pth$")
# `_v<major>.<minor>.<patch>` with optional semver pre-release/build, e.g. resnet50_v1.1.0_best.{pth,json}.
_VERSIONED_RE = re.compile(r"_v\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?(?=[_.]|$)")
# In-flight temporary files of medens' atomic writes (`.<name>.<random>.tmp`).
_TEMP_RE = re.compile(r"^\..+\.tmp$")
ARCHIVE_PREFIX = "archived_models_"


class StorageError(MedensError, ValueError):
    """A saved_models/ tree, a named path or an archive is missing, outside its folder or inconsistent."""


@dataclass(frozen=True)
class StoredFile:
    """One file under saved_models/, classified by its name."""

    path: Path
    rel: str  # POSIX path relative to the saved_models folder
    size: int
    kind: str
    group: str  # first folder below saved_models/ (the modality), or "." for top-level files
    model: str | None = None  # periodic checkpoints: the `<name>` part
    epoch: int | None = None  # periodic checkpoints: N of `_epoch_{N}`


def classify(rel: str) -> tuple[str, str | None, int | None]:
    """Kind of a file from its path relative to saved_models/: (kind, model name, epoch).

    Order matters: exports and versioned copies win over the best/periodic patterns, so
    `exports/x_epoch_5.pth` or `resnet50_v1.1.0_epoch_5.pth` is never taken for a periodic checkpoint.
    """
    parts = rel.split("/")
    name = parts[-1]
    if len(parts) > 1 and parts[0] == EXPORTS_DIR:
        return "exports", None, None
    if _VERSIONED_RE.search(name):
        return "versioned", None, None
    if name in RECORD_FILES:
        return "records", None, None
    if name in BEST_FILES or name.endswith("_best.pth"):
        return "best", None, None
    m = _PERIODIC_RE.match(name)
    if m:
        return "periodic", m["name"], int(m["epoch"])
    return "other", None, None


def check_saved_models_dir(saved_models_dir: str | os.PathLike) -> Path:
    """The absolute saved_models folder, or a `StorageError` naming the path that is not one."""
    path = Path(saved_models_dir).expanduser().absolute()
    if not path.exists():
        raise StorageError(
            f"{path}: saved_models folder not found (set saved_models_dir=... or run from the project root / "
            "set MEDENS_ROOT)"
        )
    if not path.is_dir():
        raise StorageError(f"{path}: saved_models_dir is not a folder")
    return path


def scan(saved_models_dir: str | os.PathLike) -> list[StoredFile]:
    """Every file under saved_models/ (symlinks not followed), sorted by relative path."""
    root = check_saved_models_dir(saved_models_dir)
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for fname in sorted(filenames):
            path = Path(dirpath) / fname
            rel = path.relative_to(root).as_posix()
            kind, model, epoch = classify(rel)
            group = rel.split("/")[0] if "/" in rel else TOP_LEVEL
            files.append(StoredFile(path, rel, os.lstat(path).st_size, kind, group, model, epoch))
    return sorted(files, key=lambda f: f.rel)


def human_size(n: int) -> str:
    """`du -h` style size: 512B, 1.5K, 12.0M (powers of 1024)."""
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{int(value)}B" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------- report


@dataclass
class Usage:
    """Size and file count of a set of files."""

    size: int = 0
    files: int = 0

    def add(self, f: StoredFile) -> None:
        self.size += f.size
        self.files += 1


@dataclass
class StorageReport:
    """Storage under saved_models/ per top-level folder and per file kind (apparent sizes, like `du -sh`)."""

    root: Path
    folders: dict[str, Usage]
    kinds: dict[str, Usage]
    folder_kinds: dict[str, dict[str, Usage]]
    periodic: dict[str, list[int]]  # "<folder path>/<name>" -> sorted epochs
    total: Usage

    def to_dict(self) -> dict[str, Any]:
        def u(x: Usage) -> dict[str, Any]:
            return {"size": x.size, "size_human": human_size(x.size), "files": x.files}

        return {
            "saved_models_dir": str(self.root),
            "folders": {
                k: {**u(v), "kinds": {kk: u(vv) for kk, vv in self.folder_kinds[k].items()}}
                for k, v in self.folders.items()
            },
            "kinds": {k: u(v) for k, v in self.kinds.items()},
            "periodic": self.periodic,
            "total": u(self.total),
        }

    def render(self) -> str:
        lines = [f"Storage under {self.root} (apparent size)"]
        width = max([len(k) + 1 for k in self.folders] + [len("(top level)"), len("total")])
        for name, use in self.folders.items():
            label = "(top level)" if name == TOP_LEVEL else f"{name}/"
            kinds = ", ".join(f"{k} {v.files}" for k, v in self.folder_kinds[name].items() if v.files)
            lines.append(f"  {label:<{width}} {human_size(use.size):>8} {use.files:>6} files  {kinds}")
        lines.append(f"  {'total':<{width}} {human_size(self.total.size):>8} {self.total.files:>6} files")
        lines.append("By kind:")
        for kind, use in self.kinds.items():
            lines.append(f"  {kind:<{width}} {human_size(use.size):>8} {use.files:>6} files")
        if self.periodic:
            lines.append("Periodic checkpoints (epochs):")
            for key, epochs in self.periodic.items():
                lines.append(f"  {key}: {', '.join(map(str, epochs))}")
        return "\n".join(lines)


def storage_report(saved_models_dir: str | os.PathLike) -> StorageReport:
    """Sizes and file counts per modality folder, per kind, and in total."""
    root = check_saved_models_dir(saved_models_dir)
    files = scan(root)
    groups = sorted(
        {p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink()} | {f.group for f in files}
    )
    folders = {g: Usage() for g in groups}
    folder_kinds = {g: {k: Usage() for k in KINDS} for g in groups}
    kinds = {k: Usage() for k in KINDS}
    total = Usage()
    periodic: dict[str, list[int]] = {}
    for f in files:
        folders[f.group].add(f)
        folder_kinds[f.group][f.kind].add(f)
        kinds[f.kind].add(f)
        total.add(f)
        if f.kind == "periodic":
            periodic.setdefault(_periodic_key(f), []).append(f.epoch)  # type: ignore[arg-type]
    periodic = {k: sorted(v) for k, v in sorted(periodic.items())}
    return StorageReport(root, folders, kinds, folder_kinds, periodic, total)


# ---------------------------------------------------------------------------------------------- prune


@dataclass(frozen=True)
class Removal:
    """One planned (or performed) file removal and why."""

    path: Path
    rel: str
    size: int
    kind: str
    reason: str

    def describe(self) -> str:
        return f"{self.rel} ({self.kind}, {human_size(self.size)}): {self.reason}"


def _periodic_key(f: StoredFile) -> str:
    folder = f.rel.rsplit("/", 1)[0] if "/" in f.rel else TOP_LEVEL
    return f"{folder}/{f.model}"


def plan_prune(
    saved_models_dir: str | os.PathLike,
    keep_last: int | None = 3,
    best_only: bool = False,
) -> list[Removal]:
    """Periodic checkpoints to remove, keeping the newest `keep_last` per folder and model name.

    "Newest" is the epoch number in the name (numeric: epoch 100 is newer than 20), not mtime, which
    copies and restores change. `best_only=True` removes every periodic checkpoint; `keep_last=None`
    removes none. Nothing but periodic checkpoints is ever selected here.
    """
    if best_only:
        keep = 0
    elif keep_last is None:
        return []
    elif isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
        raise StorageError(f"keep_last must be an integer >= 0 (or null), got {keep_last!r}")
    else:
        keep = keep_last
    groups: dict[str, list[StoredFile]] = {}
    for f in scan(saved_models_dir):
        if f.kind == "periodic":
            groups.setdefault(_periodic_key(f), []).append(f)
    removals = []
    for key, files in sorted(groups.items()):
        files.sort(key=lambda f: (f.epoch, f.rel), reverse=True)
        kept = sorted(f.epoch for f in files[:keep])
        why = "best_only" if best_only else f"keep_last={keep}: newest kept for {key} are epochs {kept}"
        removals += [Removal(f.path, f.rel, f.size, f.kind, why) for f in files[keep:]]
    return sorted(removals, key=lambda r: r.rel)


def plan_explicit_removal(
    saved_models_dir: str | os.PathLike,
    paths: Iterable[str | os.PathLike],
    base_dir: str | os.PathLike | None = None,
) -> list[Removal]:
    """Files named explicitly: the only way to remove best, versioned, record or export files.

    Relative paths are taken from `base_dir` (the project root). A path outside saved_models/, a
    folder, or a missing file is refused before anything is removed.
    """
    root = check_saved_models_dir(saved_models_dir)
    real_root = Path(os.path.realpath(root))
    base = Path(base_dir).absolute() if base_dir is not None else Path.cwd()
    removals = []
    for raw in paths:
        p = Path(raw).expanduser()
        p = p if p.is_absolute() else base / p
        # Resolve the folders (symlinks, ..) but not the file itself: a named symlink is removed, not its target.
        real = Path(os.path.realpath(p.parent)) / p.name
        try:
            rel = real.relative_to(real_root).as_posix()
        except ValueError:
            raise StorageError(
                f"{raw}: refusing to remove a path outside {root} (resolves to {real})"
            ) from None
        if rel in ("", ".") or p.name in ("", ".", ".."):
            raise StorageError(f"{raw}: refusing to remove the saved_models folder itself; name files")
        if not os.path.lexists(real):
            raise StorageError(f"{raw}: no such file under {root}")
        if real.is_dir() and not real.is_symlink():
            raise StorageError(f"{raw}: is a folder; name the files to remove")
        kind, _, _ = classify(rel)
        removals.append(Removal(real, rel, os.lstat(real).st_size, kind, "named explicitly"))
    return removals


def apply_removals(removals: Sequence[Removal], dry_run: bool = False) -> list[Removal]:
    """Remove the planned files (nothing with `dry_run`); returns what was (or would be) removed."""
    done = []
    for r in removals:
        if not dry_run:
            try:
                os.unlink(r.path)
            except FileNotFoundError:
                log.warning("%s: already gone", r.path)
                continue
        done.append(r)
    return done


# ------------------------------------------------------------------------------------------ leftovers

RUN_LOCK = ".run.lock"  # held by a training run for its whole life (medens/training/run_ownership.py)


def lock_is_held(path: Path) -> bool:
    """Whether a live process holds the flock on `path` (False when the file is absent or stale)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        return False
    try:
        fh = open(path, "rb")
    except OSError:
        return False
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return False


def _promotion_lock(folder: Path, versioned_name: str) -> Path:
    model = _VERSIONED_RE.split(versioned_name, maxsplit=1)[0]
    return folder / f".{model}.promote.lock"


def plan_leftovers(saved_models_dir: str | os.PathLike, min_age_s: float = 60.0) -> list[Removal]:
    """What killed runs and promotions left behind, never what a live process is writing.

    - `.<name>.<random>.tmp` of a save that never finished (atomic saves name their temp files so; none
      ends in `.pth`), in a folder whose run lock is not held, older than `min_age_s` seconds;
    - a versioned copy without its metadata JSON (a promotion killed between the copy and the metadata,
      which is written last) beside the promotion lock file that the killed promotion left (a live
      promotion holds it; a finished one removes it): rolled back, so the version is free again. A
      versioned file without metadata and without that trace is not medens' to delete.
    """
    removals = []
    for f in scan(saved_models_dir):
        name = f.path.name
        folder = f.path.parent
        if _TEMP_RE.match(name):
            run_lock = folder.parent.parent / RUN_LOCK if folder.parent.name == "runs" else folder / RUN_LOCK
            if lock_is_held(run_lock) or (
                _VERSIONED_RE.search(name) and lock_is_held(_promotion_lock(folder, name[1:]))
            ):
                continue
            try:
                if min_age_s and time.time() - f.path.stat().st_mtime < min_age_s:
                    continue
            except FileNotFoundError:
                continue
            removals.append(Removal(f.path, f.rel, f.size, "temp", "temporary file of a killed save"))
        elif (
            f.kind == "versioned"
            and f.path.suffix in (".pth", ".pt")
            and not f.path.with_suffix(".json").exists()
            and _promotion_lock(folder, name).exists()  # a killed promotion leaves its lock file behind
            and not lock_is_held(_promotion_lock(folder, name))
        ):
            removals.append(
                Removal(f.path, f.rel, f.size, f.kind, "interrupted promotion (no metadata): rolled back")
            )
    return removals


def _merge(*plans: Sequence[Removal]) -> list[Removal]:
    seen: dict[str, Removal] = {}
    for plan in plans:
        for r in plan:
            seen.setdefault(r.rel, r)
    return sorted(seen.values(), key=lambda r: r.rel)


def prune(
    saved_models_dir: str | os.PathLike,
    keep_last: int | None = 3,
    best_only: bool = False,
    remove: Iterable[str | os.PathLike] = (),
    base_dir: str | os.PathLike | None = None,
    dry_run: bool = False,
    leftover_min_age_s: float = 60.0,
) -> list[Removal]:
    """Plan (periodic rule + explicitly named files + leftovers of killed runs), then remove unless `dry_run`."""
    explicit = plan_explicit_removal(saved_models_dir, remove, base_dir)  # refuse bad names before any change
    leftovers = plan_leftovers(saved_models_dir, leftover_min_age_s)
    planned = _merge(plan_prune(saved_models_dir, keep_last, best_only), explicit, leftovers)
    return apply_removals(planned, dry_run)


# -------------------------------------------------------------------------------------------- archive


@dataclass
class ArchiveResult:
    """Where the archive went (or would go) and what it holds."""

    path: Path
    files: int
    size: int  # uncompressed bytes of the archived files
    dry_run: bool
    members: list[str] = field(default_factory=list)

    @property
    def archive_size(self) -> int | None:
        return None if self.dry_run else self.path.stat().st_size


def archive_candidates(archive_dir: Path, today: date) -> Iterable[Path]:
    """archived_models_YYYYMMDD.tar.gz, then _2, _3, ... for further archives on the same day."""
    stem = f"{ARCHIVE_PREFIX}{today:%Y%m%d}"
    yield archive_dir / f"{stem}.tar.gz"
    n = 2
    while True:
        yield archive_dir / f"{stem}_{n}.tar.gz"
        n += 1


def _verify_archive(path: Path, expected: Mapping[str, int | None]) -> None:
    """Re-read the whole archive: every expected member with its size, nothing else, gzip CRC intact."""
    try:
        with gzip.open(path, "rb") as gz:
            with tarfile.open(fileobj=gz, mode="r:") as tar:
                found = {m.name: (m.size if m.isfile() else None) for m in tar}
            while gz.read(1 << 20):  # to the end of the stream: the gzip CRC and length are checked there
                pass
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise StorageError(f"{path}: archive failed verification ({type(exc).__name__}: {exc})") from exc
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(k for k in expected if k in found and found[k] != expected[k])
    if missing or extra or wrong:
        raise StorageError(
            f"{path}: archive does not match what was written (missing {missing[:5]}, unexpected {extra[:5]}, "
            f"wrong size {wrong[:5]})"
        )


def archive_saved_models(
    saved_models_dir: str | os.PathLike,
    archive_dir: str | os.PathLike,
    dry_run: bool = False,
    today: date | None = None,
    compress_level: int = 6,
) -> ArchiveResult:
    """Archive saved_models/ to `archive_dir/archived_models_YYYYMMDD[_n].tar.gz`.

    Written to a temporary file beside the target, read back and compared with what was written, then
    hard-linked to its final name, so a crash leaves no truncated archive and an archive made earlier
    the same day is never overwritten. Temporary files of in-flight checkpoint writes are left out.
    """
    root = check_saved_models_dir(saved_models_dir)
    archive_dir = Path(archive_dir).expanduser().absolute()
    real_root, real_archive = os.path.realpath(root), os.path.realpath(archive_dir)
    if os.path.commonpath([real_root, real_archive]) == real_root:
        raise StorageError(f"{archive_dir}: the archive folder must not be inside {root}")
    today = today or date.today()
    entries: list[tuple[Path, str]] = []  # (path, arcname), folders included so empty ones survive
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        d = Path(dirpath)
        entries.append((d, (Path(root.name) / d.relative_to(root)).as_posix()))
        entries += [
            (d / f, (Path(root.name) / (d / f).relative_to(root)).as_posix())
            for f in sorted(filenames)
            if not _TEMP_RE.match(f)
        ]
    files = [(p, a) for p, a in entries if not p.is_dir() or p.is_symlink()]
    n_bytes = sum(os.lstat(p).st_size for p, _ in files)
    if dry_run:
        target = next(t for t in archive_candidates(archive_dir, today) if not t.exists())
        return ArchiveResult(target, len(files), n_bytes, True, [a for _, a in entries])

    archive_dir.mkdir(parents=True, exist_ok=True)
    first = next(iter(archive_candidates(archive_dir, today)))
    with temp_sibling(first) as tmp:
        expected: dict[str, int | None] = {}
        with open(tmp, "wb") as fh:
            with gzip.GzipFile(
                filename=first.name, mode="wb", fileobj=fh, compresslevel=compress_level
            ) as gz:
                with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for path, arcname in entries:
                        info = tar.gettarinfo(path, arcname)
                        if info.isfile():
                            with open(path, "rb") as src:
                                tar.addfile(info, src)
                        else:
                            tar.addfile(info)
                        expected[arcname] = info.size if info.isfile() else None
        finish_temp(tmp)
        _verify_archive(tmp, expected)
        target = publish_first_free(tmp, archive_candidates(archive_dir, today))  # never overwrites
    return ArchiveResult(target, len(files), n_bytes, False, list(expected))


# ------------------------------------------------------------------------------------------------ CLI


ACTIONS = ("report", "prune", "remove", "archive", "clean")


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [str(value)]
    return [str(v) for v in value]


def run_housekeeping(cfg: Mapping[str, Any] | Any) -> dict[str, Any]:
    """Run `cfg.action` from conf/housekeeping.yaml, print what it found or did, return it as a dict.

    `report` lists storage; `prune` removes periodic checkpoints by rule plus any `remove=[...]` paths;
    `remove` removes only the named paths; `archive` writes the tar.gz. `dry_run=true` changes nothing.
    """
    action = str(cfg.get("action", "report"))
    if action not in ACTIONS:
        raise StorageError(f"action={action!r}: expected one of {', '.join(ACTIONS)}")
    saved = Path(str(cfg["saved_models_dir"]))
    root_dir = Path(str(cfg.get("root_dir") or Path.cwd()))
    saved = saved if saved.is_absolute() else root_dir / saved
    named = _as_list(cfg.get("remove"))
    if named and action not in ("prune", "remove"):
        raise StorageError(
            f"remove={named} is only used by action=prune or action=remove (got action={action})"
        )
    if action == "remove" and not named:
        raise StorageError("action=remove needs remove=[path,...] (files under saved_models/)")
    dry_run = bool(cfg.get("dry_run", False))
    fmt = str(cfg.get("format", "text"))
    tag = "[dry run] " if dry_run else ""

    if action == "report":
        report = storage_report(saved)
        out = report.to_dict()
        print(json.dumps(out, indent=2) if fmt == "json" else report.render())
        return out

    if action == "clean":
        done = apply_removals(plan_leftovers(saved, float(cfg.get("leftover_min_age_s", 60))), dry_run)
        out = {"action": action, "dry_run": dry_run, "saved_models_dir": str(check_saved_models_dir(saved)),
               "removed": [r.rel for r in done], "leftovers": [r.describe() for r in done],
               "freed_bytes": sum(r.size for r in done)}  # fmt: skip
        if fmt == "json":
            print(json.dumps(out, indent=2))
        else:
            verb = "would remove" if dry_run else "removed"
            print(f"{tag}clean in {out['saved_models_dir']}: {verb} {len(done)} leftovers of killed runs")
            for r in done:
                print(f"  {verb} leftover: {r.describe()}")
        return out

    if action in ("prune", "remove"):
        keep = cfg.get("keep_last", 3) if action == "prune" else None
        best_only = bool(cfg.get("best_only", False)) if action == "prune" else False
        min_age = float(cfg.get("leftover_min_age_s", 60)) if action == "prune" else float("inf")
        done = prune(
            saved, keep, best_only, named, base_dir=root_dir, dry_run=dry_run, leftover_min_age_s=min_age
        )
        freed = sum(r.size for r in done)
        verb = "would remove" if dry_run else "removed"
        out = {
            "action": action,
            "dry_run": dry_run,
            "saved_models_dir": str(check_saved_models_dir(saved)),
            "removed": [r.rel for r in done],
            "freed_bytes": freed,
        }
        if fmt == "json":
            print(json.dumps(out, indent=2))
        else:
            print(
                f"{tag}{action} in {out['saved_models_dir']}: {verb} {len(done)} files, {human_size(freed)}"
            )
            for r in done:
                print(f"  {verb}: {r.describe()}")
        if not dry_run and fmt != "json":  # the console log handler writes to stdout
            log.info(
                "%s: removed %d files (%s) under %s: %s",
                action,
                len(done),
                human_size(freed),
                saved,
                out["removed"],
            )
        return out

    result = archive_saved_models(
        saved,
        Path(str(cfg.get("archive_dir") or root_dir / "archives")),
        dry_run=dry_run,
        compress_level=int(cfg.get("compress_level", 6)),
    )
    out = {
        "action": "archive",
        "dry_run": dry_run,
        "archive": str(result.path),
        "files": result.files,
        "bytes": result.size,
        "archive_bytes": result.archive_size,
    }
    if fmt == "json":
        print(json.dumps(out, indent=2))
    elif dry_run:
        print(f"{tag}would archive {result.files} files ({human_size(result.size)}) to {result.path}")
    else:
        print(
            f"archived {result.files} files ({human_size(result.size)}) to {result.path} "
            f"({human_size(result.archive_size or 0)}, verified)"
        )
        log.info("archive: %s (%d files)", result.path, result.files)
    return out
