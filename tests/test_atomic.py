"""medens.utils.atomic: the one atomic file write every writer in medens goes through."""

from __future__ import annotations

import os
import stat

import pytest

from medens.utils.atomic import atomic_copy, atomic_path, atomic_write_text, publish_first_free, temp_sibling
from medens.utils.jsonio import write_json_strict


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "report.json"
    atomic_write_text(target, "old")
    write_json_strict(target, {"auc": float("nan")})
    assert target.read_text() == '{\n  "auc": null\n}\n'
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask, "the permissions a plain open() gives"


def test_error_in_body_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "model_best.pth"
    target.write_bytes(b"old")
    seen = []
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            seen.append(tmp.name)
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model_best.pth"]
    name = seen[0]
    assert name.startswith(".model_best.pth.") and name.endswith(".tmp") and not name.endswith(".pth")


def test_temp_suffix_may_not_look_like_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"\.pth"):
        with atomic_path(tmp_path / "x.pth", suffix=".tmp.pth"):
            pass


def test_exclusive_never_replaces(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"new")
    dst = tmp_path / "v1.pth"
    atomic_copy(src, dst, exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write_text(dst, "other", exclusive=True)
    assert dst.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["src.bin", "v1.pth"]


def test_publish_first_free_skips_taken_names(tmp_path):
    (tmp_path / "a.tar.gz").write_text("taken")
    with temp_sibling(tmp_path / "a.tar.gz") as tmp:
        tmp.write_text("mine")
        got = publish_first_free(tmp, [tmp_path / "a.tar.gz", tmp_path / "a_1.tar.gz"])
    assert got.name == "a_1.tar.gz" and got.read_text() == "mine"
    assert (tmp_path / "a.tar.gz").read_text() == "taken"
    assert sorted(os.listdir(tmp_path)) == ["a.tar.gz", "a_1.tar.gz"]
