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


ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PYTHON = os.environ.get("MEDENS_TEST_PYTHON") or __import__("sys").executable

#: Overrides that shrink the X-ray run for tests (the default experiment keeps its meaning).
TINY_XRAY = [
    "model.net.arch=resnet18",
    "data.image_size=32",
    "data.synthetic.n_patients=16",
    "data.synthetic.images_per_patient=2",
    "data.synthetic.image_size=48",
    "data.batch_size=8",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


@pytest.fixture
def compose_train(tmp_path: Path):
    """Compose the real conf/train.yaml with overrides, all paths redirected into tmp_path."""
    from hydra import compose, initialize_config_dir

    import medens  # noqa: F401  (registers resolvers)

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(
                config_name="train",
                overrides=[
                    f"paths.root_dir={tmp_path}",
                    f"paths.output_dir={tmp_path}/run",
                    *overrides,
                ],
            )

    return _compose


def run_cli(script: str, *args: str, root: Path, timeout: int = 600, env: dict | None = None):
    """Run `python scripts/<script> args...` as a user would, with MEDENS_ROOT=root."""
    import subprocess

    full_env = {**os.environ, "MEDENS_ROOT": str(root), "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [PYTHON, str(ROOT / "scripts" / script), *args],
        cwd=root,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc


def cli_ok(proc) -> str:
    """A finished `run_cli` that must have succeeded; returns its combined output."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def assert_same_training_state(a: dict, b: dict) -> None:
    """Two medens checkpoints hold the same weights, Adam moments, scheduler position and best score."""
    import torch

    for k, v in a["model_state_dict"].items():
        torch.testing.assert_close(b["model_state_dict"][k], v, rtol=1e-5, atol=1e-6)
    for pid, state in a["optimizer_state_dict"]["state"].items():
        torch.testing.assert_close(b["optimizer_state_dict"]["state"][pid]["exp_avg"], state["exp_avg"])
    assert a["scheduler_state_dict"]["last_epoch"] == b["scheduler_state_dict"]["last_epoch"]
    assert a["best_metric"] == pytest.approx(b["best_metric"])
