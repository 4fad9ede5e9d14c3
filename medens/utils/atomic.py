"""Writes that readers never see half done: every file and folder medens writes goes through here.

A file is written to a temporary sibling `.<name>.<random>.tmp` (same folder, so the final rename is atomic
on one file system), fsynced, given the permissions a plain `open()` would give it, then renamed over the
target and the folder fsynced. A crash or an error leaves the target as it was, and the temporary name never
ends in `.pth` or any other extension a reader globs for, so a half-written file is never taken for a
checkpoint or a report; `medens.training.run_ownership.remove_leftover_temp_files` and
`scripts/housekeeping.py action=clean` recognise the name and remove what a killed writer left.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Suffix of every temporary file of an atomic write.
TEMP_SUFFIX = ".tmp"


def _fsync_dir(folder: Path) -> None:
    """Persist a rename in `folder` (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def publish_exclusive(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename `tmp` to `path` unless `path` exists (then FileExistsError and `tmp` is left to its owner):
    a hard link fails atomically on an existing name; file systems without hard links get check-then-rename."""
    tmp, path = Path(tmp), Path(path)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        if path.exists():
            raise FileExistsError(f"{path} already exists") from None
        os.replace(tmp, path)
    else:
        tmp.unlink()
    _fsync_dir(path.parent)


def publish_first_free(tmp: str | os.PathLike, candidates: Iterable[Path]) -> Path:
    """Give `tmp` the first name in `candidates` that is free, never replacing an existing file."""
    for target in candidates:
        try:
            publish_exclusive(tmp, target)
        except FileExistsError:
            continue
        return Path(target)
    raise FileExistsError(f"no free name for {tmp}")


@contextmanager
def temp_sibling(path: str | os.PathLike, *, suffix: str = TEMP_SUFFIX) -> Iterator[Path]:
    """Yield a new empty temporary file `.<name>.<random><suffix>` beside `path`, removed on exit unless it
    was published; for writers that choose the final name themselves (`publish_first_free`). Call
    `finish_temp` before publishing. `atomic_path` is the usual way in."""
    path = Path(path)
    if suffix.endswith(".pth"):
        raise ValueError(f"temporary suffix {suffix!r} for {path} ends in .pth: it would look like a checkpoint")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def finish_temp(tmp: str | os.PathLike) -> None:
    """fsync a written temporary file and give it the permissions a plain `open()` would have (mkstemp: 0600)."""
    os.chmod(tmp, _default_mode())
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())


@contextmanager
def atomic_path(
    path: str | os.PathLike, *, suffix: str = TEMP_SUFFIX, exclusive: bool = False
) -> Iterator[Path]:
    """Yield a temporary path beside `path`; write it in the `with` body, and on a clean exit it is fsynced
    and renamed over `path` (with `exclusive=True` an existing `path` is never replaced: FileExistsError).
    On any error the temporary file is removed and `path` is untouched.

    `suffix` is for writers that insist on an extension (ONNX, TorchScript: `".tmp.onnx"`); it must not end
    in `.pth`, which would make a half-written file look like a checkpoint.
    """
    path = Path(path)
    with temp_sibling(path, suffix=suffix) as tmp:
        yield tmp
        finish_temp(tmp)
        if exclusive:
            publish_exclusive(tmp, path)
        else:
            os.replace(tmp, path)
            _fsync_dir(path.parent)


def atomic_write_text(
    path: str | os.PathLike, text: str, *, exclusive: bool = False, encoding: str = "utf-8"
) -> Path:
    """Write `text` to `path` atomically (see `atomic_path`); returns `path`."""
    with atomic_path(path, exclusive=exclusive) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def write_csv(frame: Any, path: str | os.PathLike) -> Path:
    """Write a pandas DataFrame to `path` as CSV without its index, atomically; returns `path`."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike, *, exclusive: bool = False) -> Path:
    """Copy `src`'s bytes over `dst` atomically (readers see the old or the new file); returns `dst`."""
    with atomic_path(dst, exclusive=exclusive) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def replace_folder_atomically(out: str | os.PathLike, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp)` in a hidden sibling of `out`, then rename it over `out` (an old `out` is moved
    aside first and deleted after). A crash or error in `build` leaves `out` as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        build(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
