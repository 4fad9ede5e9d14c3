"""MONAI transform chains for BraTS cases: a cacheable decode stage and per-phase stages.

``decode`` (deterministic, cached in memory or on disk): read and validate the case (the reader),
z-score each channel over its non-zero (brain) voxels (``NormalizeIntensityd``) and crop to the box of
brain and tumour (``CropForegroundd``, which records the box as ``crop_start``/``crop_end``).
``train`` (random, never cached): pad to the patch size, sample patches around tumour / brain
background, then the augmentations of ``augment`` (flips and intensity jitter by default; affine,
elastic and contrast augmentation on request). ``eval`` (validation/test/predict): whole cropped volume.

Items keep what is needed to write a prediction back as NIfTI on the input scan's grid:
``affine`` (4x4 voxel->world of the original file), ``original_shape``, ``crop_start``/``crop_end``
(voxel box of the item inside the original volume), ``spacing`` (mm) and ``reference_file``;
`uncrop` is the crop's inverse (MONAI's ``BorderPad``, what ``CropForegroundd.inverse`` applies).
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import (
    BorderPad,
    CastToTyped,
    Compose,
    ConcatItemsd,
    CropForegroundd,
    DeleteItemsd,
    EnsureTyped,
    NormalizeIntensityd,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
    Transform,
)
from monai.utils import convert_to_numpy

from medens.errors import ConfigError
from medens.utils.atomic import atomic_path

from .readers import read_brats_case

DEFAULT_AUGMENT: dict[str, Any] = {
    "enabled": True,
    "flip_prob": 0.5,  # per axis
    "flip_axes": [0, 1, 2],
    "intensity_prob": 1.0,
    "scale_intensity": 0.1,  # image * (1 + U(-s, s)), per channel
    "shift_intensity": 0.1,  # image + U(-o, o), per channel (in z-score units)
    "noise_prob": 0.0,
    "noise_std": 0.1,
    # optional, off by default (prob 0): nnU-Net-style spatial and contrast augmentation of each patch
    "affine_prob": 0.0,  # RandAffined: rotation U(-rotate_deg, rotate_deg) per axis, zoom 1 + U(-scale, scale)
    "rotate_deg": 15.0,
    "scale": 0.15,
    "elastic_prob": 0.0,  # Rand3DElasticd: smoothing sigma and magnitude ranges (voxels)
    "elastic_sigma": [5.0, 8.0],
    "elastic_magnitude": [50.0, 150.0],
    "contrast_prob": 0.0,  # RandAdjustContrastd: gamma range
    "contrast_gamma": [0.7, 1.5],
}
IMAGE_KEYS = ["image", "label", "brain_mask"]
_ARRAY_KEYS = [*IMAGE_KEYS, "affine", "spacing", "original_shape", "crop_start", "crop_end"]


class LoadBraTSCased(Transform):
    """Read one case (dict of file paths) with `read_brats_case`.

    Home-made: MONAI's ``LoadImaged`` cannot check that all files share one grid or map the release's
    label codes with errors naming the case and file.
    """

    def __init__(self, label_map: Mapping[int, int]) -> None:
        self.label_map = dict(label_map)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[str, Any]:
        return read_brats_case(data, self.label_map)


def _whole_volume(x: torch.Tensor) -> torch.Tensor:
    """``select_fn`` of a crop that keeps everything (``crop_foreground=False``: same code path)."""
    return torch.ones_like(torch.as_tensor(x), dtype=torch.bool)


def build_decode_transform(
    label_map: Mapping[int, int], crop_foreground: bool = True, crop_margin: int = 0
) -> Compose:
    """Deterministic chain whose output is cached: load+validate, z-score over the brain, crop."""
    return Compose(
        [
            LoadBraTSCased(label_map),
            NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
            ConcatItemsd(keys=["brain_mask", "label"], name="foreground", allow_missing_keys=True),
            CropForegroundd(
                keys=IMAGE_KEYS,
                source_key="foreground",
                **({} if crop_foreground else {"select_fn": _whole_volume}),
                margin=int(crop_margin),
                allow_smaller=True,
                start_coord_key="crop_start",
                end_coord_key="crop_end",
                allow_missing_keys=True,
            ),
            DeleteItemsd(keys="foreground"),
            CastToTyped(keys=["crop_start", "crop_end"], dtype=np.int64),
            EnsureTyped(keys=_ARRAY_KEYS, track_meta=False, allow_missing_keys=True),
        ]
    )


def resolve_augment(augment: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults merged with the user's ``augment`` dict; unknown keys are a ConfigError (typos)."""
    given = dict(augment or {})
    unknown = sorted(set(given) - set(DEFAULT_AUGMENT))
    if unknown:
        raise ConfigError(f"augment: unknown key(s) {unknown}; known: {sorted(DEFAULT_AUGMENT)}")
    return {**DEFAULT_AUGMENT, **given}


def _finalize() -> list[Transform]:
    return [
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        EnsureTyped(keys="label", dtype=torch.long, track_meta=False, allow_missing_keys=True),
    ]


def augment_transforms(aug: Mapping[str, Any]) -> list[Transform]:
    """The random augmentations of a training patch (``image``, ``label``), in order: spatial, flips,
    intensity; a transform whose probability is 0 is left out, so the default chain (and its seeds) is
    the same whether the optional keys exist or not."""
    if not aug["enabled"]:
        return []
    keys, modes = ["image", "label"], ["bilinear", "nearest"]
    out: list[Transform] = []
    if aug["affine_prob"] > 0:
        rot, scale = math.radians(float(aug["rotate_deg"])), float(aug["scale"])
        out.append(RandAffined(keys=keys, prob=float(aug["affine_prob"]), rotate_range=[rot] * 3,
                               scale_range=[scale] * 3, mode=modes, padding_mode="zeros"))  # fmt: skip
    if aug["elastic_prob"] > 0:
        out.append(Rand3DElasticd(keys=keys, prob=float(aug["elastic_prob"]), mode=modes, padding_mode="zeros",
                                  sigma_range=tuple(map(float, aug["elastic_sigma"])),
                                  magnitude_range=tuple(map(float, aug["elastic_magnitude"]))))  # fmt: skip
    if aug["flip_prob"] > 0:
        out += [
            RandFlipd(keys=keys, prob=float(aug["flip_prob"]), spatial_axis=int(ax))
            for ax in aug["flip_axes"]
        ]
    p = float(aug["intensity_prob"])
    if p > 0 and aug["scale_intensity"] > 0:
        out.append(
            RandScaleIntensityd(
                keys="image", factors=float(aug["scale_intensity"]), prob=p, channel_wise=True
            )
        )
    if p > 0 and aug["shift_intensity"] > 0:
        out.append(
            RandShiftIntensityd(
                keys="image", offsets=float(aug["shift_intensity"]), prob=p, channel_wise=True
            )
        )
    if aug["noise_prob"] > 0:
        out.append(
            RandGaussianNoised(keys="image", prob=float(aug["noise_prob"]), std=float(aug["noise_std"]))
        )
    if aug["contrast_prob"] > 0:
        out.append(RandAdjustContrastd(keys="image", prob=float(aug["contrast_prob"]),
                                       gamma=tuple(map(float, aug["contrast_gamma"])), retain_stats=True))  # fmt: skip
    return out


def build_train_transform(
    patch_size: Sequence[int],
    pos_neg_ratio: float = 1.0,
    samples_per_volume: int = 2,
    augment: Mapping[str, Any] | None = None,
) -> Compose:
    """Random chain for training on a decoded case; returns ``samples_per_volume`` patches.

    A patch is centred on tumour with probability ``r/(r+1)`` (``r = pos_neg_ratio``), else on a
    brain voxel outside the tumour. Volumes smaller than the patch are zero-padded (0 = background
    after z-scoring).
    """
    if pos_neg_ratio < 0:
        raise ConfigError(f"pos_neg_ratio must be >= 0, got {pos_neg_ratio}")
    patch = [int(p) for p in patch_size]
    if len(patch) != 3 or min(patch) < 1:
        raise ConfigError(f"patch_size must be 3 positive ints, got {list(patch_size)}")
    finite = bool(np.isfinite(pos_neg_ratio))
    chain: list[Transform] = [
        SpatialPadd(keys=IMAGE_KEYS, spatial_size=patch),
        RandCropByPosNegLabeld(
            keys=IMAGE_KEYS,
            label_key="label",
            spatial_size=patch,
            pos=float(pos_neg_ratio) if finite else 1.0,
            neg=1.0 if finite else 0.0,
            num_samples=int(samples_per_volume),
            image_key="brain_mask",  # negatives: label 0 *inside the brain*
            image_threshold=0,
        ),
        DeleteItemsd(keys="brain_mask"),
        *augment_transforms(resolve_augment(augment)),
    ]
    return Compose([*chain, *_finalize()])


def build_eval_transform() -> Compose:
    """Validation/test/predict chain: the whole (cropped) volume, typed for the model."""
    return Compose([DeleteItemsd(keys="brain_mask"), *_finalize()])


def inverse_label_map(label_map: Mapping[int, int]) -> dict[int, int]:
    """medens class -> raw code (the smallest raw code of a class): predictions in a dataset's own codes."""
    inv: dict[int, int] = {}
    for raw, cls in sorted(label_map.items()):
        inv.setdefault(int(cls), int(raw))
    return inv


def _meta(meta: Mapping[str, Any], key: str, index: int | None) -> np.ndarray:
    v = meta[key]
    v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    return v[index] if index is not None else v


def uncrop(
    pred: np.ndarray | torch.Tensor, crop_start: Sequence[int], original_shape: Sequence[int], fill: float = 0
) -> np.ndarray:
    """Place a prediction over the crop box back into a volume of the original shape (the crop's inverse).

    ``pred`` is [H,W,D] or [C,H,W,D] (leading dims kept); voxels outside the box get ``fill``.
    """
    arr = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    start = [int(s) for s in crop_start]
    full_shape = [int(s) for s in original_shape]
    size = arr.shape[-3:]
    if any(s < 0 or s + n > f for s, n, f in zip(start, size, full_shape, strict=True)):
        raise ValueError(
            f"prediction of shape {size} at {start} does not fit the original shape {full_shape}"
        )
    border = [b for s, n, f in zip(start, size, full_shape, strict=True) for b in (s, f - s - n)]
    lead = arr.shape[:-3]
    flat = arr.reshape(-1, *size)  # BorderPad pads the spatial dims of a channel-first array
    out = convert_to_numpy(BorderPad(spatial_border=border, mode="constant", value=fill)(flat))
    return out.astype(arr.dtype, copy=False).reshape(*lead, *full_shape)


def write_prediction_nifti(
    pred: np.ndarray | torch.Tensor,
    meta: Mapping[str, Any],
    path: str | Path,
    index: int | None = None,
    label_map: Mapping[int, int] | None = None,
) -> Path:
    """Write a predicted label map (medens classes, on the item's crop box) as NIfTI aligned with the input.

    ``meta`` is a dataset item or a collated batch (then give ``index``). With ``label_map`` (the raw
    code -> class map used to load), classes are written back in the dataset's own codes.
    """
    arr = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    arr = arr.astype(np.uint8)
    if label_map is not None:
        lut = np.zeros(256, dtype=np.uint8)
        for cls, raw in inverse_label_map(label_map).items():
            lut[cls] = raw
        arr = lut[arr]
    full = uncrop(arr, _meta(meta, "crop_start", index), _meta(meta, "original_shape", index))
    affine = _meta(meta, "affine", index).astype(np.float64)
    img = nib.Nifti1Image(full, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    data = img.to_bytes()  # in memory, then one atomic write (gzip level 1, nibabel's own default)
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(data, compresslevel=1) if str(path).endswith(".gz") else data)
    return Path(path)
