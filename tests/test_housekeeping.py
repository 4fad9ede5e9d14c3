"""Checkpoint housekeeping on a fake saved_models/ tree: report, prune, explicit removal, archive, CLI."""

from __future__ import annotations

import json
import os
import tarfile
from datetime import date
from pathlib import Path

import pytest

from medens.storage import (
    StorageError,
    archive_saved_models,
    classify,
    human_size,
    plan_prune,
    prune,
    scan,
    storage_report,
)
from tests.helpers import cli_ok, run_cli

DAY = date(2024, 3, 9)

# rel path -> size in bytes; distinct sizes so that sums identify the files counted.
PROTECTED = {
    "xray/resnet50_best.pth": 300,
    "xray/training_history.json": 7,
    "xray/resnet50_v1.1.0_best.pth": 310,
    "xray/resnet50_v1.1.0_best.json": 11,
    "xray/resnet50_v1.1.0_epoch_5.pth": 13,  # versioned wins over the periodic pattern
    "ct/3dcnn_best.pth": 200,
    "ct/training_history.json": 5,
    "mri/unet_best.pth": 400,
    "ensemble/meta_learner.pth": 50,
    "ensemble/weighted_average.json": 3,
    "ensemble/ensemble_history.json": 4,
    "exports/xray_torchscript.pt": 120,
    "exports/ct_onnx.onnx": 80,
    "exports/resnet50_epoch_5.pth": 17,  # exports are never periodic checkpoints
    "notes.txt": 2,
}
PERIODIC = {
    **{f"xray/resnet50_epoch_{n}.pth": 100 + n for n in (5, 10, 15, 20, 100)},
    **{f"xray/resnet18_epoch_{n}.pth": 30 + n for n in (3, 6)},
    **{f"ct/3dcnn_epoch_{n}.pth": 60 + n for n in (9, 10, 11, 12)},
}
TREE = {**PROTECTED, **PERIODIC}


def make_tree(root: Path, files: dict[str, int] = TREE) -> Path:
    saved = root / "saved_models"
    for rel, size in files.items():
        p = saved / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bytes((hash(rel) + i) % 256 for i in range(size)))
    (saved / "empty").mkdir()
    return saved


def files_under(saved: Path) -> set[str]:
    return {p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()}


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its bytes (files) and mtime: equal snapshots mean nothing changed."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[p.relative_to(root).as_posix()] = (p.read_bytes() if p.is_file() else None, st.st_mtime_ns)
    return out


@pytest.mark.parametrize(
    "rel, kind, model, epoch",
    [
        ("xray/resnet50_best.pth", "best", None, None),
        ("ensemble/meta_learner.pth", "best", None, None),
        ("xray/resnet50_epoch_100.pth", "periodic", "resnet50", 100),
        ("mri/unet_3d_epoch_05.pth", "periodic", "unet_3d", 5),
        ("xray/resnet50_v1.1.0_best.pth", "versioned", None, None),
        ("xray/resnet50_v1.1.0_best.json", "versioned", None, None),
        ("xray/resnet50_v2.0.0-rc.1_epoch_5.pth", "versioned", None, None),
        ("xray/training_history.json", "records", None, None),
        ("ensemble/weighted_average.json", "records", None, None),
        ("exports/resnet50_epoch_5.pth", "exports", None, None),
        ("xray/.resnet50_best.pth.abc.tmp", "other", None, None),
        ("xray/resnet50_epoch_x.pth", "other", None, None),
    ],
)
def test_classify(rel, kind, model, epoch):
    assert classify(rel) == (kind, model, epoch)


def test_report_matches_the_tree(tmp_path):
    saved = make_tree(tmp_path)
    rep = storage_report(saved)
    by_group: dict[str, list[int]] = {}
    for rel, size in TREE.items():
        by_group.setdefault(rel.split("/")[0] if "/" in rel else ".", []).append(size)
    assert set(rep.folders) == set(by_group) | {"empty"}
    for group, sizes in by_group.items():
        assert (rep.folders[group].size, rep.folders[group].files) == (sum(sizes), len(sizes)), group
    assert (rep.folders["empty"].size, rep.folders["empty"].files) == (0, 0)
    assert (rep.total.size, rep.total.files) == (sum(TREE.values()), len(TREE))
    kinds = {k: (v.size, v.files) for k, v in rep.kinds.items()}
    assert kinds["periodic"] == (sum(PERIODIC.values()), len(PERIODIC))
    assert kinds["best"] == (300 + 200 + 400 + 50, 4)
    assert kinds["versioned"] == (310 + 11 + 13, 3)
    assert kinds["records"] == (7 + 5 + 3 + 4, 4)
    assert kinds["exports"] == (120 + 80 + 17, 3)
    assert kinds["other"] == (2, 1)
    assert rep.folder_kinds["xray"]["periodic"].files == 7
    assert rep.periodic == {
        "ct/3dcnn": [9, 10, 11, 12],
        "xray/resnet18": [3, 6],
        "xray/resnet50": [5, 10, 15, 20, 100],
    }
    text = rep.render()
    xray_line = next(line.split() for line in text.splitlines() if line.startswith("  xray/"))
    assert xray_line[1:4] == [human_size(rep.folders["xray"].size), str(rep.folders["xray"].files), "files"]
    assert "xray/resnet50: 5, 10, 15, 20, 100" in text
    assert json.loads(json.dumps(rep.to_dict()))["total"]["files"] == len(TREE)


def test_human_size():
    assert [human_size(n) for n in (0, 1023, 1024, 1536, 5 * 1024**2, 3 * 1024**3)] == [
        "0B",
        "1023B",
        "1.0K",
        "1.5K",
        "5.0M",
        "3.0G",
    ]


def test_keep_last_is_by_epoch_number_per_folder_and_model(tmp_path):
    saved = make_tree(tmp_path)
    # mtimes opposite to epoch order: the newest file on disk is epoch 5, which must still go.
    for i, n in enumerate((100, 20, 15, 10, 5)):
        os.utime(saved / f"xray/resnet50_epoch_{n}.pth", (1_000_000 + i, 1_000_000 + i))
    removed = prune(saved, keep_last=3)
    assert [r.rel for r in removed] == [
        "ct/3dcnn_epoch_9.pth",  # lexically "9" > "12": a string sort would have removed epoch 10
        "xray/resnet50_epoch_10.pth",
        "xray/resnet50_epoch_5.pth",
    ]
    left = files_under(saved)
    assert {f for f in left if "resnet50_epoch" in f and f.startswith("xray/")} == {
        "xray/resnet50_epoch_15.pth",
        "xray/resnet50_epoch_20.pth",
        "xray/resnet50_epoch_100.pth",
    }
    assert {"xray/resnet18_epoch_3.pth", "xray/resnet18_epoch_6.pth"} <= left  # only 2: all kept
    assert set(PROTECTED) <= left
    assert prune(saved, keep_last=3) == []  # idempotent


def test_best_only_removes_every_periodic_and_nothing_else(tmp_path):
    saved = make_tree(tmp_path)
    protected_bytes = {rel: (saved / rel).read_bytes() for rel in PROTECTED}
    removed = prune(saved, best_only=True, keep_last=10)
    assert {r.rel for r in removed} == set(PERIODIC)
    assert files_under(saved) == set(PROTECTED)
    assert {rel: (saved / rel).read_bytes() for rel in PROTECTED} == protected_bytes
    assert (saved / "empty").is_dir()


def test_keep_last_zero_and_null(tmp_path):
    saved = make_tree(tmp_path)
    assert plan_prune(saved, keep_last=None) == []
    assert {r.rel for r in plan_prune(saved, keep_last=0)} == set(PERIODIC)
    with pytest.raises(StorageError, match="keep_last"):
        plan_prune(saved, keep_last=-1)


def test_explicit_removal_of_protected_files(tmp_path):
    saved = make_tree(tmp_path)
    removed = prune(
        saved,
        keep_last=None,
        remove=["saved_models/xray/resnet50_best.pth", str(saved / "exports/ct_onnx.onnx")],
        base_dir=tmp_path,
    )
    assert [(r.rel, r.kind) for r in removed] == [
        ("exports/ct_onnx.onnx", "exports"),
        ("xray/resnet50_best.pth", "best"),
    ]
    assert files_under(saved) == set(TREE) - {"xray/resnet50_best.pth", "exports/ct_onnx.onnx"}


@pytest.mark.parametrize(
    "name, message",
    [
        ("outside.pth", "outside"),
        ("saved_models/../outside.pth", "outside"),
        ("saved_models/xray/missing_best.pth", "no such file"),
        ("saved_models/xray", "folder"),
        ("saved_models", "saved_models folder itself"),
    ],
)
def test_explicit_removal_refusals_change_nothing(tmp_path, name, message):
    saved = make_tree(tmp_path)
    (tmp_path / "outside.pth").write_bytes(b"keep me")
    before = snapshot(tmp_path)
    with pytest.raises(StorageError, match=message) as err:
        # a valid name first: the whole request is refused before anything is removed
        prune(saved, keep_last=0, remove=["saved_models/ct/3dcnn_best.pth", name], base_dir=tmp_path)
    assert name in str(err.value)
    assert snapshot(tmp_path) == before


def test_symlinked_folder_cannot_smuggle_outside_paths(tmp_path):
    saved = make_tree(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "precious_best.pth").write_bytes(b"x")
    (saved / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StorageError, match="outside"):
        prune(saved, keep_last=None, remove=["saved_models/link/precious_best.pth"], base_dir=tmp_path)
    assert (tmp_path / "elsewhere" / "precious_best.pth").exists()


def test_dry_run_changes_nothing_and_lists_what_a_real_run_does(tmp_path):
    saved = make_tree(tmp_path)
    before = snapshot(tmp_path)
    names = ["saved_models/mri/unet_best.pth"]
    planned = prune(saved, keep_last=1, remove=names, base_dir=tmp_path, dry_run=True)
    assert snapshot(tmp_path) == before
    assert len(planned) == 4 + 3 + 1 + 1  # resnet50, 3dcnn, resnet18 periodic beyond the newest + named
    archived = archive_saved_models(saved, tmp_path / "archives", dry_run=True, today=DAY)
    assert archived.path == tmp_path / "archives" / "archived_models_20240309.tar.gz"
    assert archived.files == len(TREE)
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "archives").exists()

    done = prune(saved, keep_last=1, remove=names, base_dir=tmp_path)
    assert done == planned
    assert files_under(saved) == set(TREE) - {r.rel for r in planned}


def test_archive_contents_name_and_no_overwrite(tmp_path):
    saved = make_tree(tmp_path)
    res = archive_saved_models(saved, tmp_path / "archives", today=DAY)
    assert res.path == tmp_path / "archives" / "archived_models_20240309.tar.gz"
    with tarfile.open(res.path, "r:gz") as tar:
        members = {m.name: m for m in tar}
        assert {n for n, m in members.items() if m.isfile()} == {f"saved_models/{r}" for r in TREE}
        assert members["saved_models/empty"].isdir()
        rel = "xray/resnet50_epoch_100.pth"
        assert tar.extractfile(f"saved_models/{rel}").read() == (saved / rel).read_bytes()
    first = res.path.read_bytes()

    (saved / "xray" / "resnet50_epoch_105.pth").write_bytes(b"new")
    res2 = archive_saved_models(saved, tmp_path / "archives", today=DAY)
    assert res2.path.name == "archived_models_20240309_2.tar.gz"
    assert res.path.read_bytes() == first  # the morning's archive is untouched
    with tarfile.open(res2.path, "r:gz") as tar:
        assert "saved_models/xray/resnet50_epoch_105.pth" in tar.getnames()
    assert archive_saved_models(saved, tmp_path / "archives", today=DAY, dry_run=True).path.name == (
        "archived_models_20240309_3.tar.gz"
    )
    assert sorted(p.name for p in (tmp_path / "archives").iterdir()) == [
        "archived_models_20240309.tar.gz",
        "archived_models_20240309_2.tar.gz",
    ]
    with pytest.raises(StorageError, match="must not be inside"):
        archive_saved_models(saved, saved / "archives", today=DAY)


def test_archive_crash_leaves_no_partial_file(tmp_path, monkeypatch):
    saved = make_tree(tmp_path)
    calls = {"n": 0}
    real_addfile = tarfile.TarFile.addfile

    def failing_addfile(self, tarinfo, fileobj=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real_addfile(self, tarinfo, fileobj)

    monkeypatch.setattr(tarfile.TarFile, "addfile", failing_addfile)
    with pytest.raises(OSError, match="disk full"):
        archive_saved_models(saved, tmp_path / "archives", today=DAY)
    assert list((tmp_path / "archives").iterdir()) == []


def test_archive_verification_catches_a_missing_member(tmp_path, monkeypatch):
    saved = make_tree(tmp_path, {"xray/resnet50_best.pth": 10, "ct/3dcnn_best.pth": 10})
    real_addfile = tarfile.TarFile.addfile

    def dropping_addfile(self, tarinfo, fileobj=None):
        if tarinfo.name.endswith("3dcnn_best.pth"):
            return None  # silently lost: what the read-back must catch
        return real_addfile(self, tarinfo, fileobj)

    monkeypatch.setattr(tarfile.TarFile, "addfile", dropping_addfile)
    with pytest.raises(StorageError, match="missing.*3dcnn_best"):
        archive_saved_models(saved, tmp_path / "archives", today=DAY)
    assert list((tmp_path / "archives").iterdir()) == []


def test_missing_saved_models_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "saved_models"
    for call in (
        lambda: storage_report(missing),
        lambda: prune(missing, keep_last=3),
        lambda: archive_saved_models(missing, tmp_path / "archives"),
        lambda: scan(missing),
    ):
        with pytest.raises(StorageError, match="saved_models folder not found") as err:
            call()
        assert str(missing) in str(err.value)
    assert not (tmp_path / "archives").exists()


@pytest.mark.slow
def test_cli_report_dry_run_prune_archive(tmp_path):
    saved = make_tree(tmp_path)
    out = cli_ok(run_cli("housekeeping.py", "format=json", root=tmp_path, timeout=120))
    assert json.loads(out)["total"] == {
        "size": sum(TREE.values()),
        "size_human": human_size(sum(TREE.values())),
        "files": len(TREE),
    }

    before = snapshot(saved)
    out = cli_ok(
        run_cli("housekeeping.py", "action=prune", "keep_last=3", "--dry-run", root=tmp_path, timeout=120)
    )
    assert snapshot(saved) == before
    would = {
        line.split("would remove: ")[1].split(" (")[0]
        for line in out.splitlines()
        if "would remove: " in line
    }
    assert would == {"xray/resnet50_epoch_5.pth", "xray/resnet50_epoch_10.pth", "ct/3dcnn_epoch_9.pth"}

    cli_ok(run_cli("housekeeping.py", "action=prune", "keep_last=3", root=tmp_path, timeout=120))
    assert files_under(saved) == set(TREE) - would

    out = cli_ok(run_cli("housekeeping.py", "action=archive", root=tmp_path, timeout=120))
    archives = list((tmp_path / "archives").glob("archived_models_*.tar.gz"))
    assert len(archives) == 1 and str(archives[0]) in out

    proc = run_cli("housekeeping.py", "saved_models_dir=missing_dir", root=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert str(tmp_path / "missing_dir") in proc.stdout + proc.stderr
