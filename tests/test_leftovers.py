"""No leftovers (issue 14 item 6): temp files of killed saves and killed promotions are cleaned up on the
next start or by housekeeping, the version number is not burnt, and the main job's resume decision."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from medens.pipeline import StageStamps
from medens.registry import list_versions, promote_checkpoint
from medens.storage.housekeeping import plan_leftovers, run_housekeeping
from medens.training.run_ownership import remove_leftover_temp_files
from tests.helpers import make_checkpoint


def _old(p: Path, age: float = 3600) -> Path:
    t = time.time() - age
    os.utime(p, (t, t))
    return p


def test_next_start_removes_temp_files_of_killed_saves_but_not_promotions(tmp_path):
    folder = tmp_path / "xray"
    (folder / "runs" / "r1").mkdir(parents=True)
    killed = [folder / ".resnet18_best.pth.k3j2x1.tmp", folder / ".training_history.json.a1b2.tmp",
              folder / "runs" / "r1" / ".resnet18_epoch_5.pth.zz99.tmp"]  # fmt: skip
    promotion = folder / ".resnet18_v1.0.0_best.pth.q1w2.tmp"
    for p in [*killed, promotion]:
        p.write_bytes(b"partial")
    keep = folder / "resnet18_best.pth"
    keep.write_bytes(b"x")
    assert sorted(remove_leftover_temp_files(folder)) == sorted(killed)
    assert promotion.exists() and keep.exists()


def test_housekeeping_clean_reports_and_removes_leftovers_not_live_ones(tmp_path, capsys):
    sm = tmp_path / "saved_models"
    busy, idle = sm / "ct", sm / "xray"
    busy.mkdir(parents=True)
    idle.mkdir(parents=True)
    dead_tmp = idle / ".resnet18_epoch_5.pth.abc123.tmp"
    dead_tmp.write_bytes(b"partial")
    _old(dead_tmp)
    young_tmp = idle / ".resnet18_best.pth.new111.tmp"  # may be a save under way: left alone
    young_tmp.write_bytes(b"partial")
    live_tmp = busy / ".3dcnn_best.pth.live22.tmp"
    live_tmp.write_bytes(b"partial")
    _old(live_tmp)
    # a live training run holds ct/'s run lock
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys,time; from medens.utils.locking import owned_lock\n"
        f"with owned_lock({str(busy / '.run.lock')!r}, 'training 3dcnn', blocking=False):\n"
        "    print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = OmegaConf.create({"action": "clean", "saved_models_dir": str(sm), "root_dir": str(tmp_path),
                                "format": "text", "leftover_min_age_s": 60})  # fmt: skip
        out = run_housekeeping(cfg)
    finally:
        holder.kill()
        holder.wait()
    assert out["removed"] == ["xray/.resnet18_epoch_5.pth.abc123.tmp"]
    assert "removed leftover: xray/.resnet18_epoch_5.pth.abc123.tmp (temp" in capsys.readouterr().out
    assert not dead_tmp.exists() and young_tmp.exists() and live_tmp.exists()
    # the lock's owner is gone: now ct/'s leftover goes too
    assert [r.rel for r in plan_leftovers(sm, 60)] == ["ct/.3dcnn_best.pth.live22.tmp"]


def test_killed_promotion_is_rolled_back_and_does_not_burn_the_version(tmp_path):
    best = make_checkpoint(tmp_path / "xray" / "resnet50_best.pth")
    first = promote_checkpoint(best, version="1.0.0")
    # a promotion of 1.1.0 killed after its copy, before the metadata: a full copy without metadata
    orphan = best.parent / "resnet50_v1.1.0_best.pth"
    orphan.write_bytes(best.read_bytes())
    (best.parent / ".resnet50_v1.1.0_best.json.zz11.tmp").write_text("{")
    # ... and the killed promotion's lock file, naming a process that no longer runs
    (best.parent / ".resnet50.promote.lock").write_text(json.dumps({"pid": 2**22 + 7, "host": socket.gethostname()}))
    untraced = best.parent.parent / "ct" / "3dcnn_v0.1.0_best.pth"  # versioned, no metadata, no lock: a user's
    untraced.parent.mkdir()
    untraced.write_bytes(best.read_bytes())
    assert [str(v.version) for v in list_versions(best.parent)] == ["1.0.0", "1.1.0"]
    # housekeeping reports it (dry run changes nothing) ...
    planned = plan_leftovers(tmp_path, min_age_s=0)
    assert {r.rel for r in planned} >= {"xray/resnet50_v1.1.0_best.pth"}
    assert any("interrupted promotion" in r.reason for r in planned)
    assert "ct/3dcnn_v0.1.0_best.pth" not in {r.rel for r in planned}
    # ... and the next promotion rolls it back first: 1.1.0 is free again
    again = promote_checkpoint(best, version="1.1.0")
    assert again.path == orphan and again.metadata_path.is_file()
    assert json.loads(again.metadata_path.read_text())["sha256"]
    assert not list(best.parent.glob(".*.tmp"))
    assert first.path.is_file() and [str(v.version) for v in list_versions(best.parent)] == ["1.0.0", "1.1.0"]
    assert untraced.is_file() and not (best.parent / ".resnet50.promote.lock").exists()


def test_pipeline_resumes_an_interrupted_stage_only_with_the_same_config(tmp_path):
    stamps = StageStamps(tmp_path / "stages")
    cfg = OmegaConf.create({"paths": {"saved_models_dir": str(tmp_path / "sm")}, "modality": "xray",
                            "model": {"name": "resnet18"}})  # fmt: skip
    stamps.start("xray", "digest-a")
    assert stamps.resume_point("xray", "digest-a", cfg) is None  # interrupted before any resume point
    run_last = tmp_path / "sm" / "xray" / "runs" / "20260101-000000-abcdef" / "resnet18_last.pth"
    run_last.parent.mkdir(parents=True)
    run_last.write_bytes(b"x")
    assert stamps.resume_point("xray", "digest-a", cfg) == run_last
    assert stamps.resume_point("xray", "digest-b", cfg) is None  # config changed: train afresh
    stamps.done("xray")
    assert stamps.resume_point("xray", "digest-a", cfg) is None  # finished: nothing to resume


@pytest.mark.parametrize("name", ["resnet18_last.pth"])
def test_temp_names_never_look_like_checkpoints(tmp_path, name):
    import tempfile

    from medens.checkpoint.io import atomic_torch_save

    seen = []
    real = tempfile.mkstemp

    def spy(*a, **k):
        fd, p = real(*a, **k)
        seen.append(p)
        return fd, p

    tempfile.mkstemp, saved = spy, tempfile.mkstemp
    try:
        atomic_torch_save({"a": 1}, tmp_path / name)
    finally:
        tempfile.mkstemp = saved
    assert seen and all(Path(p).name.startswith(".") and p.endswith(".tmp") for p in seen)
