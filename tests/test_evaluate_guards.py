"""Evaluation guards (issue 14 item 4): a versioned file is evaluated only when its SHA-256 matches the
registry's record, and a `data=` group of another modality is refused, naming both, before any data is read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra.utils
import pytest
import torch
from omegaconf import OmegaConf

from medens.checkpoint.io import CHECKPOINT_FORMAT, atomic_torch_save
from medens.errors import ConfigError, RegistryError
from tests.helpers import TINY_XRAY, compose, run_cli


def _checkpoint(root: Path, path: Path, *overrides: str, weights: bool = True) -> Path:
    """A medens checkpoint with the real resolved config of `overrides` and freshly built weights."""
    hyper: dict[str, Any] = OmegaConf.to_container(compose("train", *overrides, root=root), resolve=True)
    torch.manual_seed(0)
    state = hydra.utils.instantiate(OmegaConf.create(hyper["model"]["net"])).state_dict() if weights else {}
    atomic_torch_save(
        {"format": CHECKPOINT_FORMAT, "epoch": 1, "model_state_dict": state, "optimizer_state_dict": None,
         "scheduler_state_dict": None, "train_loss": 0.5, "val_loss": 0.5, "val_auc": 0.5, "best_metric": 0.5,
         "monitor": "val/auc", "hyperparameters": hyper, "timestamp": "2026-01-01T00:00:00+00:00"},
        path,
    )  # fmt: skip
    return path


def test_versioned_file_is_sha256_checked_before_evaluation(tmp_path: Path):
    from medens.evaluation.evaluate import evaluate
    from medens.registry import promote_checkpoint

    best = _checkpoint(tmp_path, tmp_path / "saved_models/xray/resnet18_best.pth", *TINY_XRAY)
    promoted = promote_checkpoint(best, version="1.0.0")
    good = promoted.path.read_bytes()

    # tampered: still a loadable checkpoint, other weights -> refused, naming the file, before any data
    ckpt = torch.load(promoted.path, weights_only=True)
    ckpt["model_state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt["model_state_dict"].items()}
    torch.save(ckpt, promoted.path)
    cfg = compose("evaluate", f"ckpt_path={promoted.path}", root=tmp_path)
    with pytest.raises(RegistryError, match=rf"{promoted.path.name}: SHA-256 mismatch"):
        evaluate(cfg)
    assert not (tmp_path / "data").exists() and not (tmp_path / "run" / "metrics.json").exists()

    # without its metadata a versioned file is not trusted either
    meta = promoted.metadata_path.read_text()
    promoted.metadata_path.unlink()
    with pytest.raises(RegistryError, match="metadata file .* is missing"):
        evaluate(cfg)
    promoted.metadata_path.write_text(meta)

    # the untouched file evaluates end to end
    promoted.path.write_bytes(good)
    report = evaluate(cfg)
    assert report["checkpoint_sha256"] == json.loads(meta)["sha256"]
    assert (tmp_path / "run" / "metrics.json").is_file()


@pytest.mark.parametrize(
    ("train_overrides", "data_group", "model", "data"),
    [
        (TINY_XRAY, "ct", "xray", "ct"),
        (["experiment=ct"], "xray", "ct", "xray"),
        (["experiment=mri"], "xray", "mri", "xray"),
        (["experiment=ct"], "brats2023", "ct", "mri"),
    ],
)
def test_data_group_of_another_modality_is_refused(train_overrides, data_group, model, data, tmp_path: Path):
    from medens.evaluation.evaluate import evaluate

    path = _checkpoint(tmp_path, tmp_path / "m.pth", *train_overrides, weights=False)
    cfg = compose("evaluate", f"ckpt_path={path}", f"data={data_group}", root=tmp_path)
    with pytest.raises(ConfigError) as info:
        evaluate(cfg)
    msg = str(info.value)
    assert f"a {model!r} checkpoint" in msg and f"the data group is {data!r}" in msg, msg
    assert not (tmp_path / "data").exists()  # nothing generated or read


@pytest.mark.slow
def test_evaluate_cli_refuses_xray_checkpoint_with_ct_data(tmp_path: Path):
    path = _checkpoint(tmp_path, tmp_path / "saved_models/xray/resnet18_best.pth", *TINY_XRAY, weights=False)
    proc = run_cli("evaluate.py", f"ckpt_path={path}", "data=ct", root=tmp_path, timeout=300,
                   env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "ConfigError" in out and "a 'xray' checkpoint, but the data group is 'ct'" in out, out[-3000:]
    assert not (tmp_path / "data").exists()
