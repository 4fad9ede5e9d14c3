"""MONAI transform chains for BraTS cases, split into a cacheable decode stage and per-phase stages.

``decode`` (deterministic, cached in memory or on disk): read every NIfTI of a case, validate it,
map labels to medens classes, z-score each channel over brain voxels and crop to the brain.
``train`` (random, never cached): pad to the patch size, sample patches around tumour / brain
background, flip and jitter intensities. ``eval`` (validation/test/predict): whole cropped volume.

Items keep what is needed to write a prediction back as NIfTI on the input scan's grid:
``affine`` (4x4 voxel->world of the original file), ``original_shape``, ``crop_start``/``crop_end``
(voxel box of the item inside the original volume), ``spacing`` (mm) and ``reference_file``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import (
    Compose,
    DeleteItemsd,
    EnsureTyped,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
    Transform,
)

from medens.errors import ConfigError, DataError

from .brats import map_labels

DEFAULT_AUGMENT: dict[str, Any] = {
    "enabled": True,
    "flip_prob": 0.5,  # per axis
    "flip_axes": [0, 1, 2],
    "intensity_prob": 1.0,
    "scale_intensity": 0.1,  # image * (1 + U(-s, s)), per channel
    "shift_intensity": 0.1,  # image + U(-o, o), per channel (in z-score units)
    "noise_prob": 0.0,
    "noise_std": 0.1,
}


def _read(path: str, case_id: str, role: str, label: bool = False) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Decode one NIfTI file fully; any failure (truncated gzip, bad header) names case and file."""
    try:
        img = nib.load(path)
        arr = np.asarray(img.dataobj) if label else img.get_fdata(dtype=np.float32)
    except Exception as e:  # EOFError, zlib.error, OSError, ValueError... depending on where it breaks
        raise DataError(
            f"case {case_id}: cannot decode {role} file {path}: {type(e).__name__}: {e} "
            f"(truncated or corrupt NIfTI?)"
        ) from e
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise DataError(f"case {case_id}: {role} file {path}: expected a 3-D volume, got shape {arr.shape}")
    if not label and not np.all(np.isfinite(arr)):
        raise DataError(f"case {case_id}: {role} file {path}: contains NaN or infinite voxels")
    return arr, img


class LoadBraTSCased(Transform):
    """Read one case (dict of file paths) into ``image`` [C,H,W,D] float32, ``label`` and ``brain_mask``.

    Validates what headers cannot show: decodable voxel data, one shape and affine for all files,
    label codes inside ``label_map``. The brain is the mask file when the layout has one (DeepMedic
    BraTS 2015 has a constant non-zero background), else voxels non-zero in any channel.
    """

    def __init__(self, label_map: Mapping[int, int]) -> None:
        self.label_map = dict(label_map)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[str, Any]:
        case_id = str(data["case_id"])
        files = [str(p) for p in data["image_files"]]
        modalities = list(data.get("modalities") or [f"channel {i}" for i in range(len(files))])
        first, ref_img = _read(files[0], case_id, f"modality '{modalities[0]}'")
        ref_shape, ref_affine, ref_path = first.shape, np.asarray(ref_img.affine, np.float64), files[0]
        channels = [first]
        for mod, path in zip(modalities[1:], files[1:], strict=True):
            arr, img = _read(path, case_id, f"modality '{mod}'")
            self._same_grid(case_id, path, arr.shape, img, ref_shape, ref_affine, ref_path)
            channels.append(arr)
        out: dict[str, Any] = {
            "case_id": case_id,
            "image": np.stack(channels, axis=0),
            "affine": ref_affine,
            "spacing": np.asarray(ref_img.header.get_zooms()[:3], dtype=np.float64),
            "original_shape": np.asarray(ref_shape, dtype=np.int64),
            "reference_file": ref_path,
        }
        label_file = data.get("label_file")
        if label_file:
            raw, img = _read(str(label_file), case_id, "label", label=True)
            self._same_grid(case_id, str(label_file), raw.shape, img, ref_shape, ref_affine, ref_path)
            out["label"] = map_labels(raw, self.label_map, case_id, label_file)[None]
        mask_file = data.get("mask_file")
        if mask_file:
            m, img = _read(str(mask_file), case_id, "brain mask")
            self._same_grid(case_id, str(mask_file), m.shape, img, ref_shape, ref_affine, ref_path)
            brain = m > 0.5
        else:
            brain = np.any(out["image"] != 0, axis=0)
        if not brain.any():
            raise DataError(
                f"case {case_id}: empty brain: every voxel of {files} is zero (or the mask is empty)"
            )
        out["brain_mask"] = brain[None].astype(np.uint8)
        return out

    @staticmethod
    def _same_grid(
        case_id: str,
        path: str,
        shape: tuple[int, ...],
        img: nib.Nifti1Image,
        ref_shape: tuple[int, ...],
        ref_affine: np.ndarray,
        ref_path: str,
    ) -> None:
        if tuple(shape) != tuple(ref_shape):
            raise DataError(
                f"case {case_id}: file {path} has shape {tuple(shape)}, but {ref_path} has {tuple(ref_shape)}"
            )
        a = np.asarray(img.affine, np.float64)
        if not np.allclose(a, ref_affine, atol=1e-3):
            raise DataError(
                f"case {case_id}: file {path} has a different affine than {ref_path} "
                f"(max difference {np.abs(a - ref_affine).max():.4g})"
            )


class ZScoreBraind(Transform):
    """Per-channel z-score over brain voxels; background set to 0 so padding and background agree."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[str, Any]:
        d = dict(data)
        img = np.asarray(d["image"], dtype=np.float32)
        brain = np.asarray(d["brain_mask"])[0].astype(bool)
        out = np.zeros_like(img)
        for c in range(img.shape[0]):
            vals = img[c][brain].astype(np.float64)
            mean = vals.mean()
            std = vals.std()
            out[c][brain] = ((vals - mean) / (std if std > 1e-8 else 1.0)).astype(np.float32)
        d["image"] = out
        return d


class CropBraind(Transform):
    """Crop image/label/mask to the box of brain or tumour (+ margin); records ``crop_start``/``crop_end``.

    With ``enabled=False`` the box is the whole volume, so writing back is the same code path.
    """

    def __init__(self, enabled: bool = True, margin: int = 0) -> None:
        self.enabled = enabled
        self.margin = int(margin)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[str, Any]:
        d = dict(data)
        shape = np.asarray(d["image"].shape[1:], dtype=np.int64)
        if not self.enabled:
            d["crop_start"], d["crop_end"] = np.zeros(3, np.int64), shape.copy()
            return d
        fg = np.asarray(d["brain_mask"])[0] > 0
        if "label" in d:
            fg = fg | (np.asarray(d["label"])[0] > 0)
        start, end = [], []
        for ax in range(3):
            other = tuple(a for a in range(3) if a != ax)
            idx = np.flatnonzero(fg.any(axis=other))
            start.append(max(int(idx[0]) - self.margin, 0))
            end.append(min(int(idx[-1]) + 1 + self.margin, int(shape[ax])))
        sl = (slice(None), *(slice(s, e) for s, e in zip(start, end, strict=True)))
        for key in ("image", "label", "brain_mask"):
            if key in d:
                d[key] = np.ascontiguousarray(d[key][sl])
        d["crop_start"], d["crop_end"] = np.asarray(start, np.int64), np.asarray(end, np.int64)
        return d


class ToTorchd(Transform):
    """numpy -> torch for every array entry (compact dtypes kept: label/mask stay uint8 in the cache)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[str, Any]:
        return {
            k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
            for k, v in data.items()
        }


def build_decode_transform(
    label_map: Mapping[int, int], crop_foreground: bool = True, crop_margin: int = 0
) -> Compose:
    """Deterministic chain whose output is cached: load+validate, z-score over brain, crop."""
    return Compose(
        [LoadBraTSCased(label_map), ZScoreBraind(), CropBraind(crop_foreground, crop_margin), ToTorchd()]
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
    aug = resolve_augment(augment)
    keys = ["image", "label", "brain_mask"]
    chain: list[Transform] = [
        SpatialPadd(keys=keys, spatial_size=patch),
        RandCropByPosNegLabeld(
            keys=keys,
            label_key="label",
            spatial_size=patch,
            pos=float(pos_neg_ratio) if np.isfinite(pos_neg_ratio) else 1.0,
            neg=1.0 if np.isfinite(pos_neg_ratio) else 0.0,
            num_samples=int(samples_per_volume),
            image_key="brain_mask",  # negatives: label 0 *inside the brain*
            image_threshold=0,
        ),
        DeleteItemsd(keys="brain_mask"),
    ]
    if aug["enabled"]:
        for ax in aug["flip_axes"]:
            if aug["flip_prob"] > 0:
                chain.append(
                    RandFlipd(keys=["image", "label"], prob=float(aug["flip_prob"]), spatial_axis=int(ax))
                )
        if aug["intensity_prob"] > 0 and aug["scale_intensity"] > 0:
            chain.append(
                RandScaleIntensityd(
                    keys="image",
                    factors=float(aug["scale_intensity"]),
                    prob=float(aug["intensity_prob"]),
                    channel_wise=True,
                )
            )
        if aug["intensity_prob"] > 0 and aug["shift_intensity"] > 0:
            chain.append(
                RandShiftIntensityd(
                    keys="image",
                    offsets=float(aug["shift_intensity"]),
                    prob=float(aug["intensity_prob"]),
                    channel_wise=True,
                )
            )
        if aug["noise_prob"] > 0:
            chain.append(
                RandGaussianNoised(keys="image", prob=float(aug["noise_prob"]), std=float(aug["noise_std"]))
            )
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
    """Place a prediction over the crop box back into a volume of the original shape.

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
    out = np.full((*arr.shape[:-3], *full_shape), fill, dtype=arr.dtype)
    out[(..., *(slice(s, s + n) for s, n in zip(start, size, strict=True)))] = arr
    return out


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path
