"""What reaches the console, in one place: the library noise medens filters and the main job's quiet stages.

Hydra's `job_logging` (conf/hydra/default.yaml) sends every logger, Lightning's included, through the same two
handlers: the console and the run's log file, so each line is printed once and the file holds everything.
This module adds
- `LibraryNoise`: a logging filter (on both handlers) for library messages nobody can act on;
- `install_warning_filters`: the Python warnings of the same kind (one list below, a reason per entry);
- `quiet_console`: while the main job runs a stage the console shows warnings and errors only (the full INFO
  log still goes to the log file), so a stage is one line with its key metric;
- `log_file`: where that file is, for the console lines that point to it.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

#: Logged messages (regex on the formatted message, by logger-name prefix) dropped from console and log file.
LOG_FILTERS: tuple[tuple[str, str], ...] = (
    # Lightning advertises its cloud products (litlogger, LitServe, ...) on every Trainer: not a run fact.
    ("lightning", r"^💡 Tip:"),
)

#: Python warnings (message regex, category) ignored: emitted by library internals or about choices medens
#: makes on purpose, never actionable by a medens user.
WARNING_FILTERS: tuple[tuple[str, type[Warning]], ...] = (
    # Lightning 2.6 calls a torch pytree API that torch deprecated; fixed by Lightning, not by a user.
    (r".*isinstance\(treespec, LeafSpec\)", Warning),
    # medens' run ownership (medens/training/run_ownership.py) decides which files in saved_models/<modality>/
    # a run may write; Lightning's reminder that the folder holds other files is always true there.
    (r"Checkpoint directory .* exists and is not empty", Warning),
    # medens modules augment on the device in `on_after_batch_transfer` by design (medens/models/xray.py);
    # Lightning notes that the module's hook is the one used, which is the intent.
    (r"You have overridden `on_after_batch_transfer` in `LightningModule`", Warning),
)


class LibraryNoise(logging.Filter):
    """Drop the `LOG_FILTERS` messages (attached to Hydra's console and file handlers)."""

    _compiled = [(prefix, re.compile(pattern)) for prefix, pattern in LOG_FILTERS]

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        for prefix, pattern in self._compiled:
            if (name == prefix or name.startswith(prefix + ".")) and pattern.search(record.getMessage()):
                return False
        return True


def install_warning_filters() -> None:
    """Ignore the `WARNING_FILTERS` warnings (idempotent: `warnings.filterwarnings` replaces duplicates)."""
    for message, category in WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category)


def _console_handlers() -> list[logging.Handler]:
    """The root logger's handlers that write to a terminal stream (Hydra's `console`), not to a file."""
    return [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler)
        and not isinstance(h, logging.FileHandler)
        and getattr(h, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    ]


def log_file() -> Path | None:
    """The run's log file (Hydra's `file` handler on the root logger), None outside a Hydra app."""
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            return Path(h.baseFilename)
    return None


def console_shows(level: int) -> bool:
    """Whether a record of `level` from medens reaches the console now (False inside `quiet_console`)."""
    handlers = _console_handlers()
    return not handlers or any(h.level <= level for h in handlers)


class _Quiet(logging.Filter):
    """Inside a quiet stage, a record carrying a traceback goes to the log file only: the stage line names
    the error and the file, and the console is not flooded with a second copy of the traceback. So do the
    records of the `log_only` loggers."""

    def __init__(self, log_only: tuple[str, ...]) -> None:
        super().__init__()
        self.log_only = log_only

    def filter(self, record: logging.LogRecord) -> bool:
        named = any(record.name == n or record.name.startswith(n + ".") for n in self.log_only)
        return record.exc_info is None and not named


@contextmanager
def quiet_console(level: int = logging.WARNING, log_only: Sequence[str] = ()) -> Iterator[None]:
    """While inside, the console handlers show `level` and above only, without tracebacks, and nothing from
    the loggers named in `log_only` (whose news the caller prints itself); the log file is unchanged.
    Outside a Hydra app (no console handler) this does nothing."""
    handlers = _console_handlers()
    saved = [h.level for h in handlers]
    quiet = _Quiet(tuple(log_only))
    for h in handlers:
        h.setLevel(max(level, h.level))
        h.addFilter(quiet)
    try:
        yield
    finally:
        for h, old in zip(handlers, saved, strict=True):
            h.setLevel(old)
            h.removeFilter(quiet)
