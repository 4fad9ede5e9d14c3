"""Checkpoints are data, never code (issue 14 item 1): hostile `_target_`s in a checkpoint's config are
refused on every path that reads a checkpoint, a versioned file or an export manifest, and nothing runs.

Each hostile payload, if instantiated, would create a marker file (the control test proves they would);
every path must end in `UnsafeCheckpointError` naming the file and the key, with the marker absent.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import hydra.utils
import pytest
import torch
from omegaconf import OmegaConf

from medens.checkpoint.io import CHECKPOINT_FORMAT, MedensCheckpointIO, atomic_torch_save, load_checkpoint
from medens.checkpoint.safe_build import (
    build_network_from_checkpoint,
    rebuild_module,
    target_refusal,
    validate_safe_config,
)
from medens.errors import CheckpointError, UnsafeCheckpointError
from tests.helpers import TINY_XRAY, compose, run_cli

PATHS_TRIED: list[str] = []  # (payload x path) pairs, counted for the report


def _hyper(root: Path, *overrides: str) -> dict[str, Any]:
    cfg = compose("train", *overrides, root=root)
    return OmegaConf.to_container(cfg, resolve=True)  # what training stores as `hyperparameters`


def _write(path: Path, hyper: dict[str, Any], state: dict[str, Any]) -> Path:
    atomic_torch_save(
        {
            "format": CHECKPOINT_FORMAT, "epoch": 1, "model_state_dict": state, "optimizer_state_dict": None,
            "scheduler_state_dict": None, "train_loss": 0.5, "val_loss": 0.5, "val_auc": 0.5, "best_metric": 0.5,
            "monitor": "val/auc", "hyperparameters": hyper, "timestamp": "2026-01-01T00:00:00+00:00",
            "lightning": {"epoch": 0, "global_step": 1, "loops": {}, "callbacks": {}},
        },
        path,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Any]:
    """The real resolved config of the tiny X-ray experiment, in a checkpoint with a token state dict (every
    path below refuses the file before any weight is read; the modality test at the end loads real ones)."""
    root = tmp_path_factory.mktemp("good")
    hyper = _hyper(root, *TINY_XRAY)
    hyper["io_contract"] = {"modality": "xray", "label_names": [f"l{i}" for i in range(14)]}
    state = {"fc.bias": torch.zeros(14)}
    path = _write(root / "saved_models/xray/resnet18_best.pth", hyper, state)
    return {"root": root, "path": path, "hyper": hyper, "state": state}


def _payloads(marker: Path) -> dict[str, Any]:
    """name -> function(hyper) that plants a hostile config into a copy of good hyperparameters."""
    touch = f"touch {marker}"
    py = f"open({str(marker)!r}, 'w').write('pwned')"

    def at(path: str, value: Any):
        def plant(h: dict[str, Any]) -> None:
            node = h
            *parents, last = path.split(".")
            for p in parents:
                node = node[p]
            node[last] = value

        return plant

    return {
        "os.system": at("model.net", {"_target_": "os.system", "_args_": [touch]}),
        "subprocess.Popen": at("model.net", {"_target_": "subprocess.Popen", "args": ["touch", str(marker)]}),
        "builtins.open(w)": at("model.net", {"_target_": "builtins.open", "file": str(marker), "mode": "w"}),
        "builtins.exec": at("model.net", {"_target_": "builtins.exec", "_args_": [py]}),
        "builtins.eval": at("model.net", {"_target_": "builtins.eval", "_args_": [py]}),
        "posix.system": at("model.net", {"_target_": "posix.system", "_args_": [touch]}),
        "partial os.system (optimizer)": at(
            "model.optimizer", {"_target_": "os.system", "_partial_": True, "_args_": [touch]}
        ),
        "nested in _args_": at(
            "model.net",
            {"_target_": "torch.nn.Sequential", "_args_": [{"_target_": "os.system", "_args_": [touch]}]},
        ),
        "_recursive_ false subtree": at(
            "model", {"_target_": "medens.models.xray.XRayClassifier", "_recursive_": False,
                      "net": {"_target_": "subprocess.Popen", "args": ["touch", str(marker)]},
                      "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True}},
        ),  # fmt: skip
        "in a list (data.train_augment)": at(
            "data.train_augment", [{"_target_": "subprocess.Popen", "args": ["touch", str(marker)]}]
        ),
        "in data": at("data._target_", "subprocess.Popen"),
        "allowed-prefix chain (os.system)": at(
            "model.net", {"_target_": "medens.checkpoint.io.os.system", "_args_": [touch]}
        ),
        "allowed-prefix chain (Path.touch)": at(
            "model.net", {"_target_": "medens.checkpoint.io.Path.touch", "_args_": [str(marker)]}
        ),
        "pathlib.Path.touch": at("model.net", {"_target_": "pathlib.Path.touch", "_args_": [str(marker)]}),
        "shutil.copy": at("model.net", {"_target_": "shutil.copy", "_args_": [__file__, str(marker)]}),
        "nested open in _args_": at(
            "model.net", {"_target_": "torch.nn.Sequential",
                          "_args_": [{"_target_": "builtins.open", "file": str(marker), "mode": "w"}]},
        ),  # fmt: skip
        "dunder spelling": at("model.net._target_", "builtins.__import__"),
        "odd spelling (space)": at("model.net._target_", " os.system"),
        "interpolation resolver": at("model.net.arch", "${oc.env:HOME}"),
        "non-plain value": at("model.net.num_classes", torch.tensor(14)),
    }


@pytest.fixture(scope="module")
def hostile(good, tmp_path_factory) -> dict[str, Any]:
    """One checkpoint per payload (loadable with weights_only=True), and the marker none may create."""
    root = tmp_path_factory.mktemp("hostile")
    marker = root / "pwned"
    files = {}
    for i, (name, plant) in enumerate(_payloads(marker).items()):
        hyper = copy.deepcopy(good["hyper"])
        plant(hyper)
        files[name] = _write(root / f"h{i}" / "saved_models/xray/resnet18_best.pth", hyper, good["state"])
        assert load_checkpoint(files[name])  # a valid, weights_only-loadable medens file
    return {"root": root, "marker": marker, "files": files}  # files under root/h<i>/saved_models/


def _refused(fn, path: Path, marker: Path, label: str, exc: type[BaseException] = UnsafeCheckpointError) -> str:
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    if exc is UnsafeCheckpointError:
        assert str(path) in msg and "refused" in msg, msg
    assert not marker.exists(), f"{label}: the payload ran"
    PATHS_TRIED.append(label)
    return msg


def test_control_the_payloads_run_when_instantiated_unchecked(tmp_path: Path):
    """Without the guard, plain `hydra.utils.instantiate` runs these payloads (so the tests below mean it):
    Hydra 1.3.8's own best-effort blocklist stops `os.system`, `subprocess.Popen` or `exec`, but not these."""
    marker = tmp_path / "pwned"
    for name in ("builtins.open(w)", "nested open in _args_", "allowed-prefix chain (Path.touch)",
                 "pathlib.Path.touch", "shutil.copy"):  # fmt: skip
        h: dict[str, Any] = {"model": {"net": {}}}
        _payloads(marker)[name](h)
        try:
            hydra.utils.instantiate(OmegaConf.create(h["model"]["net"]))
        except Exception:
            pass
        assert marker.exists(), name
        marker.unlink()


def test_validator_names_file_key_and_value(good, tmp_path: Path):
    validate_safe_config(good["hyper"], good["path"])  # the benign config every hostile one starts from
    marker = tmp_path / "m"
    hyper = {"model": {"net": {}}, "data": {"train_augment": []}}
    _payloads(marker)["nested in _args_"](hyper)
    with pytest.raises(UnsafeCheckpointError, match=r"x\.pth: refused hyperparameters\.model\.net\._args_\[0\]"
                                                    r"\._target_='os\.system'"):  # fmt: skip
        validate_safe_config(hyper, "x.pth")
    assert "posix.system" in target_refusal("medens.checkpoint.io.os.system")
    for ok in ("medens.models.xray.XRayClassifier", "monai.networks.nets.UNet", "torch.optim.AdamW",
               "monai.inferers.SlidingWindowInferer", "torchvision.transforms.v2.RandomAffine",
               "lightning.pytorch.plugins.environments.SLURMEnvironment", "medens.training.ddp.MedensDDPStrategy",
               "lightning.pytorch.Trainer", "medens.callbacks.ensemble_report.EnsembleReport"):  # fmt: skip
        assert target_refusal(ok) is None, ok
    for bad in ("torch.load", "torch.hub.load", "medens.data.xray.XRayDataModule.from_datasets",
                "shutil.rmtree", "medens.storage.housekeeping", "torch.nn.Module.__init__"):  # fmt: skip
        assert target_refusal(bad), bad


def test_every_hostile_checkpoint_is_refused_on_every_path(hostile, tmp_path: Path):
    from medens.ensemble.base_models import load_frozen_base_model
    from medens.evaluation.evaluate import evaluate
    from medens.export import export_checkpoints
    from medens.registry import load_versioned, promote_checkpoint
    from medens.registry.versioning import metadata_path_for
    from medens.training.train import train
    from medens.utils.hashing import sha256_file

    marker = hostile["marker"]
    eval_cfg = compose("evaluate", "ckpt_path=x", root=hostile["root"])
    train_cfg = compose("train", *TINY_XRAY, "logger=none", root=hostile["root"])
    for name, path in hostile["files"].items():
        # evaluate (in process; the CLI is tested below)
        cfg = copy.deepcopy(eval_cfg)
        cfg.ckpt_path = str(path)
        _refused(lambda cfg=cfg: evaluate(cfg), path, marker, f"{name} x evaluate")
        assert not (hostile["root"] / "data").exists()
        # the ensemble's base-model loader
        _refused(lambda p=path: load_frozen_base_model("xray", p), path, marker, f"{name} x ensemble base model")
        # the exporter: nothing written
        out = tmp_path / f"exports_{len(PATHS_TRIED)}"
        ecfg = {"out_dir": str(out), "targets": ["xray_torchscript"], "checkpoints": {"xray": str(path)}}
        _refused(lambda c=ecfg: export_checkpoints(c), path, marker, f"{name} x export")
        assert not out.exists()
        # resume: the training run refuses the file before any data or model work
        tcfg = copy.deepcopy(train_cfg)
        tcfg.ckpt_path = str(path)
        _refused(lambda c=tcfg: train(c), path, marker, f"{name} x resume (train ckpt_path=)")
        assert not (hostile["root"] / "data").exists() and not (hostile["root"] / "saved_models").exists()
        # resume: Lightning's read of the file
        _refused(lambda p=path: MedensCheckpointIO().load_checkpoint(p), path, marker, f"{name} x resume (IO)")
        # promote: no versioned copy, no metadata
        before = set(path.parent.iterdir())
        _refused(lambda p=path: promote_checkpoint(p, version="1.0.0"), path, marker, f"{name} x promote")
        assert set(path.parent.iterdir()) == before
        # a versioned file whose metadata (written by the same hand) matches its SHA-256
        vpath = path.parent / "resnet18_v9.9.9_best.pth"
        vpath.write_bytes(path.read_bytes())
        meta = {"sha256": sha256_file(vpath), "hyperparameters": {}}
        metadata_path_for(vpath).write_text(json.dumps(meta))
        _refused(lambda p=vpath: load_versioned(p), vpath, marker, f"{name} x load_versioned")
        _refused(lambda p=vpath: build_network_from_checkpoint(p), vpath, marker, f"{name} x versioned build")
    time.sleep(0.5)  # an asynchronous payload (Popen) would have created the marker by now
    assert not marker.exists()
    n = len(hostile["files"])
    assert n >= 16 and len([p for p in PATHS_TRIED if " x " in p]) >= 8 * n
    print(f"\n{n} hostile checkpoints x 8 read paths refused: {8 * n} pairs")


def test_hostile_versioned_metadata_and_export_manifest(good, tmp_path: Path):
    from medens.export import read_manifest, update_manifest
    from medens.registry import load_versioned
    from medens.registry.versioning import metadata_path_for
    from medens.utils.hashing import sha256_file

    marker = tmp_path / "pwned"
    hostile_net = {"_target_": "subprocess.Popen", "args": ["touch", str(marker)]}
    # the metadata JSON beside a clean versioned checkpoint carries a hostile config
    vpath = tmp_path / "resnet18_v1.0.0_best.pth"
    vpath.write_bytes(good["path"].read_bytes())
    meta_path = metadata_path_for(vpath)
    meta_path.write_text(json.dumps({"sha256": sha256_file(vpath), "hyperparameters": {"model": {"net": hostile_net}}}))
    _refused(lambda: load_versioned(vpath), meta_path, marker, "metadata x load_versioned")
    # an export manifest whose recorded network config is hostile
    out = tmp_path / "exports"
    out.mkdir()
    (out / "xray_torchscript.pt").write_bytes(b"x")
    manifest = {"format": "medens-exports/1", "exports": {"xray_torchscript": {
        "file": "xray_torchscript.pt", "source_checkpoint": {"network": hostile_net}}}}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest))
    msg = _refused(lambda: read_manifest(out / "manifest.json"), out / "manifest.json", marker, "manifest x read")
    assert "manifest.exports.xray_torchscript.source_checkpoint.network._target_" in msg
    _refused(lambda: update_manifest(out, {}), out / "manifest.json", marker, "manifest x update")


def test_stacked_ensemble_refuses_a_hostile_meta_learner_or_base(good, hostile, tmp_path: Path):
    from medens.ensemble.network import build_stacked_ensemble

    marker = hostile["marker"]
    bad_base = hostile["files"]["nested in _args_"]
    contract = {"modality": "ensemble", "targets": ["t"], "feature_names": [], "feature_mean": [], "feature_std": [],
                "base_checkpoints": {"xray": {"path": str(bad_base), "sha256": "0" * 64}}}  # fmt: skip
    meta = _write(tmp_path / "meta_learner.pth", {"modality": "ensemble", "io_contract": contract, "model": {}}, {})
    _refused(lambda: build_stacked_ensemble(meta), bad_base, marker, "ensemble x hostile base")
    hostile_meta = {"modality": "ensemble", "io_contract": contract,
                    "model": {"net": {"_target_": "os.system", "_args_": [f"touch {marker}"]}}}  # fmt: skip
    meta2 = _write(tmp_path / "meta2.pth", hostile_meta, {})
    _refused(lambda: build_stacked_ensemble(meta2), meta2, marker, "ensemble x hostile meta-learner")


def test_stacked_ensemble_checks_a_versioned_meta_learner_against_its_metadata(tmp_path: Path):
    """A promoted meta-learner whose bytes changed after promotion is refused before anything is built."""
    from medens.ensemble.network import build_stacked_ensemble
    from medens.errors import RegistryError
    from medens.registry.versioning import metadata_path_for
    from medens.utils.hashing import sha256_file

    contract = {"modality": "ensemble", "targets": ["t"], "base_checkpoints": {}, "feature_names": ["x"]}
    meta = _write(tmp_path / "meta_learner_v1.0.0.pth", {"modality": "ensemble", "io_contract": contract}, {})
    metadata_path_for(meta).write_text(json.dumps({"sha256": sha256_file(meta)}))
    with pytest.raises(CheckpointError, match=r"feature order \['x'\] does not match"):  # loaded: next check
        build_stacked_ensemble(meta)
    _write(meta, {"modality": "ensemble", "io_contract": {**contract, "targets": ["u"]}}, {})  # changed after
    with pytest.raises(RegistryError, match=r"meta_learner_v1\.0\.0\.pth: SHA-256 mismatch"):
        build_stacked_ensemble(meta)


@pytest.mark.slow
def test_evaluate_cli_refuses_hostile_checkpoints(hostile):
    marker = hostile["marker"]
    for name in ("allowed-prefix chain (Path.touch)",):  # the one Hydra's own blocklist lets through
        path = hostile["files"][name]
        proc = run_cli("evaluate.py", f"ckpt_path={path}", root=path.parents[2], timeout=300,
                       env={"OMP_NUM_THREADS": "1"})  # fmt: skip
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert "UnsafeCheckpointError" in out and "hyperparameters.model.net._target_" in out, out[-3000:]
        assert not marker.exists()
        PATHS_TRIED.append(f"{name} x evaluate CLI")


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["xray", "ct", "mri"])
def test_normal_checkpoints_of_each_modality_still_rebuild(modality: str, tmp_path: Path):
    small = {
        "xray": ["experiment=xray", *TINY_XRAY],
        "ct": ["experiment=ct", "model.net.widen_factor=0.25", "data.patch_size=16"],
        "mri": ["experiment=mri", "model.net.channels=[4,8,16,32,64]", "model.net.num_res_units=0",
                "data.patch_size=[16,16,16]"],
    }[modality]  # fmt: skip
    hyper = _hyper(tmp_path, *small)
    torch.manual_seed(0)
    net = hydra.utils.instantiate(OmegaConf.create(hyper["model"]["net"]))
    path = _write(tmp_path / f"{modality}.pth", hyper, net.state_dict())
    from medens.ensemble.base_models import load_frozen_base_model

    ckpt = load_checkpoint(path)
    module = rebuild_module(ckpt, path, modality)
    bare = build_network_from_checkpoint(path, modality)
    frozen = load_frozen_base_model(modality, path)
    assert frozen.is_frozen()
    for k, v in net.state_dict().items():
        torch.testing.assert_close(module.net.state_dict()[k], v)
        torch.testing.assert_close(bare.state_dict()[k], v)
        torch.testing.assert_close(frozen.module.net.state_dict()[k], v)
    other = {"xray": "ct", "ct": "mri", "mri": "xray"}[modality]
    with pytest.raises(CheckpointError, match=f"a '{modality}' checkpoint was given as the '{other}'"):
        build_network_from_checkpoint(path, other)
