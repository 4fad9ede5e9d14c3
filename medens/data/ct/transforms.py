"""Training augmentation on cached CT patches (flips, 90-degree rotations, small affine, intensity).

Every random draw comes from torch's global RNG. medens' loaders (`medens.data.loaders.make_loader`)
seed that RNG per item from (seed, epoch, index), so augmentation is reproducible with any number of
workers and after resuming. (MONAI's Rand* transforms keep their own NumPy RandomState per
transform; the few operations needed are written here in torch, which also keeps MONAI's import
out of every DataLoader worker.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from medens.errors import ConfigError

DEFAULT_AUGMENT: dict[str, Any] = {
    "enabled": True,
    "flip": True,  # each axis flipped with probability 0.5
    "rot90": True,  # k * 90 degrees in a random plane (patches are cubes)
    "affine": True,  # small rotation / scaling / translation, with probability `prob`
    "rotate_deg": 10.0,
    "scale": 0.1,  # zoom factor drawn from [1 - scale, 1 + scale]
    "translate_vox": 2.0,
    "intensity": True,  # image channel only: scale, shift, gaussian noise, with probability `prob`
    "intensity_scale": 0.1,
    "intensity_shift": 0.05,
    "noise_std": 0.01,
    "prob": 0.5,
}


def normalise_augment(cfg: Mapping[str, Any] | bool | None) -> dict[str, Any]:
    """Fill defaults and validate the `augment` dict (``False`` turns augmentation off)."""
    out = dict(DEFAULT_AUGMENT)
    if cfg is False:
        out["enabled"] = False
    elif isinstance(cfg, Mapping):
        unknown = set(cfg) - set(DEFAULT_AUGMENT)
        if unknown:
            raise ConfigError(f"augment: unknown keys {sorted(unknown)}; known: {sorted(DEFAULT_AUGMENT)}")
        out.update(dict(cfg))
    elif cfg not in (None, True):
        raise ConfigError(f"augment must be a dict, true/false or null, got {cfg!r}")
    if not 0.0 <= float(out["prob"]) <= 1.0:
        raise ConfigError(f"augment.prob must be in [0, 1], got {out['prob']}")
    return out


def _rotation(rx: float, ry: float, rz: float) -> torch.Tensor:
    cx, sx, cy, sy, cz, sz = (
        math.cos(rx),
        math.sin(rx),
        math.cos(ry),
        math.sin(ry),
        math.cos(rz),
        math.sin(rz),
    )
    mx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float32)
    my = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float32)
    mz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float32)
    return mz @ my @ mx


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


class CTAugment:
    """Callable on a patch tensor [C, P, P, P]; channels >= ``n_image_channels`` are masks
    (moved by the spatial transforms with nearest sampling, never intensity-changed)."""

    def __init__(self, n_image_channels: int = 1, pad_value: float = 0.0, **cfg: Any) -> None:
        self.cfg = normalise_augment(cfg)
        self.n_image = n_image_channels
        self.pad_value = float(pad_value)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if not c["enabled"]:
            return x
        if c["flip"]:
            for axis in (1, 2, 3):
                if torch.rand(()) < 0.5:
                    x = torch.flip(x, dims=(axis,))
        if c["rot90"]:
            k = int(torch.randint(0, 4, ()))
            plane = [(1, 2), (1, 3), (2, 3)][int(torch.randint(0, 3, ()))]
            if k:
                x = torch.rot90(x, k, dims=plane)
        if c["affine"] and torch.rand(()) < c["prob"]:
            x = self._affine(x)
        if c["intensity"] and torch.rand(()) < c["prob"]:
            img = x[: self.n_image]
            img = img * (1.0 + _uniform(-c["intensity_scale"], c["intensity_scale"]))
            img = img + _uniform(-c["intensity_shift"], c["intensity_shift"])
            if c["noise_std"] > 0:
                img = img + torch.randn_like(img) * float(c["noise_std"])
            x = torch.cat([img, x[self.n_image :]], dim=0)
        return x.contiguous()

    def _affine(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        deg = math.radians(float(c["rotate_deg"]))
        rot = _rotation(_uniform(-deg, deg), _uniform(-deg, deg), _uniform(-deg, deg))
        zoom = _uniform(1.0 - c["scale"], 1.0 + c["scale"])
        size = x.shape[-1]
        shift = torch.tensor([_uniform(-c["translate_vox"], c["translate_vox"]) for _ in range(3)])
        theta = torch.zeros(1, 3, 4)
        theta[0, :, :3] = rot / zoom
        theta[0, :, 3] = shift * 2.0 / size  # normalised grid units
        grid = F.affine_grid(theta, [1, 1, *x.shape[1:]], align_corners=False)
        img = (
            F.grid_sample(
                (x[None, : self.n_image] - self.pad_value),
                grid,
                mode="bilinear",
                padding_mode="zeros",
                align_corners=False,
            )[0]
            + self.pad_value
        )
        if x.shape[0] > self.n_image:
            mask = F.grid_sample(
                x[None, self.n_image :], grid, mode="nearest", padding_mode="zeros", align_corners=False
            )[0]
            img = torch.cat([img, mask], dim=0)
        return img
