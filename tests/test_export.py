"""Production exports: each file is verified before it lands, loads without medens, and bad input is refused
without leaving anything half-written."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medens.checkpoint.io import CHECKPOINT_FORMAT, atomic_torch_save
from medens.data.xray import NIH_LABELS
from medens.errors import CheckpointError, ConfigError, ExportError
from medens.export import core, export_checkpoints, export_module, load_runner
from medens.utils.hashing import sha256_file
from tests.helpers import PYTHON, cli_ok, run_cli

# Small stand-ins for the production networks, in the configs the real checkpoints carry.
XRAY_NET = dict(_target_="medens.models.xray.build_resnet", arch="resnet18", num_classes=14, in_channels=3,
                pretrained_path=None)  # fmt: skip
CT_NET = dict(_target_="monai.networks.nets.resnet18", spatial_dims=3, n_input_channels=1, num_classes=1,
              widen_factor=0.25, conv1_t_size=3, conv1_t_stride=2, no_max_pool=False)  # fmt: skip
XRAY_CONTRACT = {"modality": "xray", "label_names": list(NIH_LABELS), "input_shape": [3, 32, 32]}
CT_CONTRACT = {
    "modality": "ct",
    "channels": ["image"],
    "patch_size": [16, 16, 16],
    "label_names": ["malignant"],
}
SUFFIX = {"torchscript_trace": "pt", "torchscript_script": "pt", "onnx": "onnx", "torch_export": "pt2"}
TARGETS = ["xray_torchscript", "xray_export", "ct_onnx", "ct_export"]
FILES = {"xray_torchscript": "xray_torchscript.pt", "xray_export": "xray_exported.pt2",
         "ct_onnx": "ct_onnx.onnx", "ct_export": "ct_exported.pt2"}  # fmt: skip


def plain_net(net_cfg: dict) -> nn.Module:
    """The bare network built with torchvision / MONAI only (what a deployment without medens would do)."""
    kwargs = {
        k: v for k, v in net_cfg.items() if k not in ("_target_", "arch", "in_channels", "pretrained_path")
    }
    if net_cfg["_target_"].startswith("monai"):
        from monai.networks.nets import resnet18

        return resnet18(**kwargs)
    import torchvision

    return getattr(torchvision.models, net_cfg["arch"])(num_classes=net_cfg["num_classes"])


def write_checkpoint(path: Path, net_cfg: dict, contract: dict, state: dict | None = None) -> Path:
    net = plain_net(net_cfg)
    # BatchNorm statistics from a few random batches, as training would leave them: outputs are O(1)
    # (the init's unit running variance lets activations grow to thousands through the blocks)
    shape = contract.get("input_shape") or [len(contract["channels"]), *contract["patch_size"]]
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():
        for _ in range(3):
            net.train()(torch.randn(4, *shape))
    atomic_torch_save(
        {
            "format": CHECKPOINT_FORMAT, "epoch": 3, "model_state_dict": state or net.state_dict(),
            "optimizer_state_dict": None, "scheduler_state_dict": None, "train_loss": 0.4, "val_loss": 0.5,
            "val_auc": 0.7, "best_metric": 0.7, "monitor": "val/auc",
            "timestamp": "2026-01-01T00:00:00+00:00",
            "hyperparameters": {"modality": contract["modality"], "model": {"net": net_cfg}, "data": {},
                                "io_contract": contract},
        },
        path,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A project root with the two checkpoints at their default paths."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("export_root")
    write_checkpoint(root / "saved_models/xray/resnet50_best.pth", XRAY_NET, XRAY_CONTRACT)
    write_checkpoint(root / "saved_models/ct/3dcnn_best.pth", CT_NET, CT_CONTRACT)
    return root


@pytest.fixture(scope="module")
def exported(root: Path) -> tuple[Path, dict]:
    """`scripts/export.py` with its default checkpoint paths and the four network targets (the default
    `ensemble_traced` needs a trained ensemble: tests/test_ensemble.py covers it)."""
    out = cli_ok(
        run_cli(
            "export.py",
            f"targets=[{','.join(TARGETS)}]",
            root=root,
            timeout=300,
            env={"OMP_NUM_THREADS": "1"},
        )
    )
    assert "ct_onnx:" in out
    out_dir = root / "saved_models/exports"
    return out_dir, json.loads((out_dir / "manifest.json").read_text())


def _cfg(tmp_path: Path, root: Path, **overrides) -> dict:
    cfg = {
        "out_dir": str(tmp_path / "exports"),
        "targets": TARGETS,
        "checkpoints": {
            "xray": str(root / "saved_models/xray/resnet50_best.pth"),
            "ct": str(root / "saved_models/ct/3dcnn_best.pth"),
        },
        "onnx": {"opset": 18, "exporter": "dynamo"},
        "verify": {"batch_sizes": [1, 3], "seed": 0, "atol": 1e-4, "rtol": 1e-3},
    }
    cfg.update(overrides)
    return cfg


@pytest.mark.slow
def test_cli_writes_verified_exports_and_manifest(root, exported):
    out_dir, manifest = exported
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        [*FILES.values(), "manifest.json"]
    )  # no temp files
    assert set(manifest["exports"]) == set(TARGETS)
    for target, entry in manifest["exports"].items():
        assert entry["file"] == FILES[target]
        assert entry["sha256"] == sha256_file(out_dir / entry["file"])
        assert entry["verification"]["passed"] is True
        assert [c["batch_size"] for c in entry["verification"]["checks"]] == [1, 3]
        assert all(c["worst_fraction"] <= 1.0 for c in entry["verification"]["checks"])
        assert entry["tolerance"] == {"atol": 1e-4, "rtol": 1e-3, "rule": entry["tolerance"]["rule"]}
        assert entry["inputs"][0]["name"] == "input" and entry["inputs"][0]["dtype"] == "float32"
        assert "no sigmoid" in entry["outputs"][0]["meaning"]
    xray, ct = manifest["exports"]["xray_torchscript"], manifest["exports"]["ct_onnx"]
    assert xray["outputs"][0]["label_names"] == list(NIH_LABELS)
    assert xray["inputs"][0]["shape"] == ["batch", 3, 32, 32] and xray["outputs"][0]["shape"] == ["batch", 14]
    assert xray["source_checkpoint"]["sha256"] == sha256_file(root / "saved_models/xray/resnet50_best.pth")
    assert ct["inputs"][0]["shape"] == ["batch", 1, 16, 16, 16] and ct["onnx_opset"] == 18
    assert ct["source_checkpoint"]["path"] == str((root / "saved_models/ct/3dcnn_best.pth").resolve())
    assert ct["verification"]["checks"][0]["max_ref_abs"] > 0.1  # the check compared real, non-tiny outputs

    import onnx

    model = onnx.load(str(out_dir / "ct_onnx.onnx"))
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == [
        "output"
    ]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic (dynamic) batch axis
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {18}


LOADER = textwrap.dedent(
    """
    import json, sys
    import numpy as np, onnxruntime, torch
    d, exports, atol, rtol = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    pt2 = lambda name: lambda x: torch.export.load(f"{exports}/{name}").module()(x).numpy()
    runs = {
        "xray_torchscript.pt": lambda x: torch.jit.load(f"{exports}/xray_torchscript.pt")(x).numpy(),
        "xray_exported.pt2": pt2("xray_exported.pt2"),
        "ct_onnx.onnx": lambda x: onnxruntime.InferenceSession(f"{exports}/ct_onnx.onnx",
            providers=["CPUExecutionProvider"]).run(["output"], {"input": x.numpy()})[0],
        "ct_exported.pt2": pt2("ct_exported.pt2"),
    }
    diffs = {}
    with torch.no_grad():
        for name, run in runs.items():
            model = name.split("_")[0]
            got = run(torch.from_numpy(np.load(f"{d}/{model}_input.npy")))
            want = np.load(f"{d}/{model}_output.npy")
            assert got.shape == want.shape, (name, got.shape, want.shape)
            np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=name)
            diffs[name] = float(np.abs(got - want).max())
    medens_imported = any(m.split(".")[0] == "medens" for m in sys.modules)
    print(json.dumps({"diffs": diffs, "medens_imported": medens_imported}))
    """
)


@pytest.mark.slow
def test_exports_reproduce_eager_in_a_process_without_medens(root, exported, tmp_path):
    out_dir, _ = exported
    gen = torch.Generator().manual_seed(123)
    for model, net_cfg, shape, batch in (
        ("xray", XRAY_NET, (3, 32, 32), 5),
        ("ct", CT_NET, (1, 16, 16, 16), 2),
    ):
        net = plain_net(net_cfg).eval()
        path = root / f"saved_models/{model}/{'resnet50' if model == 'xray' else '3dcnn'}_best.pth"
        net.load_state_dict(torch.load(path, weights_only=True)["model_state_dict"])
        x = torch.randn((batch, *shape), generator=gen)
        with torch.no_grad():
            np.save(tmp_path / f"{model}_output.npy", net(x).numpy())
        np.save(tmp_path / f"{model}_input.npy", x.numpy())
    proc = subprocess.run(
        [PYTHON, "-c", LOADER, str(tmp_path), str(out_dir), "1e-4", "1e-3"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["medens_imported"] is False
    assert set(result["diffs"]) == set(FILES.values())


def test_wrong_architecture_is_refused_and_nothing_written(root, tmp_path):
    ct_ckpt = root / "saved_models/ct/3dcnn_best.pth"
    cfg = _cfg(tmp_path, root, targets=["xray_torchscript"])
    cfg["checkpoints"]["xray"] = str(ct_ckpt)
    with pytest.raises(
        CheckpointError, match=r"3dcnn_best\.pth: a 'ct' checkpoint was given as the 'xray' export"
    ):
        export_checkpoints(cfg)
    assert not (tmp_path / "exports").exists()

    # a state dict that does not fit the network its own config describes (14 outputs saved, 10 claimed)
    bad = write_checkpoint(
        tmp_path / "misfit.pth", {**XRAY_NET, "num_classes": 10}, XRAY_CONTRACT,
        state=torch.load(root / "saved_models/xray/resnet50_best.pth", weights_only=True)["model_state_dict"],
    )  # fmt: skip
    cfg["checkpoints"]["xray"] = str(bad)
    with pytest.raises(CheckpointError, match=r"misfit\.pth: .*shape mismatches: fc\.weight .*\(14, 512\)"):
        export_checkpoints(cfg)
    assert not (tmp_path / "exports").exists()


def test_bad_opset_unknown_target_and_missing_checkpoint(root, tmp_path):
    lo, hi = core.onnx_opset_range("dynamo")
    assert lo == 18 and hi >= 18
    with pytest.raises(ExportError, match=rf"ONNX opset 99 is not supported.*opsets {lo}-{hi}"):
        export_checkpoints(_cfg(tmp_path, root, onnx={"opset": 99, "exporter": "dynamo"}))
    assert not (tmp_path / "exports").exists()  # checked before anything (even the X-ray exports) is written
    target = tmp_path / "direct" / "m.onnx"
    with pytest.raises(ExportError, match="opset 99"):
        export_module(nn.Linear(3, 2), torch.randn(2, 3), "onnx", target, opset=99)
    assert not target.exists() and not any(target.parent.glob("*"))

    with pytest.raises(ConfigError, match=r"unknown export target 'xray_tensorrt'.*xray_torchscript"):
        export_checkpoints(_cfg(tmp_path, root, targets=["xray_tensorrt"]))
    cfg = _cfg(tmp_path, root, targets=["ct_export"])
    cfg["checkpoints"]["ct"] = str(tmp_path / "nowhere/3dcnn_best.pth")
    with pytest.raises(CheckpointError, match=r"nowhere/3dcnn_best\.pth: checkpoint file not found"):
        export_checkpoints(cfg)
    assert not (tmp_path / "exports").exists()


class BatchDependent(nn.Module):
    """Python control flow on the batch size: a trace at batch 2 bakes in the wrong branch for others."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 2:
            return x * 2
        return x * 2 + 1


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the point of BatchDependent
def test_failed_verification_keeps_the_previous_export(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    good = export_module(nn.Linear(4, 4), torch.randn(2, 4), "torchscript_trace", path)
    before = path.read_bytes()
    with pytest.raises(
        ExportError, match=r"model\.pt: torchscript_trace export does not reproduce .* batch size 1"
    ):
        export_module(BatchDependent(), torch.randn(2, 4), "torchscript_trace", path)
    assert path.read_bytes() == before and sha256_file(path) == good.sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # the temp file is gone

    # ONNX through onnxruntime: an output off by 1e-3 (> atol 1e-4 + rtol 1e-3 * |y|) is caught
    onnx_path = tmp_path / "model.onnx"
    export_module(nn.Linear(4, 4), torch.randn(2, 4), "onnx", onnx_path)
    before = onnx_path.read_bytes()
    real = core.load_runner

    def corrupted(kind, p):
        run = real(kind, p)
        return lambda inputs: [o + 1e-3 for o in run(inputs)]

    monkeypatch.setattr(core, "load_runner", corrupted)
    with pytest.raises(ExportError, match=r"model\.onnx: onnx export does not reproduce .*differs by 0\.001"):
        export_module(nn.Linear(4, 4), torch.randn(2, 4), "onnx", onnx_path)
    assert onnx_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.pt"]


class TwoInTwoOut(nn.Module):
    """Shaped like an ensemble: two inputs (a vector and an image), a tuple of two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.head, self.conv = nn.Linear(5, 3), nn.Conv2d(1, 2, 3)

    def forward(self, feats: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.conv(image).mean((2, 3))
        return torch.sigmoid(self.head(feats) + pooled.sum(1, keepdim=True)), pooled


@pytest.mark.slow
@pytest.mark.parametrize("kind", core.KINDS)
def test_export_module_takes_several_inputs_and_outputs(kind, tmp_path):
    torch.manual_seed(0)
    module = TwoInTwoOut()
    example = (torch.randn(1, 5), torch.randn(1, 1, 8, 8))  # batch 1: repeated to 2 so the axis stays dynamic
    path = tmp_path / f"ensemble.{SUFFIX[kind]}"
    result = export_module(
        module, example, kind, path, input_names=["feats", "image"], output_names=["prob", "pooled"]
    )
    assert result.input_shapes == [["batch", 5], ["batch", 1, 8, 8]]
    assert result.output_shapes == [["batch", 3], ["batch", 2]]
    assert [c["batch_size"] for c in result.checks] == [1, 3] and all(c["passed"] for c in result.checks)
    inputs = (torch.randn(4, 5), torch.randn(4, 1, 8, 8))
    got = load_runner(kind, path)(inputs)
    with torch.no_grad():
        want = [t.numpy() for t in module(*inputs)]
    assert len(got) == 2
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)
    if kind == "onnx":
        session = core.onnx_session(path)
        assert [i.name for i in session.get_inputs()] == ["feats", "image"]
        assert [o.name for o in session.get_outputs()] == ["prob", "pooled"]
