"""`ensemble_traced.pt`: the whole stacking ensemble (base networks, feature functions, meta-learner)
traced to TorchScript; raw modality tensors and a presence mask in, target probabilities out.

Input sizes and the missing-modality convention are those of `medens.ensemble.network.StackedEnsemble`;
they are also written into the export manifest.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from medens.ensemble.network import StackedEnsemble, build_stacked_ensemble, example_inputs
from medens.export.core import export_module
from medens.utils.hashing import sha256_file

INPUT_NAMES = ["xray", "ct", "mri", "present"]


def load_ensemble(
    meta_ckpt: str | Path, mri_voxel_ml: float = 0.001
) -> tuple[StackedEnsemble, dict[str, Any]]:
    """Build (and validate: base checkpoints present, unchanged since stacking) before anything is written."""
    return build_stacked_ensemble(meta_ckpt, mri_voxel_ml)


def serving_info(info: dict[str, Any]) -> dict[str, Any]:
    """What a server needs to preprocess raw inputs for the traced ensemble: each base model's io_contract
    (without its patient list) and inference settings, from the base checkpoints `load_ensemble` verified."""
    from medens.export.checkpoints import inference_settings

    bases: dict[str, Any] = {}
    for m, rec in info["base_models"].items():
        hyper = rec["hyperparameters"]
        bases[m] = {
            "io_contract": {k: v for k, v in (hyper.get("io_contract") or {}).items() if k != "seen_patients"},
            "inference": inference_settings(hyper),
            "sha256": rec["sha256"],
        }
    return {"modalities": list(info["modalities"]), "base_models": bases}


def export_ensemble(
    ensemble: StackedEnsemble,
    info: dict[str, Any],
    out_dir: Path,
    verify_batches: tuple[int, ...] = (1, 3),
    atol: float = 1e-4,
    rtol: float = 1e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """Trace, verify against the eager ensemble at `verify_batches`, write; returns a manifest entry."""
    path = Path(out_dir) / "ensemble_traced.pt"
    example = example_inputs(info, batch=2, seed=seed)
    result = export_module(
        ensemble, example, "torchscript_trace", path, input_names=INPUT_NAMES, output_names=["probabilities"],
        dynamic_batch=True, verify_batches=verify_batches, atol=atol, rtol=rtol, seed=seed,
    )  # fmt: skip
    shapes = info["input_shapes"]
    return {
        "target": "ensemble_traced",
        "file": path.name,
        "format": "torchscript",
        "kind": "torchscript_trace",
        "load_with": "torch.jit.load(path)",
        "sha256": result.sha256,
        "size_bytes": result.size_bytes,
        "inputs": [
            {
                "name": "xray",
                "shape": ["batch", *shapes.get("xray", [1])],
                "meaning": "preprocessed radiograph (X-ray base model's io_contract)",
            },
            {
                "name": "ct",
                "shape": ["batch", *shapes.get("ct", [1])],
                "meaning": "nodule patch (CT base model's io_contract)",
            },
            {
                "name": "mri",
                "shape": ["batch", *shapes.get("mri", [1])],
                "meaning": "z-scored brain-cropped volume, sizes multiples of the U-Net's downsampling",
            },
            {
                "name": "present",
                "shape": ["batch", len(info["modalities"])],
                "meaning": f"1 = present, 0 = missing, in order {info['modalities']}",
            },
        ],  # fmt: skip
        "outputs": [
            {"name": "probabilities", "shape": ["batch", len(info["targets"])], "labels": info["targets"]}
        ],
        "missing_modalities": "pass any tensor of the right shape (e.g. zeros) and 0 in `present`",
        **serving_info(info),
        "source_checkpoint": {"path": info["meta_learner"], "sha256": sha256_file(info["meta_learner"])},
        "tolerance": {"atol": atol, "rtol": rtol, "rule": "|export - eager| <= atol + rtol * |eager|"},
        "verification": {
            "passed": True,
            "reference": "eager StackedEnsemble float32 on CPU",
            "checks": result.checks,
            "max_abs_diff": result.max_abs_diff,
            "seed": seed,
        },  # fmt: skip
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
