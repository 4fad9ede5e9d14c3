"""Strict JSON for every report and metrics file medens writes: NaN and infinities become null.

Python's ``json`` writes bare ``NaN``/``Infinity`` by default, which is not JSON (browsers, ``jq``,
most other languages refuse the file). Every report goes through :func:`to_strict` and is written with
``allow_nan=False``, so a NaN can never reach a file unnoticed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from medens.utils.atomic import atomic_write_text


def to_strict(obj: Any) -> Any:
    """A copy of ``obj`` with plain JSON types only: NaN/inf -> None, numpy scalars/arrays -> Python,
    paths -> str, tuples/sets -> lists."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): to_strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_strict(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    tolist = getattr(obj, "tolist", None)  # numpy scalars and arrays, torch tensors
    if callable(tolist):
        return to_strict(tolist())
    item = getattr(obj, "item", None)
    if callable(item):
        return to_strict(item())
    return str(obj)


def dumps_strict(obj: Any, indent: int | None = 2) -> str:
    """``json.dumps`` of :func:`to_strict` (obj) with ``allow_nan=False``."""
    return json.dumps(to_strict(obj), indent=indent, allow_nan=False)


def write_json_strict(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON atomically (temporary file beside it, fsync, rename)."""
    return atomic_write_text(path, dumps_strict(obj, indent) + "\n")


def write_json_and_markdown(out_dir: str | os.PathLike, stem: str, report: Any, markdown: Callable[[Any], str]) -> Path:
    """`<stem>.json` (strict) and `<stem>.md` (`markdown(report)`) in `out_dir`, each atomically; returns the
    Markdown file's path."""
    write_json_strict(Path(out_dir) / f"{stem}.json", report)
    return atomic_write_text(Path(out_dir) / f"{stem}.md", markdown(report))


def read_json_or_none(path: str | os.PathLike) -> Any | None:
    """The JSON in `path`, or None when the file is missing, unreadable or not JSON: for stamps, markers
    and caches, where such a file means "not there yet, build it again"."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_json_object(path: str | os.PathLike, what: str, error: type[Exception]) -> dict[str, Any]:
    """The JSON object in `path`; `error` naming the file and `what` it should be when the file is
    unreadable, not JSON, or not an object."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise error(f"{path}: unreadable {what} ({exc})") from exc
    if not isinstance(doc, dict):
        raise error(f"{path}: {what} is not a JSON object")
    return doc
