"""Lock files that name their owner, so a refused writer can say who holds the folder.

An advisory `fcntl.flock` does the locking (the kernel drops it when the owner dies, so a lock is
never held by a dead process); the file itself records the owner (pid, host, command, start time)
so a second process can be refused with that name, and a lock file left by a dead owner is reported
as taken over. Used by every generator, cache build and training run that writes shared files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medens.errors import MedensError

log = logging.getLogger(__name__)


class LockHeldError(MedensError, RuntimeError):
    """Another live process holds the lock; the message names it."""


def _owner_record(purpose: str) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "purpose": purpose,
        "command": " ".join(sys.argv)[:500],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def read_lock_owner(path: str | os.PathLike) -> dict[str, Any] | None:
    """The owner recorded in a lock file, or None when it is absent or unreadable."""
    try:
        text = Path(path).read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def pid_alive(pid: int, host: str | None = None) -> bool:
    """Whether `pid` runs on this host (a lock from another host is assumed alive)."""
    if host is not None and host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_owner(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another process (no owner recorded)"
    return (
        f"pid {owner.get('pid')} on {owner.get('host')} ({owner.get('purpose', '?')}, "
        f"started {owner.get('started', '?')}: {owner.get('command', '?')})"
    )


@contextlib.contextmanager
def owned_lock(path: str | os.PathLike, purpose: str, blocking: bool = True) -> Iterator[Path]:
    """Hold an exclusive lock on `path` while the block runs, recording this process as its owner.

    `blocking=False` raises `LockHeldError` naming the current owner instead of waiting. A lock file
    whose recorded owner is dead is taken over with a warning. The lock file is removed on release.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no locking; atomic renames still hold
        yield path
        return
    while True:
        fh = open(path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.close()
            raise LockHeldError(
                f"{path.parent} is in use: the lock {path} is held by {describe_owner(read_lock_owner(path))}. "
                "Wait for it to finish, or stop it."
            ) from None
        try:  # the previous owner may have removed the file while we waited: lock the current one
            if os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        fh.close()
    try:
        stale = read_lock_owner(path)
        if stale and stale.get("pid") != os.getpid() and not pid_alive(stale.get("pid", -1), stale.get("host")):
            log.warning("taking over the stale lock %s left by %s, which is no longer running",
                        path, describe_owner(stale))
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(_owner_record(purpose)))
        fh.flush()
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                # unlink before unlocking: a waiter that then locks the old inode re-checks below
                path.unlink()
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    finally:
        fh.close()
