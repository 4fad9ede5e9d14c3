"""Test helpers in one place (fixtures live in conftest.py, real servers in servers.py): project paths, the
overrides that shrink each modality's run, composing the real configs into a tmp folder, running the CLI
as a user would, and the comparisons several files make."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PYTHON = os.environ.get("MEDENS_TEST_PYTHON") or sys.executable
#: Subprocesses of the tests use one intra-op thread: tiny nets gain nothing from more on a shared CPU.
THREADS = {"OMP_NUM_THREADS": "1"}

#: Overrides that shrink the X-ray run for tests (the default experiment keeps its meaning).
TINY_XRAY = [
    "model.net.arch=resnet18",
    "data.image_size=32",
    "data.source.generator.n_patients=16",
    "data.source.generator.images_per_patient=2",
    "data.source.generator.image_size=48",
    "data.batch_size=8",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]

#: Overrides that shrink the CT run for tests: 16^3 patches, an 8-64-channel ResNet-18, 8 small scans.
TINY_CT = [
    "model.net.widen_factor=0.125",
    "model.net.conv1_t_size=3",
    "model.net.conv1_t_stride=2",
    "data.patch_size=16",
    "data.source.generator.n_patients=8",
    "data.source.generator.nodules_per_patient=4",
    "data.source.generator.scan_shape=[64,64,48]",
    "data.batch_size=4",
    "data.val_fraction=0.25",
    "data.test_fraction=0.25",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]

#: Overrides that shrink the MRI run for tests (the default experiment keeps its meaning).
TINY_MRI = [
    "experiment=mri",
    "model.net.channels=[4,8,16]",
    "model.net.strides=[2,2]",
    "model.net.num_res_units=1",
    "data.patch_size=[32,32,32]",
    "data.samples_per_volume=2",
    "data.source.generator.n_cases=5",
    "data.source.generator.shape=[40,40,32]",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]

#: One short, quiet training (no test stage, no logger): what the shared tiny checkpoints are.
ONE_EPOCH = ["trainer.max_epochs=1", "test=false", "logger=none", "trainer.enable_progress_bar=false"]


def compose(name: str = "train", *overrides: str, root: Path | None = None, hydra_node: bool = False) -> Any:
    """The real `conf/<name>.yaml` composed with `overrides`; with `root`, every path is redirected into it;
    `hydra_node`: with the `hydra` node (run folder, launcher) as Hydra itself would resolve it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import medens  # noqa: F401  (registers resolvers)

    paths = [f"paths.root_dir={root}", f"paths.output_dir={root}/run"] if root is not None else []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name=name, overrides=[*paths, *overrides], return_hydra_config=hydra_node)


def train_in_process(root: Path, *overrides: str) -> tuple[dict, dict]:
    """`medens.training.train.train` on the composed train config in `root` (no interpreter start-up)."""
    from medens.training.train import train

    return train(compose("train", *overrides, root=root))


def copy_root(src: Path, dst: Path) -> Path:
    """A writable copy of a project root from a shared fixture (its checkpoints still name the data of `src`)."""
    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
    return dst


class ForkedProcess:
    """A child of the fork server, with the parts of `subprocess.Popen` the tests use (pid, poll, wait,
    send_signal, terminate, kill, returncode)."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.pid: int | None = None
        self.returncode: int | None = None
        self._started = threading.Event()
        self._ended = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        assert self.returncode is not None, f"the CLI fork server ended while {self.args} was running"
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _ForkServer:
    """The client of tests/cli_zygote.py: CLI runs forked from one interpreter that already imported the stack."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.children: dict[str, ForkedProcess] = {}
        self.next_id = 0

    def _start(self) -> bool:
        if self.proc is not None and self.proc.poll() is None:
            return True
        self.proc = subprocess.Popen(
            [PYTHON, str(ROOT / "tests" / "cli_zygote.py")], cwd=ROOT, text=True, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        if self.proc.stdout.readline().strip() != "ready":
            self.stop()
            return False
        threading.Thread(target=self._read_answers, args=(self.proc,), daemon=True).start()
        atexit.register(self.stop)
        return True

    def _read_answers(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            answer = json.loads(line)
            with self.lock:
                child = self.children.get(answer["id"])
                if "returncode" in answer:
                    self.children.pop(answer["id"], None)
            if child is None:
                continue
            if "pid" in answer:
                child.pid = answer["pid"]
                child._started.set()
            else:
                child.returncode = answer["returncode"]
                child._ended.set()
        with self.lock:  # the server ended: nobody will answer for the children still listed
            orphans, self.children = list(self.children.values()), {}
        for child in orphans:
            child._started.set()
            child._ended.set()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def spawn(self, cmd: list[str], cwd: Path, env: dict, stdout: Path, stderr: Path) -> ForkedProcess | None:
        """Start `cmd` forked from the server, its output into the given files; None: the server cannot start,
        so the caller starts a fresh interpreter."""
        with self.lock:
            if not self._start():
                return None
            child = ForkedProcess(cmd)
            rid = str(self.next_id)
            self.next_id += 1
            self.children[rid] = child
            request = {"id": rid, "script": cmd[1], "args": cmd[2:], "cwd": str(cwd), "env": env,
                       "stdout": str(stdout), "stderr": str(stderr)}  # fmt: skip
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        if not child._started.wait(60) or child.pid is None:
            raise RuntimeError(f"the CLI fork server did not start {cmd}")
        return child

    def run(self, cmd: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess | None:
        """`cmd` forked from the server, like `subprocess.run(capture_output=True, text=True)`; None: the
        server cannot start, so the caller starts a fresh one."""
        with tempfile.TemporaryDirectory(prefix="medens-cli-") as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            child = self.spawn(cmd, cwd, env, out, err)
            if child is None:
                return None
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                raise subprocess.TimeoutExpired(cmd, timeout, output=out.read_text(), stderr=err.read_text()) from None
            return subprocess.CompletedProcess(cmd, child.returncode, out.read_text(), err.read_text())


_FORK_SERVER = _ForkServer()


def _fork_server_wanted(fresh: bool) -> bool:
    return not fresh and os.environ.get("MEDENS_TEST_FRESH_CLI") != "1"


def run_cli(
    script: str, *args: str, root: Path, timeout: int = 600, env: dict | None = None, fresh: bool = False
):
    """Run `python scripts/<script> args...` as a user would, with MEDENS_ROOT=root.

    Forked from tests/cli_zygote.py (the imports done once per test session) unless `fresh`, or
    MEDENS_TEST_FRESH_CLI=1, asks for a new interpreter: only a test of what happens while importing needs one."""
    full_env = {**os.environ, "MEDENS_ROOT": str(root), "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [PYTHON, str(ROOT / "scripts" / script), *args]
    if _fork_server_wanted(fresh):
        proc = _FORK_SERVER.run(cmd, cwd=root, env=full_env, timeout=timeout)
        if proc is not None:
            return proc
    return subprocess.run(cmd, cwd=root, env=full_env, capture_output=True, text=True, timeout=timeout)


def start_cli(script: str, *args: str, cwd: Path, env: dict, log: Path) -> ForkedProcess | subprocess.Popen:
    """Start `python scripts/<script> args...` in the background (its own process group, stdout and stderr
    into `log`), forked like `run_cli`; the caller signals and waits for it like a `Popen`."""
    cmd = [PYTHON, str(ROOT / "scripts" / script), *args]
    log.touch()  # there from the start, as with Popen's file (the forked child opens it itself)
    if _fork_server_wanted(False):
        child = _FORK_SERVER.spawn(cmd, cwd, env, log, log)
        if child is not None:
            return child
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def cli_ok(proc) -> str:
    """A finished `run_cli` that must have succeeded; returns its combined output."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def assert_same_training_state(a: dict, b: dict) -> None:
    """Two medens checkpoints hold the same weights, Adam moments, scheduler position and best score."""
    import pytest
    import torch

    for k, v in a["model_state_dict"].items():
        torch.testing.assert_close(b["model_state_dict"][k], v, rtol=1e-5, atol=1e-6)
    for pid, state in a["optimizer_state_dict"]["state"].items():
        torch.testing.assert_close(b["optimizer_state_dict"]["state"][pid]["exp_avg"], state["exp_avg"])
    assert a["scheduler_state_dict"]["last_epoch"] == b["scheduler_state_dict"]["last_epoch"]
    assert a["best_metric"] == pytest.approx(b["best_metric"])


def plain(obj: Any) -> bool:
    """Only JSON-like values (str keys; str, int, float, bool, None leaves): what a checkpoint may hold."""
    if isinstance(obj, dict):
        return all(isinstance(k, str) and plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(plain(v) for v in obj)
    return obj is None or isinstance(obj, (str, int, float, bool))


def folder_names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def make_checkpoint(path: Path, modality: str = "xray", seed: int = 0) -> Path:
    """A small file in the medens checkpoint format (DESIGN.md keys), as training writes it."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ckpt = {
        "format": "medens-checkpoint/1",
        "epoch": 7,
        "model_state_dict": {"fc.weight": torch.randn(14, 8, generator=g), "fc.bias": torch.zeros(14)},
        "optimizer_state_dict": {"state": {}, "param_groups": []},
        "scheduler_state_dict": None,
        "train_loss": 0.31,
        "val_loss": 0.35,
        "val_auc": 0.81,
        "best_metric": 0.81,
        "monitor": "val/auc",
        "hyperparameters": {
            "modality": modality,
            "seed": 42,
            "model": {"name": "resnet50", "optimizer": {"lr": 0.001}},
            "data": {"_target_": "medens.data.xray.XRayDataModule", "root": "/data/nih", "image_size": 224},
        },
        "timestamp": "2025-01-02T03:04:05+00:00",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path
