"""X-ray training augmentation on the batch, on the training device (`data.augment_on=device`).

Why: once decoding is cached (medens/data/xray_cache.py), a per-image RandomAffine + ColorJitter in the
DataLoader workers is what limits the loader on CPU. Here the loader only carries the cached uint8 image
plus a few per-item random numbers, and one batched `affine_grid`/`grid_sample` and a brightness/contrast
blend run on the device after Lightning moved the batch (`XRayClassifier.on_after_batch_transfer`).

Determinism: the per-item parameters are drawn in the dataset's `__getitem__` from the global RNG, which
`medens.utils.seeding.SeededItems` seeds with the item's own seed, so they are a pure function of
(seed, epoch, index): independent of worker count, batch composition and resuming, as before.

The parameters come from the same `data.train_augment` list as the loader path: torchvision's
`RandomAffine` (degrees, translate, scale, shear), `ColorJitter` (brightness, contrast) and
`RandomHorizontalFlip`/`RandomVerticalFlip`, read from the instantiated transforms. Anything else (no
batched equivalent here) is an error that names it and the way out (`data.augment_on=loader`).
The distributions are torchvision's; pixels differ slightly (float instead of 8-bit intermediate values).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from medens.errors import ConfigError

#: Columns of the per-item parameter vector ("augment" in a training batch).
PARAM_NAMES = ("angle", "tx", "ty", "scale", "shear_x", "shear_y", "brightness", "contrast", "jitter_order",
               "hflip", "vflip")  # fmt: skip


def _range(value: Any, centre: float, where: str) -> tuple[float, float] | None:
    """torchvision stores ranges as (lo, hi) or a number around `centre`; None/0 means off."""
    if value is None:
        return None
    if isinstance(value, int | float):
        if value == 0:
            return None
        return (centre - float(value), centre + float(value)) if centre == 0 else (max(0.0, 1 - value), 1 + value)
    lo, hi = (float(v) for v in value)
    if lo > hi:
        raise ConfigError(f"{where}: range {value} has lo > hi")
    return None if lo == hi == centre else (lo, hi)


@dataclass
class BatchAugment:
    """Per-item parameter sampling (in the loader) and the batched transform (on the device).

    Output of `__call__`: float images normalised like the evaluation transforms, `[B, channels, H, W]`.
    A plain class, not an `nn.Module`: it holds no weights and must never enter a state dict.
    """

    channels: int = 3
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    degrees: tuple[float, float] | None = None
    translate: tuple[float, float] | None = None
    scale: tuple[float, float] | None = None
    shear: tuple[float, float, float, float] | None = None
    affine_mode: str = "nearest"
    fill: float = 0.0
    brightness: tuple[float, float] | None = None
    contrast: tuple[float, float] | None = None
    hflip: float = 0.0
    vflip: float = 0.0

    @classmethod
    def from_transforms(
        cls, transforms: Sequence[Any], channels: int, mean: Sequence[float] | None, std: Sequence[float] | None
    ) -> BatchAugment:
        """Read torchvision v2/v1 `RandomAffine`, `ColorJitter`, `Random{Horizontal,Vertical}Flip` objects."""
        aug = cls(channels=channels, mean=list(mean) if mean else None, std=list(std) if std else None)
        for t in transforms:
            kind = type(t).__name__
            where = f"data.train_augment {kind}"
            if kind == "RandomAffine":
                aug.degrees = _range(t.degrees, 0.0, where)
                aug.translate = tuple(float(v) for v in t.translate) if t.translate else None  # type: ignore[assignment]
                aug.scale = tuple(float(v) for v in t.scale) if t.scale else None  # type: ignore[assignment]
                if t.shear:
                    s = [float(v) for v in t.shear]
                    aug.shear = (s + [0.0, 0.0])[:4] if len(s) == 2 else tuple(s)  # type: ignore[assignment]
                mode = str(getattr(t.interpolation, "value", t.interpolation)).lower()
                if mode not in ("nearest", "bilinear"):
                    raise ConfigError(f"{where}: interpolation {mode!r} has no batched equivalent here "
                                      "(nearest, bilinear); set data.augment_on=loader")  # fmt: skip
                aug.affine_mode = mode
                fill = t.fill
                if isinstance(fill, dict):
                    fill = next(iter(fill.values()), 0)
                fill = 0 if fill is None else fill
                fill = fill[0] if isinstance(fill, list | tuple) else fill
                aug.fill = float(fill) / 255.0  # the loader path fills the uint8 image
            elif kind == "ColorJitter":
                if t.saturation or t.hue:
                    raise ConfigError(f"{where}: saturation/hue are not defined for greyscale X-rays; remove them")
                aug.brightness = _range(t.brightness, 1.0, where)
                aug.contrast = _range(t.contrast, 1.0, where)
            elif kind == "RandomHorizontalFlip":
                aug.hflip = float(t.p)
            elif kind == "RandomVerticalFlip":
                aug.vflip = float(t.p)
            else:
                raise ConfigError(
                    f"data.train_augment: {kind} has no batched on-device equivalent (supported: RandomAffine, "
                    "ColorJitter brightness/contrast, RandomHorizontalFlip, RandomVerticalFlip); set "
                    "data.augment_on=loader to run it per image in the DataLoader workers"
                )
        return aug

    def describe(self) -> dict[str, Any]:
        """For the checkpoint's io_contract: what training saw (inference never augments)."""
        return {k: v for k, v in {
            "degrees": self.degrees, "translate": self.translate, "scale": self.scale, "shear": self.shear,
            "interpolation": self.affine_mode, "brightness": self.brightness, "contrast": self.contrast,
            "hflip": self.hflip or None, "vflip": self.vflip or None,
        }.items() if v is not None}  # fmt: skip

    # -- in the loader, per item, under the item's seed ----------------------------------------------------
    def sample(self, height: int, width: int) -> torch.Tensor:
        """One item's parameters (`PARAM_NAMES`), from the global RNG that `SeededItems` seeded."""
        u = torch.rand(len(PARAM_NAMES), dtype=torch.float64).tolist()

        def draw(r: tuple[float, float] | None, x: float, default: float) -> float:
            return default if r is None else r[0] + (r[1] - r[0]) * x

        tx = ty = 0.0
        if self.translate:  # torchvision: whole pixels up to translate * size
            tx = float(round(draw((-self.translate[0] * width, self.translate[0] * width), u[1], 0.0)))
            ty = float(round(draw((-self.translate[1] * height, self.translate[1] * height), u[2], 0.0)))
        shear_x = draw(self.shear[:2] if self.shear else None, u[4], 0.0)  # type: ignore[arg-type]
        shear_y = draw(self.shear[2:] if self.shear else None, u[5], 0.0)  # type: ignore[arg-type]
        return torch.tensor([
            draw(self.degrees, u[0], 0.0), tx, ty, draw(self.scale, u[3], 1.0), shear_x, shear_y,
            draw(self.brightness, u[6], 1.0), draw(self.contrast, u[7], 1.0), float(u[8] < 0.5),
            float(u[9] < self.hflip), float(u[10] < self.vflip),
        ], dtype=torch.float32)  # fmt: skip

    # -- on the device, per batch --------------------------------------------------------------------------
    def _theta(self, p: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Inverse affine (output -> input) in `affine_grid`'s normalised coordinates, like torchvision's
        `_get_inverse_affine_matrix` about the image centre."""
        rot = torch.deg2rad(p[:, 0])
        sx, sy = torch.deg2rad(p[:, 4]), torch.deg2rad(p[:, 5])
        scale = p[:, 3]
        # forward matrix M = R(rot) * Shear * scale (torchvision's convention, y axis down)
        a = torch.cos(rot - sy) / torch.cos(sy)
        b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
        c = torch.sin(rot - sy) / torch.cos(sy)
        d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
        m = torch.stack([torch.stack([a, b], -1), torch.stack([c, d], -1)], -2) * scale[:, None, None]
        inv = torch.linalg.inv(m)
        # pixel -> normalised coordinates (align_corners=False): x_n = x_px * 2 / W
        t = torch.stack([p[:, 1] * 2 / width, p[:, 2] * 2 / height], -1)
        aspect = torch.tensor([[1.0, height / width], [width / height, 1.0]], device=p.device, dtype=p.dtype)
        inv = inv * aspect  # rotation in pixel space, not in the normalised square
        theta = torch.cat([inv, -(inv @ t[:, :, None])], -1)
        flip = torch.stack([1 - 2 * p[:, 9], 1 - 2 * p[:, 10]], -1)  # flips act on the input side
        return theta * flip[:, :, None]

    def _jitter(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """ColorJitter's brightness and contrast on a fresh float batch in [0, 1] (modified in place).

        Both are torchvision's blend `clamp(k * y + (1 - k) * ref, 0, 1)` (brightness: ref 0; contrast: ref the
        image mean), in each item's own random order; done as two per-item blends over the whole batch, not a
        gather and scatter per order: on a CPU "device" that halves the cost (~10 passes over the batch to ~5).
        """
        b = x.shape[0]
        bright, contrast = p[:, 6].view(b, 1, 1, 1), p[:, 7].view(b, 1, 1, 1)
        if not self.contrast:
            return x.mul_(bright).clamp_(0, 1)
        if not self.brightness:
            return torch.addcmul((1 - contrast) * x.mean((1, 2, 3), keepdim=True), x, contrast).clamp_(0, 1)
        first = (p[:, 8] > 0.5).view(b, 1, 1, 1)  # brightness first, then contrast
        k1, k2 = torch.where(first, bright, contrast), torch.where(first, contrast, bright)
        ref1 = torch.where(first, 0.0, (1 - contrast) * x.mean((1, 2, 3), keepdim=True))
        x = torch.addcmul(ref1, x, k1).clamp_(0, 1)
        ref2 = torch.where(first, (1 - contrast) * x.mean((1, 2, 3), keepdim=True), 0.0)
        return torch.addcmul(ref2, x, k2).clamp_(0, 1)

    def __call__(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, 1, H, W]` + parameters `[B, len(PARAM_NAMES)]` -> normalised float `[B, C, H, W]`."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"on-device X-ray augmentation expects uint8 [B, 1, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")  # fmt: skip
        x = images.float().div_(255.0)
        b, _, h, w = x.shape
        p = params.to(device=x.device, dtype=torch.float32)
        if self.degrees or self.translate or self.scale or self.shear or self.hflip or self.vflip:
            grid = (_base_grid(h, w, x.device) @ self._theta(p, h, w).transpose(1, 2)).view(b, h, w, 2)
            if self.fill:  # grid_sample pads with 0: shift so that 0 is the fill value
                x = F.grid_sample(x - self.fill, grid, mode=self.affine_mode, padding_mode="zeros",
                                  align_corners=False) + self.fill  # fmt: skip
            else:
                x = F.grid_sample(x, grid, mode=self.affine_mode, padding_mode="zeros", align_corners=False)
        if self.brightness or self.contrast:
            x = self._jitter(x, p)
        if self.mean is not None and self.std is not None:  # (x - mean) / std, broadcast to the channels
            scale = 1.0 / torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
            shift = -torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1) * scale
            x = torch.addcmul(shift, x, scale)
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1)
        return x.contiguous()


@functools.lru_cache(maxsize=8)
def _base_grid(height: int, width: int, device: torch.device) -> torch.Tensor:
    """`affine_grid`'s homogeneous pixel-centre coordinates (align_corners=False), `[H*W, 3]`, built once."""
    xs = (torch.arange(width, device=device, dtype=torch.float32) * 2 + 1) / width - 1
    ys = (torch.arange(height, device=device, dtype=torch.float32) * 2 + 1) / height - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy, torch.ones_like(gx)], -1).view(-1, 3)
