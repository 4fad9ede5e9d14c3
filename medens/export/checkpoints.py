"""Production exports of medens checkpoints (`scripts/export.py`), with a manifest a deployment can trust.

A checkpoint's `hyperparameters` hold its resolved training config, so the bare network is rebuilt from
`hyperparameters.model.net` and loaded strictly from `model_state_dict`; nothing else of medens is in
the export. Exports compute the network's LOGITS (no sigmoid/softmax inside), exactly what
`model_state_dict` computes in plain PyTorch; `manifest.json` says per export how to turn them into
probabilities, in which label order, for which input, from which checkpoint (SHA-256), and how closely
the file reproduced eager PyTorch.

Targets are `<model>_<format>`: `<model>` a key of `checkpoints` (`xray`, `ct`, ...), `<format>` one of
`torchscript` -> `<model>_torchscript.pt`, `onnx` -> `<model>_onnx.onnx`, `export` -> `<model>_exported.pt2`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from medens.checkpoint.safe_build import (
    build_network_from_checkpoint,
    checkpoint_modality,
    load_checkpoint_verified,
    validate_safe_config,
)
from medens.errors import CheckpointError, ConfigError, ExportError
from medens.export.core import check_onnx_opset, export_module
from medens.training.validation import validate_values
from medens.utils.hashing import sha256_file
from medens.utils.jsonio import read_json_object, write_json_strict

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "medens-exports/1"
MANIFEST_NAME = "manifest.json"


def calibration_manifest_entry(ckpt_path: Path) -> dict[str, Any] | None:
    """The checkpoint's stored calibration (`<stem>.calibration.json`, SHA-256 checked), or None."""
    from medens.evaluation.calibration import manifest_entry

    return manifest_entry(ckpt_path)
#: format suffix of a target name -> (export kind or None for "the configured TorchScript mode", file name)
FORMATS: dict[str, tuple[str | None, str]] = {
    "torchscript": (None, "{model}_torchscript.pt"),
    "onnx": ("onnx", "{model}_onnx.onnx"),
    "export": ("torch_export", "{model}_exported.pt2"),
}
MODALITIES = ("xray", "ct", "mri")
LOADER_NOTE = "the written file reloaded with torch"


@dataclass
class SourceNetwork:
    """A bare network rebuilt from a checkpoint, with what its exports must document."""

    name: str
    path: Path
    net: nn.Module
    modality: str | None
    input_shape: list[int]  # without the batch axis
    io_contract: dict[str, Any]
    checkpoint: dict[str, Any]  # path, sha256, epoch, best_metric, timestamp, net config
    inference: dict[str, Any] | None = None  # what a server runs around the export (TTA, sliding window)


def parse_targets(targets: Sequence[str], models: Sequence[str]) -> list[tuple[str, str, str]]:
    """`[(target, model, format)]` from names like `xray_torchscript`; unknown names raise `ConfigError`."""
    valid = [f"{m}_{f}" for m in models for f in FORMATS]
    out = []
    for target in targets:
        model, _, fmt = str(target).rpartition("_")
        if model not in models or fmt not in FORMATS:
            raise ConfigError(
                f"unknown export target {target!r}; valid targets (for checkpoints "
                f"{', '.join(models) or 'none'}): {', '.join(valid)}"
            )
        out.append((str(target), model, fmt))
    if len({t for t, _, _ in out}) != len(out):
        raise ConfigError(f"export targets repeat a name: {list(targets)}")
    return out


def _input_shape(hyper: dict[str, Any], modality: str | None, path: Path) -> list[int]:
    contract = hyper.get("io_contract") or {}
    data = hyper.get("data") or {}
    if contract.get("input_shape"):
        return [int(v) for v in contract["input_shape"]]
    channels = (
        contract.get("input_channels") or len(contract.get("channels") or data.get("channels") or []) or None
    )
    patch = contract.get("patch_size") or data.get("patch_size")
    if channels and patch:
        patch = [patch] * 3 if isinstance(patch, int) else list(patch)
        return [int(channels), *[int(p) for p in patch]]
    raise ConfigError(
        f"{path}: cannot tell the input shape of this {modality or 'unknown'} checkpoint (no io_contract "
        "input_shape, channels or patch_size); give it as input_shapes.<model>=[C, ...] (without batch)"
    )


def load_source_network(
    path: str | os.PathLike, expected_modality: str | None, input_shape: Sequence[int] | None = None
) -> SourceNetwork:
    """Rebuild the bare network of `path` from its own config and load its weights strictly.

    Raises `CheckpointError` naming the file when it is missing, is not a medens checkpoint, was trained
    for another modality than `expected_modality`, or its state dict does not fit its network (listing
    the mismatched keys).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: checkpoint file not found (set checkpoints.<model>=... to another file)"
        )
    ckpt = load_checkpoint_verified(path, modality=expected_modality, role="export")  # data, never code
    net = build_network_from_checkpoint(ckpt, path=path)  # allow-listed targets, weights loaded strictly
    hyper = ckpt["hyperparameters"]
    contract = hyper.get("io_contract") or {}
    modality = checkpoint_modality(hyper)
    cfg = OmegaConf.create(dict(hyper["model"]["net"]))
    if "pretrained_path" in cfg:
        cfg.pretrained_path = None  # the weights come from the checkpoint, never from elsewhere
    shape = [int(v) for v in input_shape] if input_shape else _input_shape(hyper, modality, path)
    return SourceNetwork(
        name=str(modality or expected_modality or path.stem),
        path=path,
        net=net.eval(),
        modality=modality,
        input_shape=shape,
        io_contract=dict(contract),
        checkpoint={
            "path": str(path.resolve()),
            "sha256": sha256_file(path),
            "epoch": ckpt.get("epoch"),
            "best_metric": ckpt.get("best_metric"),
            "monitor": ckpt.get("monitor"),
            "timestamp": ckpt.get("timestamp"),
            "network": OmegaConf.to_container(cfg),
        },
        inference=inference_settings(hyper),
    )


def inference_settings(hyper: Mapping[str, Any]) -> dict[str, Any]:
    """How evaluation runs the network (plain values only), so a server can do the same around an export:
    flip TTA, the segmenter's sliding-window ROI, overlap, blending and window batch, and its postprocessing."""
    model = hyper.get("model") or {}
    out: dict[str, Any] = {}
    if "tta_flips" in model:
        out["tta_flips"] = bool(model.get("tta_flips"))
    post = (hyper.get("io_contract") or {}).get("postprocess")
    if isinstance(post, Mapping):
        out["postprocess"] = dict(post)  # the segmenter's label-map postprocessing chosen on validation
    inferer = model.get("inferer")
    if isinstance(inferer, Mapping):
        out["sliding_window"] = {
            k: (list(v) if isinstance(v, (list, tuple)) else v)
            for k, v in inferer.items()
            if k in ("roi_size", "sw_batch_size", "overlap", "mode", "sigma_scale", "padding_mode")
        }
    net = model.get("net") or {}
    if isinstance(net, Mapping) and net.get("strides"):
        size = 1
        for s in net["strides"]:
            size *= int(s)
        out["size_multiple"] = size  # a whole-volume input must be a multiple of this per axis
    return out


def describe_output(source: SourceNetwork, n_outputs: int) -> dict[str, Any]:
    """What the exported output means: always logits, with the post-processing that gives probabilities."""
    labels = list(source.io_contract.get("label_names") or [])
    if source.modality == "ct" and n_outputs == 2:
        return {
            "meaning": "two logits [benign, malignant] per case (no softmax inside the export)",
            "postprocess": "probability of malignancy = softmax(output, dim=1)[:, 1]",
            "label_names": ["benign", "malignant"],
        }
    if source.modality == "mri":
        return {
            "meaning": "per-voxel class logits, classes in label_names order (no softmax inside the export)",
            "postprocess": "segmentation = argmax(output, dim=1); probabilities = softmax(output, dim=1)",
            "label_names": labels,
        }
    what = (
        "malignancy logit per case"
        if source.modality == "ct"
        else "one logit per label, in label_names order"
    )
    return {
        "meaning": f"{what} (no sigmoid inside the export)",
        "postprocess": "probabilities = sigmoid(output)",
        "label_names": labels,
    }


def _cfg_get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    value = OmegaConf.select(cfg, key, default=default)
    return (
        OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value
    )


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """An exports `manifest.json`, refused (`UnsafeCheckpointError` naming the file and key) when any part
    of it could make a reader instantiate code: the network configs it records are checked like a
    checkpoint's (`medens.checkpoint.safe_build.validate_safe_config`). Use this to read a manifest."""
    path = Path(path)
    manifest = read_json_object(path, "export manifest", ExportError)
    validate_safe_config(manifest, path, "manifest")
    return manifest


def update_manifest(out_dir: Path, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Merge `entries` into `out_dir/manifest.json` (atomically); entries whose file is gone are dropped."""
    path = out_dir / MANIFEST_NAME
    old: dict[str, Any] = {}
    if path.is_file():
        try:
            old = read_manifest(path).get("exports", {})
        except ExportError:
            log.warning("%s is not valid JSON; rewriting it", path)
        old = old if isinstance(old, dict) else {}
    exports = {
        k: v for k, v in old.items() if isinstance(v, dict) and (out_dir / v.get("file", "")).is_file()
    }
    exports.update(entries)
    manifest = {
        "format": MANIFEST_FORMAT,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "note": "network exports compute logits (see outputs[].postprocess for probabilities); ensemble_traced outputs probabilities",
        "exports": dict(sorted(exports.items())),
    }
    write_json_strict(path, manifest)
    return manifest


def export_checkpoints(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Write the configured `targets` from their checkpoints into `out_dir`; returns the manifest.

    Every target name, checkpoint and the ONNX opset are checked before anything is written, so bad input
    leaves `out_dir` as it was; each export is verified before it replaces an older file.
    """
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    validate_values(cfg)  # types and ranges (verify.batch_sizes, onnx.opset, atol...) before any work
    out_dir = Path(str(_cfg_get(cfg, "out_dir")))
    checkpoints = dict(_cfg_get(cfg, "checkpoints") or {})
    input_shapes = dict(_cfg_get(cfg, "input_shapes") or {})
    requested = [str(t) for t in (_cfg_get(cfg, "targets") or [])]
    want_ensemble = "ensemble_traced" in requested
    targets = parse_targets([t for t in requested if t != "ensemble_traced"], [str(m) for m in checkpoints])
    if not targets and not want_ensemble:
        raise ConfigError("targets is empty: name at least one export, e.g. targets=[xray_torchscript]")
    ts_mode = str(_cfg_get(cfg, "torchscript", "trace"))
    if ts_mode not in ("trace", "script"):
        raise ConfigError(f"torchscript must be 'trace' or 'script', got {ts_mode!r}")
    opset = int(_cfg_get(cfg, "onnx.opset", 18))
    exporter = str(_cfg_get(cfg, "onnx.exporter", "dynamo"))
    if any(fmt == "onnx" for _, _, fmt in targets):
        check_onnx_opset(opset, exporter)
    batches = [int(b) for b in _cfg_get(cfg, "verify.batch_sizes", [1, 3])]
    atol, rtol = float(_cfg_get(cfg, "verify.atol", 1e-4)), float(_cfg_get(cfg, "verify.rtol", 1e-3))
    seed = int(_cfg_get(cfg, "verify.seed", 0))
    example_batch = int(_cfg_get(cfg, "example_batch", 2))
    dynamic = bool(_cfg_get(cfg, "dynamic_batch", True))

    sources: dict[str, SourceNetwork] = {}
    for _, model, _ in targets:  # load (and validate) every source before writing anything
        if model not in sources:
            sources[model] = load_source_network(
                str(checkpoints[model]), model if model in MODALITIES else None, input_shapes.get(model)
            )

    ensemble = None
    if want_ensemble:  # built and checked (base checkpoints present and unchanged) before writing
        from medens.export.ensemble import load_ensemble

        meta = _cfg_get(cfg, "ensemble.checkpoint")
        if not meta or not Path(str(meta)).is_file():
            raise ConfigError(
                f"ensemble_traced: meta-learner checkpoint {meta!r} not found (ensemble.checkpoint)"
            )
        ensemble = load_ensemble(str(meta), float(_cfg_get(cfg, "ensemble.mri_voxel_ml", 0.001)))

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {}
    if ensemble is not None:
        from medens.export.ensemble import export_ensemble

        entry = export_ensemble(*ensemble, out_dir, tuple(batches), atol, rtol, seed)
        manifest = update_manifest(out_dir, {"ensemble_traced": entry})
        log.info("exported ensemble_traced -> %s", out_dir / entry["file"])
    for target, model, fmt in targets:
        source = sources[model]
        kind, pattern = FORMATS[fmt]
        kind = kind or f"torchscript_{ts_mode}"
        path = out_dir / pattern.format(model=model)
        example = torch.randn(
            (example_batch, *source.input_shape), generator=torch.Generator().manual_seed(seed)
        )
        result = export_module(
            source.net, example, kind, path, input_names=["input"], output_names=["output"],
            dynamic_batch=dynamic, verify_batches=batches, atol=atol, rtol=rtol, seed=seed,
            opset=opset, onnx_exporter=exporter,
        )  # fmt: skip
        n_out = int(result.output_shapes[0][-1]) if len(result.output_shapes[0]) == 2 else 0
        entry = {
            "target": target,
            "file": path.name,
            "format": {"onnx": "onnx", "torch_export": "torch.export (.pt2)"}.get(kind, "torchscript"),
            "kind": kind,
            "load_with": result.to_dict()["load_with"],
            "sha256": result.sha256,
            "size_bytes": result.size_bytes,
            "inputs": [
                {
                    "name": "input",
                    "shape": result.input_shapes[0],
                    "dtype": result.input_dtypes[0],
                    "preprocessing": source.io_contract.get("preprocessing")
                    or {
                        k: source.io_contract[k]
                        for k in ("channels", "value_range", "hu_window", "spacing_mm")
                        if k in source.io_contract
                    },
                }
            ],
            "outputs": [
                {
                    "name": "output",
                    "shape": result.output_shapes[0],
                    "dtype": result.output_dtypes[0],
                    **describe_output(source, n_out),
                }
            ],
            "modality": source.modality,
            "inference": source.inference or {},
            "source_checkpoint": source.checkpoint,
            "io_contract": source.io_contract,
            # post-hoc calibration stored beside the checkpoint (null: none): p = sigmoid(scale * logit + bias)
            "calibration": calibration_manifest_entry(source.path),
            "tolerance": {"atol": atol, "rtol": rtol, "rule": "|export - eager| <= atol + rtol * |eager|"},
            "verification": {
                "passed": True,
                "reference": "eager PyTorch float32 on CPU",
                "runtime": "onnxruntime CPUExecutionProvider" if kind == "onnx" else LOADER_NOTE,
                "seed": seed,
                "checks": result.checks,
                "max_abs_diff": result.max_abs_diff,
            },
            "dynamic_batch": dynamic,
            "onnx_opset": result.opset,
            "onnx_exporter": result.onnx_exporter,
            "torch_version": torch.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if kind == "onnx":
            import onnxruntime

            entry["onnxruntime_version"] = onnxruntime.__version__
        manifest = update_manifest(out_dir, {target: entry})
        log.info(
            "%s -> %s (%s, max abs diff %.2e over batch sizes %s)",
            source.path, path, kind, result.max_abs_diff, [c["batch_size"] for c in result.checks],
        )  # fmt: skip
    return manifest
