"""Training augmentation on cached CT patches: a MONAI dictionary-transform chain built from ``augment``.

Flips (``RandFlipd`` per axis), 90-degree rotations in a random plane (``OneOf`` three ``RandRotate90d``),
a small affine (``RandAffined``: rotation, zoom, translation; the mask moves with nearest sampling) and
intensity changes on the image only (``RandScaleIntensityd``, ``RandShiftIntensityd``,
``RandGaussianNoised``). MONAI's Rand* transforms keep their own NumPy RandomState: medens' loaders call
``set_random_state(seed)`` with each item's seed from (seed, epoch, index) (`medens.utils.seeding.SeededItems`),
so augmentation is reproducible with any number of workers and after resuming.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

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


class CTAugment:
    """Callable on a patch tensor [C, P, P, P]; channels >= ``n_image_channels`` are masks (moved by the
    spatial transforms with nearest sampling, never intensity-changed). ``pad_value`` (windowed air) is
    what the affine fills in: MONAI pads with zeros, so the image is shifted by it around ``RandAffined``."""

    def __init__(self, n_image_channels: int = 1, pad_value: float = 0.0, **cfg: Any) -> None:
        self.cfg = normalise_augment(cfg)
        self.n_image = n_image_channels
        self.pad_value = float(pad_value)
        self.chain = build_chain(self.cfg, self.pad_value) if self.cfg["enabled"] else None

    def set_random_state(self, seed: int) -> None:
        """Seed every random transform of the chain (called per item by medens' loaders)."""
        if self.chain is not None:
            self.chain.set_random_state(seed=int(seed) % (2**32))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.chain is None:
            return x
        item = {"image": x[: self.n_image]}
        if x.shape[0] > self.n_image:
            item["mask"] = x[self.n_image :]
        out = self.chain(item)
        parts = [out["image"], *([out["mask"]] if "mask" in out else [])]
        return torch.cat([torch.as_tensor(p).as_subclass(torch.Tensor).float() for p in parts], dim=0).contiguous()


def build_chain(c: Mapping[str, Any], pad_value: float = 0.0) -> Any:
    """The MONAI ``Compose`` that ``augment`` describes (keys ``image`` and, when present, ``mask``)."""
    from monai.transforms import (
        Compose,
        OneOf,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandRotate90d,
        RandScaleIntensityd,
        RandShiftIntensityd,
        ShiftIntensityd,
    )

    keys, prob = ["image", "mask"], float(c["prob"])
    chain: list[Any] = []
    if c["flip"]:
        chain += [RandFlipd(keys, prob=0.5, spatial_axis=axis, allow_missing_keys=True) for axis in (0, 1, 2)]
    if c["rot90"]:  # k in {0, 1, 2, 3} uniformly, in one of the three planes
        planes = [(0, 1), (0, 2), (1, 2)]
        chain.append(OneOf([RandRotate90d(keys, prob=0.75, max_k=3, spatial_axes=p, allow_missing_keys=True)
                            for p in planes]))  # fmt: skip
    if c["affine"]:
        deg = math.radians(float(c["rotate_deg"]))
        affine = RandAffined(keys, prob=prob, rotate_range=(deg,) * 3, scale_range=(float(c["scale"]),) * 3,
                             translate_range=(float(c["translate_vox"]),) * 3, mode=("bilinear", "nearest"),
                             padding_mode="zeros", allow_missing_keys=True)  # fmt: skip
        if pad_value:
            chain += [ShiftIntensityd("image", offset=-pad_value), affine, ShiftIntensityd("image", offset=pad_value)]
        else:
            chain.append(affine)
    if c["intensity"]:
        chain += [RandScaleIntensityd("image", factors=float(c["intensity_scale"]), prob=prob),
                  RandShiftIntensityd("image", offsets=float(c["intensity_shift"]), prob=prob)]  # fmt: skip
        if float(c["noise_std"]) > 0:
            chain.append(RandGaussianNoised("image", prob=prob, std=float(c["noise_std"]), sample_std=False))
    return Compose(chain)
