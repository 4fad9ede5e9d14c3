"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """The real samples folder (`MEDENS_SAMPLES`); tests that need it skip where it is unset."""
    value = os.environ.get("MEDENS_SAMPLES")
    if not value:
        pytest.skip("MEDENS_SAMPLES is not set: the real-sample tests need ../shared/data")
    path = Path(value).resolve()
    if not path.is_dir():
        pytest.skip(f"MEDENS_SAMPLES={value} is not a directory")
    return path
