"""Request bytes -> model input tensors, by the checkpoint's `io_contract`, through medens' own data code.

Each function calls the pure functions that evaluation uses (`medens.data.xray`, `medens.data.ct`,
`medens.data.mri`), so a served prediction is computed from the same tensor as `scripts/evaluate.py`'s.
Every bad input raises `InputError` (HTTP 4xx) with a message naming the part and the problem.
"""

from __future__ import annotations

import gzip
import io
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medens.errors import DataError, MedensError


class InputError(MedensError, ValueError):
    """A request the server cannot use; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


NIFTI_MAGIC = (b"n+1\x00", b"ni1\x00", b"n+2\x00", b"ni2\x00")


# ------------------------------------------------------------------------------------------------- X-ray
def xray_tensor(data: bytes, contract: Mapping[str, Any], part: str = "body") -> torch.Tensor:
    """A PNG/JPEG (any size, greyscale, RGB, 16 bit) -> [C, H, W] exactly as the X-ray datamodule feeds it:
    `load_xray_image` (8-bit greyscale), the decoded-image cache's resize when the model was trained
    through it (`preprocessing.cache_resize`), then `build_transforms` (resize, scale, channels, normalise)."""
    from medens.data.xray import build_transforms, load_xray_image

    shape = [int(v) for v in contract.get("input_shape") or []]
    if len(shape) != 3:
        raise InputError(f"the X-ray model's io_contract has no input_shape [C, H, W] (got {shape})", 500)
    pre = contract.get("preprocessing") or {}
    try:
        cache_resize = pre.get("cache_resize")
        if cache_resize:
            from medens.data.xray_cache import decode_resized

            image: Any = torch.from_numpy(decode_resized(io.BytesIO(data), int(cache_resize[0])).copy())[None]
        else:
            image = load_xray_image(io.BytesIO(data))  # type: ignore[arg-type]
    except DataError as exc:
        detail = str(exc).split(": ", 1)[-1]
        raise InputError(f"{part}: not a decodable image (PNG or JPEG expected): {detail}") from exc
    tf = build_transforms(shape[1], shape[0], str(pre.get("normalize") or "imagenet"), None)
    return tf(image).float()


# ------------------------------------------------------------------------------------------------- NIfTI
def check_nifti(data: bytes, part: str) -> None:
    """Refuse bytes that are not a NIfTI-1/2 file (plain or gzipped) before any reader sees them."""
    if not data:
        raise InputError(f"{part}: empty file")
    head = data[:400]
    if data[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as fh:
                head = fh.read(400)
        except (OSError, EOFError) as exc:
            raise InputError(f"{part}: gzip data that cannot be decompressed ({exc})") from exc
    if len(head) < 348 or (head[344:348] not in NIFTI_MAGIC and head[4:8] not in NIFTI_MAGIC):
        raise InputError(f"{part}: not a NIfTI file (no NIfTI-1/2 header; send .nii or .nii.gz)")


def _write_nifti(data: bytes, folder: Path, stem: str) -> Path:
    path = folder / (f"{stem}.nii.gz" if data[:2] == b"\x1f\x8b" else f"{stem}.nii")
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------------- CT
def ct_tensor(
    data: bytes,
    contract: Mapping[str, Any],
    centre_mm: tuple[float, float, float] | None = None,
    diameter_mm: float | None = None,
    part: str = "ct",
) -> torch.Tensor:
    """A CT volume (NIfTI) -> the nodule patch [C, P, P, P], through `extract_record_patches` as the CT
    datamodule does: resampled to `spacing_mm`, HU-windowed, centred on `centre_mm` (world LPS mm) or, for
    a pre-cropped nodule volume, on the volume's centre."""
    from medens.data.ct import io as ct_io
    from medens.data.ct.cache import PatchConfig, extract_record_patches
    from medens.data.ct.labels import NoduleRecord
    from medens.data.ct.sources import ErrorPolicy

    check_nifti(data, part)
    try:
        cfg = PatchConfig(
            patch_size=int(np.ravel(contract["patch_size"])[0]),
            spacing_mm=float(np.ravel(contract["spacing_mm"])[0]),
            hu_window=tuple(float(v) for v in contract["hu_window"]),
            pad_hu=float(contract["pad_hu"]),
            channels=tuple(contract["channels"]),
        )
    except (KeyError, TypeError, IndexError) as exc:
        raise InputError(
            f"the CT model's io_contract lacks {exc} (patch_size, spacing_mm, hu_window ...)", 500
        ) from exc
    if "mask" in cfg.channels and not (diameter_mm and diameter_mm > 0):
        raise InputError(f"{part}: this CT model takes a nodule mask channel: give diameter_mm (> 0)")
    with tempfile.TemporaryDirectory(prefix="medens-serve-") as tmp:
        path = _write_nifti(data, Path(tmp), "scan")
        try:
            scan = ct_io.read_scan(path)
        except DataError as exc:
            raise InputError(f"{part}: {str(exc).split(': ', 1)[-1]}") from exc
        if scan.array.ndim != 3 or min(scan.shape) < 2:
            raise InputError(f"{part}: expected a 3-D volume, got shape {tuple(scan.array.shape)}")
        rec = NoduleRecord(
            case_id="request", patient_id="request", source_file=str(path),
            center_world=list(centre_mm) if centre_mm is not None else None,
            diameter_mm=float(diameter_mm) if diameter_mm else math.nan,
        )  # fmt: skip
        try:
            (_, patch), *_ = extract_record_patches(scan, [rec], cfg, ErrorPolicy("error"))
        except DataError as exc:
            raise InputError(f"{part}: {str(exc).split(': ', 1)[-1]}") from exc
    return torch.from_numpy(np.asarray(patch, dtype=np.float32))


def parse_centre(values: Mapping[str, Any], prefix: str = "") -> tuple[float, float, float] | None:
    """(x, y, z) world mm from `x`, `y`, `z` (or `ct_x`, ...) request fields; all three or none."""
    keys = [f"{prefix}{a}" for a in "xyz"]
    given = [values.get(k) for k in keys]
    if all(v in (None, "") for v in given):
        return None
    if any(v in (None, "") for v in given):
        raise InputError(f"give all of {', '.join(keys)} (nodule centre, world mm) or none")
    try:
        return tuple(float(v) for v in given)  # type: ignore[return-value]
    except ValueError as exc:
        raise InputError(f"{', '.join(keys)} must be numbers (world mm): {exc}") from exc


# ------------------------------------------------------------------------------------------------- MRI
def mri_case(files: Mapping[str, bytes], contract: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The modalities of one case (NIfTI bytes by modality name) -> ([C, H, W, D] z-scored, brain-cropped
    volume, the decode dict with the crop box and affine), through the MRI datamodule's decode chain."""
    from medens.data.mri.brats import canonical_modality
    from medens.data.mri.transforms import build_decode_transform, build_eval_transform

    channels = [str(c) for c in contract.get("channels") or []]
    if not channels:
        raise InputError("the MRI model's io_contract lists no channels", 500)
    given = {}
    for name, data in files.items():
        try:
            given[canonical_modality(name)] = (name, data)
        except Exception:
            given[name] = (name, data)
    missing = [c for c in channels if canonical_modality(c) not in given]
    if missing:
        raise InputError(
            f"MRI case is missing modality {', '.join(missing)}: this model needs {', '.join(channels)} "
            f"(got {', '.join(sorted(files)) or 'none'})"
        )
    label_map = {int(k): int(v) for k, v in (contract.get("label_map") or {}).items()}
    pre = contract.get("preprocessing") or {}
    with tempfile.TemporaryDirectory(prefix="medens-serve-") as tmp:
        paths = []
        for c in channels:
            name, data = given[canonical_modality(c)]
            check_nifti(data, name)
            paths.append(str(_write_nifti(data, Path(tmp), canonical_modality(c))))
        item = {"case_id": "request", "image_files": paths, "modalities": channels}
        try:
            decoded = build_decode_transform(
                label_map, bool(pre.get("crop_foreground", True)), int(pre.get("crop_margin", 0) or 0)
            )(item)
        except Exception as exc:  # DataError, or MONAI's wrapper around it
            cause = exc
            while cause.__cause__ is not None and not isinstance(cause, DataError):
                cause = cause.__cause__
            text = str(cause).replace(str(tmp) + "/", "")
            raise InputError(f"MRI case: {text.removeprefix('case request: ')}") from exc
    image = build_eval_transform()(decoded)["image"]
    return image.float(), decoded


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the spatial axes of [C, ...] (0 = background after z-scoring) up to a multiple of `multiple`."""
    if multiple <= 1:
        return x
    pads: list[int] = []
    for size in reversed(x.shape[1:]):
        pads += [0, (-size) % multiple]
    return torch.nn.functional.pad(x, pads)


def segmentation_nifti(labels: np.ndarray, decoded: Mapping[str, Any], contract: Mapping[str, Any]) -> bytes:
    """The predicted label map (medens classes on the crop box) as .nii.gz bytes aligned with the input,
    in the dataset's own label codes (`write_prediction_nifti`)."""
    from medens.data.mri.transforms import write_prediction_nifti

    label_map = {int(k): int(v) for k, v in (contract.get("label_map") or {}).items()} or None
    with tempfile.TemporaryDirectory(prefix="medens-serve-") as tmp:
        path = write_prediction_nifti(labels, decoded, Path(tmp) / "segmentation.nii.gz", label_map=label_map)
        return path.read_bytes()
