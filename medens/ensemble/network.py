"""The whole stacking ensemble as one `nn.Module`: raw modality tensors in, target probabilities out.

This is what `saved_models/exports/ensemble_traced.pt` holds. It chains the frozen base networks,
the same feature functions the stacking stage was trained on, the meta-learner's standardisation
and the MLP, so a deployment needs no medens code. Inputs (batch B, every tensor always passed):

- ``xray``  [B, C, H, W]: the preprocessed radiograph of the X-ray base model (its io_contract:
  greyscale resized to H x W, scaled to [0, 1], repeated to C channels, normalised);
- ``ct``    [B, C, P, P, P]: the nodule patch (HU window scaled to [0, 1], plus the nodule ball
  channel when the CT model takes one), centred on the nodule at the CT model's spacing;
- ``mri``   [B, 4, D, H, W]: the z-scored, brain-cropped multi-modal volume; the U-Net runs on it
  whole (no sliding window), so each spatial size must be a multiple of 2**len(strides);
- ``present`` [B, M] float: 1 where the modality (in ``modalities`` order) is present, 0 where it
  is missing; a missing modality's tensor can hold anything (zeros): its features are replaced by
  the meta-learner's missing-value encoding, exactly as in training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from medens.checkpoint.safe_build import load_checkpoint_verified
from medens.ensemble.base_models import FrozenBaseModel, load_frozen_base_model, segmentation_features
from medens.errors import CheckpointError
from medens.models.meta_learner import StackingMLP


class _XRayHead(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x).float())


class _CTHead(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.net = module.net
        self.tta_flips = bool(getattr(module, "tta_flips", False))

    def _prob(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x).float()
        if logits.shape[1] == 1:
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=1)[:, 1:2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tta_flips:
            return self._prob(x)
        flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
        return torch.stack([self._prob(torch.flip(x, dims=f) if f else x) for f in flips]).mean(0)


class _MRIHead(nn.Module):
    def __init__(self, net: nn.Module, voxel_ml: float) -> None:
        super().__init__()
        self.net = net
        self.voxel_ml = float(voxel_ml)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return segmentation_features(torch.softmax(self.net(x).float(), 1), self.voxel_ml)


_HEADS = {"xray": lambda b, v: _XRayHead(b.module.net), "ct": lambda b, v: _CTHead(b.module),
          "mri": lambda b, v: _MRIHead(b.module.net, v)}  # fmt: skip


class StackedEnsemble(nn.Module):
    """Frozen base heads -> standardised features (0 where missing) + missing indicators -> MLP -> sigmoid."""

    def __init__(
        self,
        base: dict[str, FrozenBaseModel],
        mlp: StackingMLP,
        feature_mean: list[float],
        feature_std: list[float],
        mri_voxel_ml: float = 0.001,
    ) -> None:
        super().__init__()
        self.modalities = list(base)
        self.heads = nn.ModuleDict({m: _HEADS[m](b, mri_voxel_ml) for m, b in base.items()})
        self.mlp = mlp
        self.register_buffer("mean", torch.tensor(feature_mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(feature_std, dtype=torch.float32))
        sizes = [len(b.feature_names) for b in base.values()]
        self.sizes = sizes
        self.eval().requires_grad_(False)

    def forward(
        self, xray: torch.Tensor, ct: torch.Tensor, mri: torch.Tensor, present: torch.Tensor
    ) -> torch.Tensor:
        inputs = {"xray": xray, "ct": ct, "mri": mri}
        f = torch.cat([self.heads[m](inputs[m]) for m in self.modalities], 1)
        z = (f - self.mean) / self.std
        mask = torch.cat([present[:, j : j + 1].expand(-1, n) for j, n in enumerate(self.sizes)], 1)
        z = torch.where(mask > 0.5, z, torch.zeros_like(z))
        x = torch.cat([z, 1.0 - present], 1)
        return torch.sigmoid(self.mlp(x))


def build_stacked_ensemble(
    meta_ckpt_path: str | Path, mri_voxel_ml: float = 0.001
) -> tuple[StackedEnsemble, dict[str, Any]]:
    """The ensemble of a `meta_learner.pth` (its base checkpoints from its own record) and a dict
    describing its inputs (shapes for one case, modality order, targets) and the base checkpoints it holds."""
    path = Path(meta_ckpt_path)
    ckpt = load_checkpoint_verified(path)  # its record names the base checkpoints: data, never code
    contract = (ckpt.get("hyperparameters") or {}).get("io_contract") or {}
    if contract.get("modality") != "ensemble" or "base_checkpoints" not in contract:
        raise CheckpointError(f"{path}: not a medens meta-learner checkpoint (no ensemble io_contract)")
    base = {m: load_frozen_base_model(m, rec["path"]) for m, rec in contract["base_checkpoints"].items()}
    for m, rec in contract["base_checkpoints"].items():
        if base[m].sha256 != rec["sha256"]:
            raise CheckpointError(
                f"{rec['path']}: SHA-256 {base[m].sha256[:12]}... differs from the {rec['sha256'][:12]}... "
                f"the meta-learner {path} was trained on; the base model changed since"
            )
    names = [n for b in base.values() for n in b.feature_names]
    if names != contract["feature_names"]:
        raise CheckpointError(
            f"{path}: feature order {contract['feature_names']} does not match the base models' {names}"
        )
    net_cfg = ckpt["hyperparameters"]["model"]["net"]
    mlp = StackingMLP(
        len(names) + len(base),
        len(contract["targets"]),
        net_cfg.get("hidden", (256, 160)),
        net_cfg.get("dropout", 0.0),
    )
    mlp.load_state_dict(ckpt["model_state_dict"])
    ens = StackedEnsemble(base, mlp, contract["feature_mean"], contract["feature_std"], mri_voxel_ml)
    shapes: dict[str, list[int]] = {}
    for m, b in base.items():
        bc = b.io_contract
        data = b.hyperparameters["data"]
        if m == "xray":
            shapes[m] = [
                int(v)
                for v in bc.get("input_shape") or [data["channels"], data["image_size"], data["image_size"]]
            ]
        elif m == "ct":
            shapes[m] = [len(data["channels"]), *[int(data["patch_size"])] * 3]
        else:
            shapes[m] = [len(data["modalities"]), *[int(v) for v in data["patch_size"]]]
    info = {
        "modalities": list(base),
        "targets": list(contract["targets"]),
        "input_shapes": shapes,
        "meta_learner": str(path),
        # what each base model was built from (verified above), so an export describes it without a reload
        "base_models": {m: {"sha256": b.sha256, "hyperparameters": b.hyperparameters} for m, b in base.items()},
    }
    return ens, info


def example_inputs(info: dict[str, Any], batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs of the ensemble's shapes (missing base models get a 1-element placeholder)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in ("xray", "ct", "mri"):
        shape = info["input_shapes"].get(m, [1])
        out.append(torch.rand(batch, *shape, generator=g))
    out.append(torch.ones(batch, len(info["modalities"])))
    return tuple(out)
