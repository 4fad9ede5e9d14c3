"""One file digest and one document digest for the whole project: checkpoints, exports, caches and manifests
pin files with `sha256_file`; cache keys, stage stamps and hyperparameter pins hash JSON with `sha256_json`."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex SHA-256 of a JSON document in canonical form (sorted keys; non-JSON values as their ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def sha256_text(text: str) -> str:
    """Hex SHA-256 of a string's UTF-8 bytes (e.g. a list of names joined by newlines)."""
    return hashlib.sha256(text.encode()).hexdigest()
