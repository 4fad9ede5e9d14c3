"""One run owns its files: where a training run writes, and that no other run writes there.

A training run writes into `saved_models/<modality>/` (the canonical folder) only when that folder holds
nothing of its model yet, or when it continues the run that wrote it (`ckpt_path=` a checkpoint in that
folder). Otherwise `on_existing` decides, before any data or model work:

- `new_run` (default): the run writes under `saved_models/<modality>/runs/<run_id>/` and, when it ends,
  *publishes* its best checkpoint (and its history/record JSON files) to the canonical names, atomically,
  only when it is better than the canonical best by the checkpoints' own `best_metric` and the monitor
  mode (`publish=better`), always (`publish=always`: the main job's reruns) or never (`publish=never`);
- `resume`: continue the previous run from its newest `<name>_last.pth` / periodic checkpoint;
- `refuse`: stop with an error naming the existing files and these options.

The whole folder is locked (`saved_models/<modality>/.run.lock`, owner pid recorded) for the run's life,
because `training_history.json` (and the ensemble's record files) are per folder: a second concurrent
training of the same folder is refused naming the first's pid. Temporary files left there by killed
saves are removed when a run starts. Training never writes a versioned (promoted) name.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from medens.errors import CheckpointError, ConfigError
from medens.training.cluster import global_rank
from medens.utils.atomic import atomic_copy
from medens.utils.locking import owned_lock

log = logging.getLogger(__name__)

ON_EXISTING = ("new_run", "resume", "refuse")
PUBLISH = ("better", "always", "never")
RUNS_DIR = "runs"
LOCK_NAME = ".run.lock"
LAST_SUFFIX = "_last"
#: Temporary files of atomic saves: `.<target name>.<random>.tmp` (never ending in `.pth`).
TEMP_RE = re.compile(r"^\.(?P<target>.+)\.[^.]+\.tmp$")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_CHECKPOINT_EXT = ".pth"


def new_run_id() -> str:
    """A sortable, unique run id: `<UTC time>-<random>`. Ranks started by torchrun or SLURM derive it from
    the job's own id instead, so every rank of one job names the same run folder."""
    elastic = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if elastic and elastic != "none":
        return f"torchrun-{elastic}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def remove_leftover_temp_files(folder: Path, recursive: bool = True, min_age_s: float = 0.0) -> list[Path]:
    """Remove `.<name>.<random>.tmp` files of killed saves in `folder` (and its `runs/*/`), except those of
    versioned names (a promotion's own rollback handles them). Returns what was removed (logged)."""
    from medens.registry.versioning import split_checkpoint_name

    folders = [folder]
    if recursive and (folder / RUNS_DIR).is_dir():
        folders += sorted(p for p in (folder / RUNS_DIR).iterdir() if p.is_dir())
    removed = []
    now = time.time()
    for f in folders:
        if not f.is_dir():
            continue
        for p in sorted(f.iterdir()):
            m = TEMP_RE.match(p.name)
            if not m or not p.is_file():
                continue
            try:
                if split_checkpoint_name(m.group("target"))[2] is not None:
                    continue
            except Exception:  # an odd name is still a temp file of ours
                pass
            try:
                if min_age_s and now - p.stat().st_mtime < min_age_s:
                    continue
                p.unlink()
            except FileNotFoundError:
                continue
            log.warning("removed %s: the temporary file of a save that never finished (a killed run)", p)
            removed.append(p)
    return removed


def _checkpoint_score(path: Path) -> tuple[Any, Any]:
    """(monitor, best_metric) recorded in a medens checkpoint, read without loading the tensors."""
    from medens.checkpoint.io import load_checkpoint

    ckpt = load_checkpoint(path, mmap=True)  # unreadable or not medens: CheckpointError naming the file
    return ckpt.get("monitor"), ckpt.get("best_metric")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


@dataclass
class RunFiles:
    """Where this run writes and what it decided; built by `claim_run_files`."""

    canonical_dir: Path
    write_dir: Path
    name: str
    best_name: str
    action: str  # fresh | continue | resume | new_run
    run_id: str | None = None
    publish: str = "better"
    monitor_mode: str = "max"
    rank_zero: bool = True
    record_names: list[str] = field(default_factory=list)
    published: Path | None = None

    @property
    def last_path(self) -> Path:
        return self.write_dir / f"{self.name}{LAST_SUFFIX}{_CHECKPOINT_EXT}"

    @property
    def under_run_id(self) -> bool:
        return self.write_dir != self.canonical_dir

    def publish_best(self, best: str | os.PathLike | None) -> Path | None:
        """Publish this run's best checkpoint (and record files) to the canonical names, by `publish`.

        Returns the canonical path when published. Only a run under a run id publishes; a run that
        writes the canonical folder itself already wrote there.
        """
        if not self.rank_zero or not self.under_run_id or best is None or not Path(best).is_file():
            return None
        best = Path(best)
        dst = self.canonical_dir / self.best_name
        if self.publish == "never":
            log.info("publish=never: %s stays unpublished (canonical %s unchanged)", best, dst)
            return None
        if self.publish == "better" and dst.is_file():
            try:
                new_monitor, new = _checkpoint_score(best)
                old_monitor, old = _checkpoint_score(dst)
            except CheckpointError as exc:  # nothing is replaced that could not be compared
                raise CheckpointError(f"{exc}; publish=better cannot compare {best} with {dst}, so {best} stays "
                                      f"unpublished (publish=always replaces {dst.name})") from exc  # fmt: skip
            reason = None
            if old_monitor is not None and new_monitor is not None and old_monitor != new_monitor:
                reason = f"it monitors {new_monitor}, the canonical file {old_monitor}: not comparable"
            elif not _finite(new):
                reason = f"its best_metric is {new}"
            elif _finite(old):
                better = new > old if self.monitor_mode == "max" else new < old
                if not better:
                    reason = f"its {new_monitor} {new:.6g} is not better than {dst.name}'s {old:.6g}"
            if reason:
                log.info("not published: %s (%s); publish=always replaces it", best, reason)
                return None
        for rec in self.record_names:  # records first, the best file last: it names the run's weights
            src = self.write_dir / rec
            if src.is_file():
                atomic_copy(src, self.canonical_dir / rec)
        atomic_copy(best, dst)
        log.info("published %s -> %s (publish=%s)", best, dst, self.publish)
        self.published = dst
        return dst

    def finish(self) -> None:
        """A run that ended normally no longer needs its preemption resume point."""
        if self.rank_zero and self.last_path.is_file():
            self.last_path.unlink()
            log.info("removed %s: the run it resumes has finished", self.last_path)


def signal_received(trainer: Any) -> bool:
    """Whether a `Preemption` callback of this trainer caught a termination signal."""
    return any(getattr(cb, "received", None) is not None for cb in getattr(trainer, "callbacks", []))


def _callback_value(cfg: DictConfig, cb: str, key: str) -> Any:
    node = (cfg.get("callbacks") or {}).get(cb)
    return node.get(key) if isinstance(node, DictConfig) else None


def _periodic_re(name: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(name)}_epoch_(\d+)\.pth$")


def existing_run_files(folder: Path, name: str, best_name: str, records: list[str]) -> list[Path]:
    """Files of model `name` (and the folder's records) that a previous run left in `folder`."""
    if not folder.is_dir():
        return []
    rx = _periodic_re(name)
    found = [folder / n for n in (best_name, f"{name}{LAST_SUFFIX}.pth", *records) if (folder / n).is_file()]
    found += sorted(p for p in folder.iterdir() if rx.match(p.name))
    return found


def newest_resume_point(folder: Path, name: str, best_name: str) -> Path | None:
    """The checkpoint a `resume` continues from: the newest (mtime) `<name>_last.pth` or periodic file,
    else the best file."""
    rx = _periodic_re(name)
    cands = [p for p in folder.iterdir() if rx.match(p.name)] if folder.is_dir() else []
    last = folder / f"{name}{LAST_SUFFIX}.pth"
    if last.is_file():
        cands.append(last)
    if cands:
        return max(cands, key=lambda p: (p.stat().st_mtime, p.name))
    best = folder / best_name
    return best if best.is_file() else None


def find_resume_point(folder: Path, name: str) -> Path | None:
    """The newest `<name>_last.pth` (a preempted run's resume point) in `folder` or its `runs/*/`."""
    cands = [folder / f"{name}{LAST_SUFFIX}.pth"]
    if (folder / RUNS_DIR).is_dir():
        cands += [p / f"{name}{LAST_SUFFIX}.pth" for p in (folder / RUNS_DIR).iterdir()]
    cands = [p for p in cands if p.is_file()]
    return max(cands, key=lambda p: p.stat().st_mtime) if cands else None


def _refuse_versioned_names(cfg: DictConfig, name: str, names: list[str]) -> None:
    from medens.registry.versioning import split_checkpoint_name

    for n in names:
        try:
            version = split_checkpoint_name(n)[2]
        except Exception:
            continue
        if version is not None:
            raise ConfigError(
                f"model.name={name!r} makes training write {n!r}, a versioned (promoted) file name "
                f"(version {version}); promoted versions are immutable and written only by scripts/promote.py. "
                "Train under the plain model name and promote the result."
            )


def _redirect_callbacks(cfg: DictConfig, canonical: Path, run_dir: Path) -> None:
    """Point every callback path inside the canonical folder into the run's folder."""
    cbs = cfg.get("callbacks")
    if not isinstance(cbs, DictConfig):
        return
    root = str(canonical)
    for cb_name in list(cbs.keys()):
        node = cbs.get(cb_name)
        if not isinstance(node, DictConfig):
            continue
        for key in list(node.keys()):
            value = node.get(key)
            if not isinstance(value, str):
                continue
            p = os.path.abspath(value)
            if p == root or p.startswith(root + os.sep):
                if p.startswith(str(canonical / RUNS_DIR) + os.sep):
                    continue
                node[key] = str(run_dir) + p[len(root) :]


def _records(cfg: DictConfig, canonical: Path) -> list[str]:
    """Names of the record files (history, weighted average ...) the callbacks write in the canonical folder."""
    out = []
    for node in (cfg.get("callbacks") or {}).values():
        if not isinstance(node, DictConfig):
            continue
        for key in node.keys():
            value = node.get(key)
            if isinstance(value, str) and value.endswith(".json"):
                p = Path(os.path.abspath(value))
                if p.parent == canonical:
                    out.append(p.name)
    return sorted(set(out))


@contextlib.contextmanager
def claim_run_files(cfg: DictConfig) -> Iterator[RunFiles]:
    """Decide where this run writes (see the module docstring), lock the folder for the run's life,
    rewrite `cfg` accordingly (callback paths, `ckpt_path`, `run_id`) and yield the decision."""
    on_existing = str(cfg.get("on_existing") or "new_run")
    publish = str(cfg.get("publish") or "better")
    if on_existing not in ON_EXISTING:
        raise ConfigError(f"on_existing={on_existing!r}: expected one of {', '.join(ON_EXISTING)}")
    if publish not in PUBLISH:
        raise ConfigError(f"publish={publish!r}: expected one of {', '.join(PUBLISH)}")
    run_id = cfg.get("run_id")
    if run_id is not None and not _RUN_ID_RE.match(str(run_id)):
        raise ConfigError(f"run_id={run_id!r}: use letters, digits, '.', '_' and '-' (a folder name)")
    name = str(cfg.model.name)
    canonical = Path(os.path.abspath(str(cfg.paths.saved_models_dir))) / str(cfg.modality)
    best_fn = _callback_value(cfg, "model_checkpoint_best", "filename") or f"{name}_best"
    periodic_fn = _callback_value(cfg, "model_checkpoint_periodic", "filename") or f"{name}_epoch_{{n_epoch}}"
    best_name = f"{best_fn}{_CHECKPOINT_EXT}"
    _refuse_versioned_names(
        cfg,
        name,
        [best_name, periodic_fn.replace("{n_epoch}", "1") + _CHECKPOINT_EXT, f"{name}{LAST_SUFFIX}.pth"],
    )
    records = _records(cfg, canonical)
    rank_zero = global_rank() == 0
    files = RunFiles(canonical, canonical, name, best_name, "fresh", None, publish,
                     str(cfg.get("monitor_mode") or "max"), rank_zero, records)  # fmt: skip

    lock_cm: contextlib.AbstractContextManager = contextlib.nullcontext()
    if rank_zero:
        try:
            canonical.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(
                f"cannot write the checkpoint folder {canonical} ({type(exc).__name__}: {exc}); "
                f"check paths.saved_models_dir={cfg.paths.saved_models_dir}"
            ) from exc
        lock_cm = owned_lock(canonical / LOCK_NAME, f"training {name}", blocking=False)
    with lock_cm:
        if rank_zero:
            remove_leftover_temp_files(canonical)
        ckpt = cfg.get("ckpt_path")
        log_existing: str | None = None
        ckpt_abs = Path(os.path.abspath(str(ckpt))) if ckpt else None
        if run_id is not None:
            files.action, files.run_id = "continue" if ckpt else "new_run", str(run_id)
            taken = existing_run_files(canonical / RUNS_DIR / str(run_id), name, best_name, records)
            if taken and not ckpt and rank_zero:
                raise CheckpointError(
                    f"run_id={run_id}: {canonical / RUNS_DIR / str(run_id)} already holds "
                    f"{', '.join(p.name for p in taken[:6])}; pass ckpt_path=<one of them> to continue that run, "
                    "or choose another run_id"
                )
        elif ckpt_abs is not None and ckpt_abs.parent == canonical:
            files.action = "continue"
        elif ckpt_abs is not None and ckpt_abs.parent.parent == canonical / RUNS_DIR:
            files.action, files.run_id = "continue", ckpt_abs.parent.name
        else:
            existing = existing_run_files(canonical, name, best_name, records)
            if existing:
                shown = ", ".join(p.name for p in existing[:6]) + (" ..." if len(existing) > 6 else "")
                if on_existing == "refuse":
                    raise CheckpointError(
                        f"{canonical} already holds {shown} from an earlier run, and on_existing=refuse. "
                        "Choose on_existing=resume (continue it), on_existing=new_run (train under "
                        "runs/<run_id>/ and publish the best if better), or ckpt_path=<file> to resume exactly."
                    )
                point = newest_resume_point(canonical, name, best_name) if on_existing == "resume" else None
                if point is not None and ckpt is None:
                    files.action = "resume"
                    with open_dict(cfg):
                        cfg.ckpt_path = str(point)
                else:
                    if on_existing == "resume":
                        log.warning(
                            "on_existing=resume: no checkpoint of %s to resume in %s; starting a new run id",
                            name,
                            canonical,
                        )
                    files.action, files.run_id = "new_run", new_run_id()
                log_existing = shown
        if files.run_id is not None:
            files.write_dir = canonical / RUNS_DIR / files.run_id
            _redirect_callbacks(cfg, canonical, files.write_dir)
            if rank_zero:
                files.write_dir.mkdir(parents=True, exist_ok=True)
                remove_leftover_temp_files(files.write_dir, recursive=False)
        with open_dict(cfg):
            cfg.run_id = files.run_id
        if rank_zero:
            what = {
                "fresh": f"writes {canonical}/ (no earlier files of {name})",
                "continue": f"continues the run in {files.write_dir}/ from ckpt_path={cfg.get('ckpt_path')}",
                "resume": f"on_existing=resume: resumes from {cfg.get('ckpt_path')} (found {log_existing})",
                "new_run": (
                    f"writes under run id {files.run_id}: {files.write_dir}/"
                    + (
                        f" ({canonical} already holds {log_existing}; on_existing=new_run)"
                        if log_existing
                        else ""
                    )
                    + f"; publish={publish}"
                ),
            }[files.action]
            log.info("run files: %s", what)
        yield files
