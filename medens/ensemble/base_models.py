"""Frozen base models: each modality's `*_best.pth` rebuilt from its own config, turned into features.

A base model is loaded once, put in eval mode with every parameter's `requires_grad` off, and only
ever called under `torch.no_grad()`: the stacking stage can never change it. Each turns one cohort
row into a fixed-length feature vector with named entries, and refuses a checkpoint of another
modality or architecture with an error naming the file.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch import nn

from medens.checkpoint.safe_build import (
    checkpoint_modality,
    load_checkpoint_verified,
    rebuild_module,
)
from medens.errors import CheckpointError
from medens.utils.hashing import sha256_file

log = logging.getLogger(__name__)


def segmentation_features(probs: torch.Tensor, voxel_ml: float | torch.Tensor) -> torch.Tensor:
    """Fixed features of a soft BraTS segmentation [B, 4, ...] (background, NCR, ED, ET).

    Returns [B, 7]: log1p volume (ml) of NCR, ED, ET and whole tumour, the core/whole and
    enhancing/whole ratios, and the mean confidence over voxels predicted as tumour. Pure tensor ops,
    so the traced ensemble computes exactly what the stacking stage was trained on.
    """
    b, k = probs.shape[:2]
    flat = probs.reshape(b, k, -1)
    hard = torch.nn.functional.one_hot(flat.argmax(1), k).permute(0, 2, 1).to(flat.dtype)
    vol = hard.sum(-1) * voxel_ml  # [B, K] ml
    ncr, ed, et = vol[:, 1], vol[:, 2], vol[:, 3]
    wt = ncr + ed + et
    tc = ncr + et
    tumour = 1.0 - hard[:, 0]
    conf = (flat.max(1).values * tumour).sum(-1) / tumour.sum(-1).clamp_min(1.0)
    ratio_tc = tc / wt.clamp_min(1e-6)
    ratio_et = et / wt.clamp_min(1e-6)
    return torch.stack(
        [torch.log1p(ncr), torch.log1p(ed), torch.log1p(et), torch.log1p(wt), ratio_tc, ratio_et, conf], 1
    )


MRI_FEATURES = [
    "log_vol_ncr",
    "log_vol_ed",
    "log_vol_et",
    "log_vol_wt",
    "tc_over_wt",
    "et_over_wt",
    "confidence",
]


@dataclass
class FrozenBaseModel:
    """One frozen base model and what it needs to turn a cohort row into features."""

    modality: str
    path: Path
    sha256: str
    module: nn.Module
    hyperparameters: dict[str, Any]
    feature_names: list[str] = field(default_factory=list)

    @property
    def io_contract(self) -> dict[str, Any]:
        return dict(self.hyperparameters.get("io_contract") or {})

    def seen_patients(self) -> set[str] | None:
        """Patients this model trained or was selected on (None: the checkpoint does not say)."""
        seen = self.io_contract.get("seen_patients")
        return None if seen is None else {str(p) for p in seen}

    def is_frozen(self) -> bool:
        return not self.module.training and not any(p.requires_grad for p in self.module.parameters())

    # -- features --------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, row: pd.Series) -> np.ndarray:
        """This modality's features for one manifest row (its path column must be set)."""
        return getattr(self, f"_features_{self.modality}")(row)

    def _features_xray(self, row: pd.Series) -> np.ndarray:
        from medens.data.xray import build_transforms, load_xray_image

        data = self.hyperparameters["data"]
        tf = build_transforms(int(data["image_size"]), int(data["channels"]), str(data["normalize"]), None)
        x = tf(load_xray_image(Path(row["xray_path"])))[None]
        return torch.sigmoid(self.module.net(x).float())[0].numpy()

    def _features_ct(self, row: pd.Series) -> np.ndarray:
        from medens.data.ct import io as ct_io
        from medens.data.ct.cache import PatchConfig, extract_record_patches
        from medens.data.ct.labels import NoduleRecord
        from medens.data.ct.sources import ErrorPolicy

        data = self.hyperparameters["data"]
        cfg = PatchConfig(
            patch_size=int(data["patch_size"]),
            spacing_mm=float(data["spacing_mm"]),
            hu_window=tuple(float(v) for v in data["hu_window"]),
            pad_hu=float(data["pad_hu"]),
            channels=tuple(data["channels"]),
        )
        coords = [row.get(c) for c in ("ct_x", "ct_y", "ct_z")]
        centre = None if any(v is None or pd.isna(v) for v in coords) else [float(v) for v in coords]
        diameter = row.get("ct_diameter_mm")
        rec = NoduleRecord(
            case_id=str(row["patient_id"]),
            patient_id=str(row["patient_id"]),
            source_file=str(row["ct_path"]),
            center_world=centre,
            diameter_mm=float(diameter) if diameter is not None and not pd.isna(diameter) else math.nan,
        )
        scan = ct_io.read_scan(row["ct_path"])
        (_, patch), *_ = extract_record_patches(scan, [rec], cfg, ErrorPolicy("error"))
        x = torch.from_numpy(np.asarray(patch, dtype=np.float32))[None]
        return self.module.predict_proba(x)[0].numpy()

    def _features_mri(self, row: pd.Series) -> np.ndarray:
        from medens.data.mri.brats import resolve_case, resolve_modalities, resolve_patterns
        from medens.data.mri.readers import reader_from_data_config
        from medens.data.mri.transforms import build_decode_transform, build_eval_transform

        data = self.hyperparameters["data"]
        contract = self.io_contract
        reader = reader_from_data_config(data)  # data.source, or the flat keys of older checkpoints
        mods = resolve_modalities(data["modalities"])
        candidates = resolve_patterns(reader.naming, mods, reader.file_patterns)
        folder = Path(row["mri_path"])
        case = resolve_case(folder, mods, candidates, require_label=False, case_id=folder.name)
        label_map = {int(k): int(v) for k, v in (contract.get("label_map") or {}).items()} or reader.codes
        item = {
            "case_id": case.case_id,
            "image_files": [str(p) for p in case.image_files],
            "modalities": mods,
        }
        if case.mask_file is not None:
            item["mask_file"] = str(case.mask_file)
        decoded = build_decode_transform(
            label_map, bool(data.get("crop_foreground", True)), int(data.get("crop_margin", 0))
        )(item)
        image = build_eval_transform()(decoded)["image"]
        voxel_ml = float(np.prod(nib.load(str(case.image_files[0])).header.get_zooms()[:3])) / 1000.0
        # no test-time mirroring: the traced ensemble's MRI head (medens.ensemble.network) runs the plain network
        probs = torch.softmax(self.module.predict_logits(image[None].float(), tta=False).float(), 1)
        return segmentation_features(probs, voxel_ml)[0].numpy()


_NAMES = {"xray": "XRayClassifier", "ct": "CTClassifier", "mri": "UNetSegmenter"}


def load_frozen_base_model(modality: str, ckpt_path: str | Path) -> FrozenBaseModel:
    """Rebuild a base model from its `*_best.pth` (network and preprocessing from its own config) and
    freeze it. A missing file, a checkpoint of another modality, or weights that do not fit the
    configured network are errors naming the file."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: {modality} base checkpoint not found (set ensemble.base_models.{modality}.ckpt_path)"
        )
    ckpt = load_checkpoint_verified(path, modality=modality, role="base model")  # data, never code
    hyper = ckpt.get("hyperparameters") or {}
    if "model" not in hyper or "data" not in hyper or checkpoint_modality(hyper) is None:
        raise CheckpointError(f"{path}: no model/data config or modality in 'hyperparameters'; not a medens "
                              "checkpoint")  # fmt: skip
    module = rebuild_module(ckpt, path, modality)
    module.eval()
    module.requires_grad_(False)
    contract = hyper.get("io_contract") or {}
    if modality == "xray":
        names = [
            f"xray.{n}"
            for n in contract.get("label_names") or range(int(hyper["model"]["net"]["num_classes"]))
        ]
    elif modality == "ct":
        names = ["ct.malignancy"]
    else:
        names = [f"mri.{n}" for n in MRI_FEATURES]
    return FrozenBaseModel(modality, path, sha256_file(path), module, hyper, names)
