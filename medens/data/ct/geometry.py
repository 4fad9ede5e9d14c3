"""World/voxel geometry, resampling, nodule-centred patches and the HU window.

Patches are sampled straight from the scan on a world-aligned grid (axes = LPS x, y, z) at the
requested isotropic spacing, so resampling and cropping are one interpolation (kept home-made: MONAI's
``Spacingd`` + ``SpatialCropd`` would resample the whole scan and interpolate twice), the nodule centre
lands exactly on voxel ``P // 2`` of every axis, and whatever falls outside the scan is air
(``pad_value``), never wrapped from the other side nor cropped short.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from medens.data.ct.io import Scan

AIR_HU = -1000.0


def _index_matrix(spacing: Sequence[float], direction: np.ndarray) -> np.ndarray:
    return np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(
        np.asarray(spacing, dtype=np.float64)
    )


def world_to_voxel(
    world: Sequence[float] | np.ndarray,
    origin: Sequence[float],
    spacing: Sequence[float],
    direction: np.ndarray | Sequence[float],
) -> np.ndarray:
    """Continuous voxel index (i, j, k) of world points (..., 3): ``inv(D @ diag(s)) @ (w - o)``."""
    world = np.asarray(world, dtype=np.float64)
    m = _index_matrix(spacing, np.asarray(direction, dtype=np.float64).reshape(3, 3))
    rel = world - np.asarray(origin, dtype=np.float64)
    return np.linalg.solve(m, rel.reshape(-1, 3).T).T.reshape(world.shape)


def voxel_to_world(
    index: Sequence[float] | np.ndarray,
    origin: Sequence[float],
    spacing: Sequence[float],
    direction: np.ndarray | Sequence[float],
) -> np.ndarray:
    """World point(s) (..., 3) of continuous voxel indices: ``o + D @ diag(s) @ idx``."""
    index = np.asarray(index, dtype=np.float64)
    m = _index_matrix(spacing, np.asarray(direction, dtype=np.float64).reshape(3, 3))
    return (m @ index.reshape(-1, 3).T).T.reshape(index.shape) + np.asarray(origin, dtype=np.float64)


def inside_volume(index: Sequence[float] | np.ndarray, shape: Sequence[int]) -> bool:
    """Whether a continuous index falls within the volume (voxel centres 0..n-1, half a voxel margin)."""
    idx = np.asarray(index, dtype=np.float64)
    return bool(np.all(idx >= -0.5) and np.all(idx <= np.asarray(shape, dtype=np.float64) - 0.5))


def hu_window(hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip HU to [low, high] and scale linearly to [0, 1] (float32): MONAI's ``ScaleIntensityRange``."""
    if not high > low:
        raise ValueError(f"HU window needs low < high, got [{low}, {high}]")
    from monai.transforms import ScaleIntensityRange

    window = ScaleIntensityRange(a_min=float(low), a_max=float(high), b_min=0.0, b_max=1.0, clip=True)
    return np.asarray(window(np.asarray(hu, dtype=np.float32)), dtype=np.float32)


def sample_patch(
    scan: Scan,
    center_world: Sequence[float],
    patch_size: int = 64,
    spacing_mm: float = 1.0,
    pad_value: float = AIR_HU,
    order: int = 1,
    array: np.ndarray | None = None,
) -> np.ndarray:
    """Resample a P^3 patch (world-aligned, isotropic ``spacing_mm``) centred on a world point.

    Samples beyond the scan's outer voxel faces take ``pad_value`` (air by default). ``array`` replaces ``scan.array``
    (e.g. a mask on the same grid) while keeping the scan's geometry.
    """
    data = np.asarray(scan.array if array is None else array, dtype=np.float32)
    # output index o -> world c + (o - P//2) * s -> voxel index A @ o + b (one affine map)
    inv = np.linalg.inv(_index_matrix(scan.spacing, scan.direction))
    matrix = inv * float(spacing_mm)
    start = np.asarray(center_world, dtype=np.float64) - (patch_size // 2) * float(spacing_mm)
    offset = inv @ (start - np.asarray(scan.origin, dtype=np.float64))
    # Each voxel covers +-half a voxel around its centre: within that the edge value holds
    # (a 2.5 mm slice is 2.5 mm thick), beyond it is padding.
    out = ndimage.affine_transform(
        data,
        matrix,
        offset=offset,
        output_shape=(patch_size,) * 3,
        order=order,
        mode="nearest",
        prefilter=False,
        output=np.float32,
    )
    ar = np.arange(patch_size, dtype=np.float64)
    outside = np.zeros((patch_size,) * 3, dtype=bool)
    for d in range(3):
        idx_d = (
            (matrix[d, 0] * ar)[:, None, None]
            + (matrix[d, 1] * ar)[None, :, None]
            + (matrix[d, 2] * ar)[None, None, :]
        ) + offset[d]
        outside |= (idx_d < -0.5) | (idx_d > data.shape[d] - 0.5)
    out[outside] = pad_value
    return out


def sphere_mask(patch_size: int, spacing_mm: float, diameter_mm: float) -> np.ndarray:
    """Binary ball of the given diameter centred on voxel P//2: a nodule mask where none is drawn."""
    offsets = (np.arange(patch_size, dtype=np.float64) - patch_size // 2) * float(spacing_mm)
    gx, gy, gz = np.meshgrid(offsets, offsets, offsets, indexing="ij")
    return ((gx**2 + gy**2 + gz**2) <= (diameter_mm / 2.0) ** 2).astype(np.float32)


def resample_scan(scan: Scan, spacing_mm: float | Sequence[float] = 1.0, order: int = 1) -> Scan:
    """Resample a whole scan to a new spacing along its own axes (origin and direction kept).

    The new grid spans voxel centre 0 to the last voxel centre of the old one, so nothing is
    extrapolated; used for small crops and for checks, patches use :func:`sample_patch`.
    """
    new_sp = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,)).copy()
    if np.any(new_sp <= 0):
        raise ValueError(f"spacing must be positive, got {new_sp.tolist()}")
    old_sp = scan.spacing
    extent = (np.asarray(scan.shape) - 1) * old_sp
    new_shape = tuple(int(n) for n in np.floor(extent / new_sp + 1e-6).astype(int) + 1)
    ratio = new_sp / old_sp
    out = ndimage.affine_transform(
        scan.array.astype(np.float32, copy=False),
        ratio,
        output_shape=new_shape,
        order=order,
        mode="nearest",
        prefilter=False,
        output=np.float32,
    )
    return Scan(
        array=out,
        origin=scan.origin.copy(),
        spacing=new_sp,
        direction=scan.direction.copy(),
        path=scan.path,
        series_uid=scan.series_uid,
        meta=dict(scan.meta),
    )
