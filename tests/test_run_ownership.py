"""One run owns its files (issue 14 item 2): a concurrent second training of the same folder is refused
naming the first's pid; a rerun without ckpt_path= over an existing best resumes, writes under its own
run id and publishes only a better best, or is refused, by `on_existing`; a training named like a
promoted version is refused. Every scenario ends with a clear message and the earlier files intact."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from medens.checkpoint import load_checkpoint
from tests.helpers import PYTHON, ROOT, TINY_XRAY, cli_ok, run_cli

BASE = ["experiment=xray", *TINY_XRAY, "test=false", "logger=none", "trainer.max_epochs=2",
        "callbacks.model_checkpoint_periodic.every_n_epochs=1"]  # fmt: skip
ENV = {"OMP_NUM_THREADS": "1"}


def snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    """One finished training: saved_models/xray/{resnet18_best,epoch_1,epoch_2}.pth + history."""
    root = tmp_path_factory.mktemp("first")
    cli_ok(run_cli("train.py", *BASE, root=root, env=ENV))
    return root


@pytest.fixture
def rerun_root(first_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(first_run / "saved_models", tmp_path / "saved_models")
    shutil.copytree(first_run / "data", tmp_path / "data")
    return tmp_path


@pytest.mark.slow
def test_second_concurrent_training_is_refused_naming_the_first(tmp_path):
    folder = tmp_path / "saved_models" / "xray"
    env = {**os.environ, "MEDENS_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1", **ENV}
    # the first run is long; it is stopped (SIGTERM: preempted, status 143) once the second was refused
    first = subprocess.Popen([PYTHON, str(ROOT / "scripts" / "train.py"), *BASE, "trainer.max_epochs=200",
                              "callbacks.early_stopping.patience=100000",
                              "callbacks.early_stopping.check_finite=false"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        lock = folder / ".run.lock"
        deadline = time.monotonic() + 300
        while not (lock.is_file() and f'"pid": {first.pid}' in lock.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.1)
        second = run_cli("train.py", *BASE, "seed=7", root=tmp_path, env=ENV)
        assert first.poll() is None, "the first run ended before the second was tried"
        while not (folder / "training_history.json").is_file():  # the first is training: stop it
            assert first.poll() is None and time.monotonic() < deadline + 300, "the first run did not train"
            time.sleep(0.1)
        first.send_signal(signal.SIGTERM)
    finally:
        out_first = first.communicate(timeout=600)[0]
    out = second.stdout + second.stderr
    assert second.returncode != 0
    assert "LockHeldError" in out and f"held by pid {first.pid}" in out and "training resnet18" in out
    assert "instantiating datamodule" not in out  # refused before any data or model work
    assert first.returncode == 143, out_first[-3000:]
    # every file is the first run's: its seed, no run-id folder, no temp files, the lock released
    assert not (folder / "runs").exists() and not [p for p in folder.iterdir() if p.name.startswith(".")]
    ckpts = sorted(folder.glob("*.pth"))
    assert folder / "resnet18_last.pth" in ckpts and folder / "resnet18_best.pth" in ckpts
    for p in ckpts:
        assert load_checkpoint(p)["hyperparameters"]["seed"] == 42, p
    history = json.loads((folder / "training_history.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))


def _best_line(out: str) -> Path:
    return Path(re.findall(r"best checkpoint: (\S+)", out)[-1])


@pytest.mark.slow
def test_rerun_default_new_run_publishes_only_a_better_best(rerun_root):
    folder = rerun_root / "saved_models" / "xray"
    # make the existing best unbeatable: AUC 1.0
    best = folder / "resnet18_best.pth"
    ckpt = torch.load(best, weights_only=True)
    ckpt["best_metric"] = 1.0
    torch.save(ckpt, best)
    before = snapshot(folder)
    out = cli_ok(run_cli("train.py", *BASE, "seed=3", root=rerun_root, env=ENV))
    (run_dir,) = list((folder / "runs").iterdir())
    assert f"writes under run id {run_dir.name}" in out and "already holds resnet18_best.pth" in out
    assert "not published" in out and "is not better than resnet18_best.pth's 1" in out
    named = _best_line(out)
    assert named == run_dir / "resnet18_best.pth"  # the log names the file holding this run's weights
    mine = load_checkpoint(named)
    assert mine["hyperparameters"]["seed"] == 3 and mine["hyperparameters"]["run_id"] == run_dir.name
    assert snapshot(folder) == {
        **before,
        **{f"runs/{run_dir.name}/{k}": v for k, v in snapshot(run_dir).items()},
    }

    # publish=always: the explicit publish replaces the canonical best (and history) atomically
    out = cli_ok(run_cli("train.py", *BASE, "seed=4", "publish=always", root=rerun_root, env=ENV))
    named = _best_line(out)
    assert named == best and "published" in out
    run4 = next(p for p in (folder / "runs").iterdir() if p != run_dir)
    assert best.read_bytes() == (run4 / "resnet18_best.pth").read_bytes()
    assert load_checkpoint(best)["hyperparameters"]["seed"] == 4
    assert (folder / "training_history.json").read_bytes() == (run4 / "training_history.json").read_bytes()
    after = snapshot(folder)
    for name in ("resnet18_epoch_1.pth", "resnet18_epoch_2.pth"):  # the first run's periodic files: untouched
        assert after[name] == before[name]
    assert {k[len(f"runs/{run_dir.name}/") :] for k in after if k.startswith(f"runs/{run_dir.name}/")} == set(
        snapshot(run_dir)
    )


@pytest.mark.slow
def test_rerun_on_existing_resume_continues_the_previous_run(rerun_root):
    folder = rerun_root / "saved_models" / "xray"
    out = cli_ok(
        run_cli("train.py", *BASE, "on_existing=resume", "trainer.max_epochs=3", root=rerun_root, env=ENV)
    )
    assert "on_existing=resume: resumes from" in out and "resnet18_epoch_2.pth" in out
    assert "Restored all states from the checkpoint" in out
    assert not (folder / "runs").exists()
    history = json.loads((folder / "training_history.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert sorted(p.name for p in folder.glob("*_epoch_*.pth")) == [
        f"resnet18_epoch_{i}.pth" for i in (1, 2, 3)
    ]


@pytest.mark.slow
def test_rerun_on_existing_refuse_names_the_files_and_the_options(rerun_root):
    folder = rerun_root / "saved_models" / "xray"
    before = snapshot(folder)
    proc = run_cli("train.py", *BASE, "on_existing=refuse", root=rerun_root, env=ENV)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"{folder} already holds resnet18_best.pth" in out and "on_existing=refuse" in out
    assert "on_existing=resume" in out and "on_existing=new_run" in out and "ckpt_path=" in out
    assert snapshot(folder) == before


@pytest.mark.slow
@pytest.mark.parametrize(
    "override",
    ["model.name=resnet18_v1.0.0", "callbacks.model_checkpoint_best.filename=resnet18_v1.0.0_best"],
)
def test_training_named_like_a_promoted_version_is_refused(rerun_root, override):
    folder = rerun_root / "saved_models" / "xray"
    promoted = folder / "resnet18_v1.0.0_best.pth"
    shutil.copy(folder / "resnet18_best.pth", promoted)
    (folder / "resnet18_v1.0.0_best.json").write_text('{"sha256": "x"}')
    before = snapshot(folder)
    proc = run_cli("train.py", *BASE, override, root=rerun_root, env=ENV)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert (
        "versioned (promoted) file name" in out and "resnet18_v1.0.0_best.pth" in out and "ConfigError" in out
    )
    assert snapshot(folder) == before


@pytest.mark.slow
def test_explicit_run_id_that_holds_files_is_not_overwritten(rerun_root):
    folder = rerun_root / "saved_models" / "xray"
    run = folder / "runs" / "mine"
    run.mkdir(parents=True)
    shutil.copy(folder / "resnet18_best.pth", run / "resnet18_best.pth")
    before = snapshot(folder)
    proc = run_cli("train.py", *BASE, "run_id=mine", root=rerun_root, env=ENV)
    assert (
        proc.returncode != 0
        and "run_id=mine" in proc.stderr
        and "already holds resnet18_best.pth" in proc.stderr
    )
    assert snapshot(folder) == before


def test_publish_better_refuses_a_canonical_file_it_cannot_compare(tmp_path):
    """A canonical best that is not a medens checkpoint is neither compared nor replaced: the error names it,
    and both files keep their bytes."""
    from medens.errors import CheckpointError
    from medens.training.run_ownership import RunFiles

    canonical, run = tmp_path / "xray", tmp_path / "xray" / "runs" / "r1"
    run.mkdir(parents=True)
    torch.save({"model_state_dict": {}, "monitor": "val/auc", "best_metric": 0.9}, run / "resnet18_best.pth")
    foreign = canonical / "resnet18_best.pth"
    torch.save({"state_dict": {}}, foreign)  # e.g. a plain Lightning checkpoint copied in by hand
    before = snapshot(canonical)
    files = RunFiles(canonical, run, "resnet18", "resnet18_best.pth", "new_run", run_id="r1")
    with pytest.raises(CheckpointError, match=r"resnet18_best\.pth: not a medens checkpoint.*publish=always"):
        files.publish_best(run / "resnet18_best.pth")
    assert snapshot(canonical) == before and files.published is None
