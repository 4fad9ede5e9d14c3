"""Shared pytest fixtures (helpers: tests/helpers.py; real servers: tests/servers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import ONE_EPOCH, TINY_CT, TINY_MRI, TINY_XRAY, compose, train_in_process


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


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """A project root with one tiny X-ray, CT and MRI model (one epoch each, trained in-process once per
    session) and their data: the shared start of the serve and evaluation tests. Read-only: a test that
    writes next to the models works on a copy (`copy_root`)."""
    root = tmp_path_factory.mktemp("tiny_models")
    for overrides in (TINY_XRAY, ["experiment=ct", *TINY_CT], TINY_MRI):
        train_in_process(root, *overrides, *ONE_EPOCH)
    return root


@pytest.fixture
def compose_train(tmp_path: Path):
    """Compose the real conf/train.yaml with overrides, all paths redirected into tmp_path."""

    def _compose(*overrides: str):
        return compose("train", *overrides, root=tmp_path)

    return _compose
