"""Preemption and kill -9 (issue 10 items 3 and 4) on real training processes.

SIGTERM mid-epoch: the run finishes its step, writes `<name>_last.pth` (medens format, plain-torch
loadable) and exits 143 ("preempted"); resuming from it with `ckpt_path=` ends with exactly the weights
of an uninterrupted run. SIGKILL at random moments, some inside a checkpoint write: every file left
loads with `weights_only=True`, no temp file looks like a checkpoint, the dead run's lock is taken over,
its temp files are removed, and `on_existing=resume` continues from the newest checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torchvision

from medens.checkpoint import load_checkpoint
from tests.helpers import (
    TINY_XRAY,
    ForkedProcess,
    assert_same_training_state,
    cli_ok,
    run_cli,
    start_cli,
)

COMMON = ["experiment=xray", *TINY_XRAY, "data.batch_size=2", "test=false", "logger=none",
          "trainer.deterministic=true", "callbacks.model_checkpoint_periodic.every_n_epochs=1"]  # fmt: skip
ENV = {"OMP_NUM_THREADS": "1"}


def start(root: Path, *args: str, env: dict | None = None) -> tuple[ForkedProcess | subprocess.Popen, Path]:
    """`scripts/train.py args` in the background (a real process of its own, forked like `run_cli`)."""
    log = root / f"train-{time.monotonic_ns()}.log"
    full_env = {**os.environ, "MEDENS_ROOT": str(root), "PYTHONUNBUFFERED": "1", **ENV, **(env or {})}
    return start_cli("train.py", *args, cwd=root, env=full_env, log=log), log


def wait_for(cond, proc: ForkedProcess | subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def loads_with_plain_torch(path: Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    net = torchvision.models.resnet18(num_classes=14)
    net.load_state_dict(ckpt["model_state_dict"])
    return ckpt


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    full, _ = start(tmp_path, *COMMON, "trainer.max_epochs=3", f"paths.saved_models_dir={tmp_path}/full")
    # the synthetic data and its cache are built (under their own lock) by the first run
    wait_for(lambda: (tmp_path / "full" / "xray" / "training_history.json").is_file(), full, "the data")
    folder = tmp_path / "int" / "xray"
    run, log = start(tmp_path, *COMMON, "trainer.max_epochs=3", f"paths.saved_models_dir={tmp_path}/int")
    # progress signal: epoch 1's periodic file; then a moment into epoch 2 (8 batches of 2 images)
    wait_for(lambda: (folder / "resnet18_epoch_1.pth").is_file(), run, "epoch 1 ended")
    time.sleep(0.3)
    t0 = time.monotonic()
    run.send_signal(signal.SIGTERM)
    rc = run.wait(timeout=300)
    latency = time.monotonic() - t0
    out = log.read_text()
    assert rc == 143, out[-3000:]
    assert re.search(r"preempted by SIGTERM mid-epoch \(epoch 2, step \d+\)", out), out[-3000:]
    print(
        f"\nsignal-to-exit latency: {latency:.2f}s; in-process: {re.search(r'([0-9.]+)s after the signal', out)[1]}s"
    )
    last = folder / "resnet18_last.pth"
    ckpt = loads_with_plain_torch(last)
    assert ckpt["lightning"]["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"] >= 1
    assert not list(folder.glob(".*"))  # no temp file, and the lock was released

    out = cli_ok(run_cli("train.py", *COMMON, "trainer.max_epochs=3", f"paths.saved_models_dir={tmp_path}/int",
                         f"ckpt_path={last}", root=tmp_path, env=ENV))  # fmt: skip
    assert "Restored all states from the checkpoint" in out and f"continues the run in {folder}/" in out
    assert not last.exists(), "a finished run removes its resume point"
    assert full.wait(timeout=600) == 0
    a = load_checkpoint(tmp_path / "full" / "xray" / "resnet18_epoch_3.pth")
    b = load_checkpoint(folder / "resnet18_epoch_3.pth")
    assert_same_training_state(a, b)
    for k, v in a["model_state_dict"].items():
        assert torch.equal(v, b["model_state_dict"][k]), k
    history = json.loads((folder / "training_history.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == [1, 2, 3]


@pytest.mark.slow
def test_sigusr1_when_configured_preempts_with_status_138(tmp_path):
    folder = tmp_path / "saved_models" / "xray"
    run, log = start(
        tmp_path, *COMMON, "trainer.max_epochs=3", "callbacks.preemption.signals=[SIGTERM,SIGUSR1]"
    )
    wait_for(lambda: (folder / "resnet18_epoch_1.pth").is_file(), run, "epoch 1 ended")
    run.send_signal(signal.SIGUSR1)
    assert run.wait(timeout=300) == 138, log.read_text()[-3000:]
    assert "preempted by SIGUSR1" in log.read_text()
    assert loads_with_plain_torch(folder / "resnet18_last.pth")["epoch"] >= 1


def check_after_kill(folder: Path) -> None:
    """Every .pth under saved_models loads with weights_only=True; temp files never end in .pth."""
    for p in folder.rglob("*"):
        if p.is_file() and p.name.startswith(".") and p.name != ".run.lock":
            assert p.name.endswith(".tmp") and not p.name.endswith(".pth"), p
    for p in folder.rglob("*.pth"):
        torch.load(p, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_at_most_one_epoch(tmp_path):
    rng = random.Random(1234)
    folder = tmp_path / "saved_models" / "xray"
    args = [*COMMON, "data.batch_size=4", "trainer.max_epochs=4", "on_existing=resume"]
    slow_saves = {"MEDENS_TEST_SAVE_DELAY_S": "0.8"}  # widens the window in which a kill lands mid-save
    kills = []

    # 1: killed while a checkpoint of epoch >= 2 is being written (its temp file exists)
    run, _ = start(tmp_path, *args, env=slow_saves)
    wait_for(lambda: (folder / "resnet18_epoch_1.pth").is_file(), run, "epoch 1's checkpoints")
    wait_for(lambda: any(p.name.endswith(".tmp") and "resnet18" in p.name for p in folder.iterdir()), run,
             "a checkpoint write")  # fmt: skip
    run.kill()
    run.wait()
    kills.append("during a save")
    assert any(p.name.endswith(".tmp") for p in folder.iterdir()), "the kill was meant to land mid-save"
    check_after_kill(folder)
    lock_owner = json.loads((folder / ".run.lock").read_text())["pid"]
    assert lock_owner == run.pid

    # 2 and 3: killed at random moments of the resumed runs
    for _ in range(2):
        run, log = start(tmp_path, *args, env=slow_saves)
        wait_for(lambda: "run files:" in log.read_text(), run, "the run's start")  # noqa: B023
        time.sleep(rng.uniform(0.5, 6.0))
        if run.poll() is None:
            run.kill()
            run.wait()
            kills.append("random")
        out = log.read_text()
        assert f"taking over the stale lock {folder / '.run.lock'} left by pid {lock_owner}" in out
        lock_owner = run.pid
        check_after_kill(folder)

    # the next start removes the dead runs' temp files and continues from the newest checkpoint
    epochs_before = [
        int(m) for p in folder.glob("resnet18_epoch_*.pth") for m in re.findall(r"_(\d+)\.pth", p.name)
    ]
    out = cli_ok(run_cli("train.py", *args, root=tmp_path, env=ENV))
    assert epochs_before, "epoch 1's checkpoint was there before the first kill"
    assert "on_existing=resume: resumes from" in out and "Restored all states" in out
    assert f"resnet18_epoch_{max(epochs_before)}.pth" in out or "resnet18_last.pth" in out
    assert not (folder / "runs").exists()  # every run continued the same files
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    history = json.loads((folder / "training_history.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    check_after_kill(folder)
    assert load_checkpoint(folder / "resnet18_epoch_4.pth")["epoch"] == 4
    print(f"\nkills: {kills}")
