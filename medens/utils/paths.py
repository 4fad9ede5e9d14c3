"""Where medens keeps its caches: one root, one environment variable (`MEDENS_CACHE`), one function."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

#: The environment variable that moves every medens cache (CT patches, MRI volumes, X-ray images, features).
CACHE_ENV = "MEDENS_CACHE"
#: The MRI cache's old variable, still read (with a warning) when `MEDENS_CACHE` is unset.
DEPRECATED_CACHE_ENV = "MEDENS_CACHE_DIR"


def cache_root(default: str | os.PathLike | None = None) -> Path:
    """The folder under which each cache takes a subfolder (`<root>/ct`, `<root>/mri`, ...).

    `$MEDENS_CACHE` when set; else the deprecated `$MEDENS_CACHE_DIR` (FutureWarning); else `default`
    (the configs pass `<paths.data_dir>/cache`, see `paths.cache_dir`); else `$XDG_CACHE_HOME/medens` or
    `~/.cache/medens`.
    """
    value = os.environ.get(CACHE_ENV)
    if not value and os.environ.get(DEPRECATED_CACHE_ENV):
        value = os.environ[DEPRECATED_CACHE_ENV]
        warnings.warn(
            f"${DEPRECATED_CACHE_ENV}={value} is deprecated: set ${CACHE_ENV} instead (the one cache root "
            "for every medens cache)",
            FutureWarning,
            stacklevel=2,
        )
    if not value and default is not None and str(default):
        value = os.fspath(default)
    if not value:
        value = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "medens")
    return Path(value).expanduser()
