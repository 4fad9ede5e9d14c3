"""One cache root (`MEDENS_CACHE`, `paths.cache_dir`) for every medens cache; `MEDENS_CACHE_DIR` is deprecated."""

from __future__ import annotations

from pathlib import Path

import pytest

from medens.utils.paths import cache_root
from tests.helpers import compose


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDENS_CACHE", raising=False)
    monkeypatch.delenv("MEDENS_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "medens"
    assert cache_root(tmp_path / "cfg") == tmp_path / "cfg"
    monkeypatch.setenv("MEDENS_CACHE_DIR", str(tmp_path / "old"))
    with pytest.warns(FutureWarning, match="MEDENS_CACHE_DIR.*deprecated.*MEDENS_CACHE"):
        assert cache_root(tmp_path / "cfg") == tmp_path / "old"
    monkeypatch.setenv("MEDENS_CACHE", str(tmp_path / "new"))
    assert cache_root(tmp_path / "cfg") == tmp_path / "new"


@pytest.mark.parametrize("experiment", ["xray", "ct", "mri", "ensemble"])
def test_every_cache_follows_medens_cache(monkeypatch, tmp_path, experiment):
    monkeypatch.setenv("MEDENS_CACHE", str(tmp_path / "c"))
    cfg = compose("train", f"experiment={experiment}", f"paths.root_dir={tmp_path}")
    data = cfg.data
    where = data.cache.dir if experiment == "xray" else data.cache_dir
    assert Path(str(where)).parent == tmp_path / "c", where
