"""Synthetic BraTS-format cases with known, learnable tumour structure, written like the real release.

Each case is a skull-stripped "brain" (ellipsoid with smooth texture and dark/bright ventricles) with
one glioma: a necrotic core, an enhancing rim and surrounding oedema, with irregular borders. The
tumour parts differ per modality the way they do in real scans, so a model has to combine channels:

============  ======  =====  ========  =========  =======
tissue        T1      T1ce   T2        FLAIR      label
============  ======  =====  ========  =========  =======
brain         mid     mid    mid       mid        0
ventricles    dark    dark   bright    dark       0
necrosis      dark    dark   bright    mid        NCR
enhancing     mid     bright mid+      bright-    ET
oedema        mid-    mid-   bright    bright     ED
============  ======  =====  ========  =========  =======

Files follow BraTS 2021 naming (``BraTS2021_00000/BraTS2021_00000_t1ce.nii.gz``, labels 1/2/4) or,
with ``naming='2023'``, BraTS 2023 naming (``BraTS-GLI-00000-000-t1c.nii.gz``, labels 1/2/3).
Output is a deterministic function of the arguments.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from medens.errors import ConfigError
from medens.utils.atomic import replace_folder_atomically
from medens.utils.jsonio import read_json_or_none

MARKER_FILE = "medens_synthetic.json"
GENERATOR_VERSION = 1

# tissue order: brain, csf, necrosis, enhancing, oedema
_TISSUE_MEANS = {
    "t1": (700.0, 250.0, 300.0, 650.0, 560.0),
    "t1ce": (700.0, 250.0, 230.0, 1400.0, 600.0),
    "t2": (500.0, 1400.0, 1250.0, 800.0, 1050.0),
    "flair": (450.0, 150.0, 550.0, 850.0, 1150.0),
}
_FILE_SUFFIX = {
    "2021": {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"},
    "2023": {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg"},
}
_LABEL_CODES = {"2021": {"ncr": 1, "ed": 2, "et": 4}, "2023": {"ncr": 1, "ed": 2, "et": 3}}


def synthetic_params(
    n_cases: int = 12,
    shape: Sequence[int] = (96, 96, 64),
    seed: int = 0,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    naming: str = "2021",
) -> dict[str, Any]:
    """The normalised parameter record written beside generated data (used to detect stale data)."""
    shape = [int(s) for s in shape]
    if len(shape) != 3 or min(shape) < 16:
        raise ConfigError(f"synthetic shape must be 3 ints >= 16, got {shape}")
    if int(n_cases) < 1:
        raise ConfigError(f"synthetic n_cases must be >= 1, got {n_cases}")
    if str(naming) not in _FILE_SUFFIX:
        raise ConfigError(f"synthetic naming must be one of {sorted(_FILE_SUFFIX)}, got {naming!r}")
    return {
        "generator": "medens.data.mri.synthetic",
        "version": GENERATOR_VERSION,
        "n_cases": int(n_cases),
        "shape": shape,
        "seed": int(seed),
        "spacing": [float(s) for s in spacing],
        "naming": str(naming),
    }


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std low-frequency field."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-8)


def make_case(
    rng: np.random.Generator, shape: tuple[int, int, int], tumour_size: float | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One case: intensity volumes per modality and boolean tumour-part masks.

    ``tumour_size`` in [0, 1] (the multi-modal cohort's per-patient burden) sets the tumour core radius
    within the usual range instead of drawing it.
    """
    s = np.asarray(shape, dtype=np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    low = _smooth_noise(rng, shape, sigma=max(shape) / 10)

    # brain: irregular ellipsoid filling most of the field of view
    b_center = s / 2 + rng.uniform(-0.03, 0.03, 3) * s
    b_radii = s * rng.uniform(0.38, 0.44, 3)
    rb = np.sqrt((((grid - b_center[:, None, None, None]) / b_radii[:, None, None, None]) ** 2).sum(0))
    brain = rb * (1 + 0.04 * low) < 1.0

    # ventricles: two small ellipsoids near the centre
    csf = np.zeros(shape, bool)
    for side in (-1, 1):
        c = b_center + np.array([side * 0.09, 0.02, 0.0]) * s
        r = s * np.array([0.05, 0.14, 0.10]) * rng.uniform(0.8, 1.2)
        csf |= ((((grid - c[:, None, None, None]) / r[:, None, None, None]) ** 2).sum(0)) < 1.0

    # tumour: core radius r, enhancing rim, oedema out to `edema_factor * r`, borders perturbed
    if tumour_size is None:
        r = float(min(shape)) * rng.uniform(0.14, 0.2)
    else:  # a wider, graded range: the cohort's tumour burden
        r = float(min(shape)) * (0.10 + 0.12 * float(np.clip(tumour_size, 0.0, 1.0)))
    offset = rng.uniform(-1, 1, 3)
    offset = offset / max(np.linalg.norm(offset), 1e-6) * rng.uniform(0.15, 0.45)
    t_center = b_center + offset * b_radii
    t_radii = r * rng.uniform(0.8, 1.25, 3)
    rt = np.sqrt((((grid - t_center[:, None, None, None]) / t_radii[:, None, None, None]) ** 2).sum(0))
    rt = rt * (1 + 0.12 * _smooth_noise(rng, shape, sigma=max(2.0, r / 2)))
    necrosis_frac = rng.uniform(0.5, 0.72)
    edema_factor = rng.uniform(1.4, 1.9) if tumour_size is None else 1.55 + rng.uniform(-0.1, 0.1)
    necrosis = (rt < necrosis_frac) & brain
    enhancing = (rt >= necrosis_frac) & (rt < 1.0) & brain
    edema = (rt >= 1.0) & (rt < edema_factor * (1 + 0.15 * low)) & brain
    csf &= ~(necrosis | enhancing | edema)

    tissue = np.zeros(shape, np.int8)  # 0 brain, 1 csf, 2 necrosis, 3 enhancing, 4 oedema
    tissue[csf] = 1
    tissue[edema] = 4
    tissue[enhancing] = 3
    tissue[necrosis] = 2
    texture = _smooth_noise(rng, shape, sigma=2.0)
    bias = 1 + 0.1 * _smooth_noise(rng, shape, sigma=max(shape) / 3)
    images = {}
    for mod, means in _TISSUE_MEANS.items():
        base = np.asarray(means, np.float32)[tissue]
        scale = rng.uniform(0.9, 1.1)  # scanner gain differs per case
        img = ndimage.gaussian_filter(base, sigma=0.7) * (1 + 0.06 * texture) * bias * scale
        img = img + rng.normal(0, 0.03 * means[0], shape).astype(np.float32)
        img = np.where(brain, np.clip(img, 1, None), 0)
        images[mod] = np.rint(img).astype(np.int16)
    return images, {"ncr": necrosis, "et": enhancing, "ed": edema}


def write_case(
    folder: Path,
    case_id: str,
    images: dict[str, np.ndarray],
    parts: dict[str, np.ndarray],
    naming: str,
    affine: np.ndarray,
) -> None:
    folder.mkdir(parents=True)
    suffix, codes = _FILE_SUFFIX[naming], _LABEL_CODES[naming]
    for mod, arr in images.items():
        img = nib.Nifti1Image(arr, affine)
        img.set_qform(affine, code=1)
        nib.save(img, str(folder / f"{case_id}{suffix[mod]}.nii.gz"))
    seg = np.zeros(next(iter(images.values())).shape, np.uint8)
    for part in ("ed", "et", "ncr"):
        seg[parts[part]] = codes[part]
    img = nib.Nifti1Image(seg, affine)
    img.set_qform(affine, code=1)
    nib.save(img, str(folder / f"{case_id}{suffix['seg']}.nii.gz"))


def brats_affine(spacing: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """BraTS-like orientation (LPS voxel axes, as the real release)."""
    sx, sy, sz = (float(v) for v in spacing)
    return np.array(
        [[-sx, 0, 0, 0], [0, -sy, 0, (shape[1] - 1) * sy], [0, 0, sz, 0], [0, 0, 0, 1]], dtype=np.float64
    )


def read_marker(out_dir: str | Path) -> dict[str, Any] | None:
    """Parameters recorded beside a generated set, or None when ``out_dir`` was not generated here."""
    return read_json_or_none(Path(out_dir) / MARKER_FILE)


def generate_brats_synthetic(
    out_dir: str | Path,
    n_cases: int = 12,
    shape: Sequence[int] = (96, 96, 64),
    seed: int = 0,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    naming: str = "2021",
    overwrite: bool = False,
) -> Path:
    """Write ``n_cases`` synthetic BraTS cases under ``out_dir`` and return it.

    The set is built in a temporary sibling folder and renamed into place, so a reader never sees
    a half-written set. An existing ``out_dir`` is replaced only with ``overwrite=True`` and only if
    it is empty or was written by this generator (its marker file is present): real data is never
    deleted.
    """
    params = synthetic_params(n_cases, shape, seed, spacing, naming)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if read_marker(out) is None:
            raise ConfigError(
                f"{out} exists and holds data not written by the synthetic generator; "
                f"refusing to overwrite it"
            )
        if not overwrite:
            raise ConfigError(f"{out} already holds a synthetic set; pass overwrite=True to replace it")
    shp = tuple(params["shape"])
    affine = brats_affine(params["spacing"], shp)

    def build(tmp: Path) -> None:
        for i in range(params["n_cases"]):
            rng = np.random.default_rng([params["seed"], i])
            case_id = f"BraTS2021_{i:05d}" if naming == "2021" else f"BraTS-GLI-{i:05d}-000"
            images, parts = make_case(rng, shp)  # type: ignore[arg-type]
            write_case(tmp / case_id, case_id, images, parts, params["naming"], affine)
        (tmp / MARKER_FILE).write_text(json.dumps(params, indent=2, sort_keys=True))

    replace_folder_atomically(out, build)
    return out


def ensure_synthetic(out_dir: str | Path, **params: Any) -> bool:
    """Generate the set when ``out_dir`` is missing/empty, or regenerate when its recorded params differ.

    Returns True when data was written. A folder holding other (real) data is left alone.
    """
    from medens.utils.locking import owned_lock

    wanted = synthetic_params(**params)
    out = Path(out_dir)
    if read_marker(out) == wanted:
        return False
    with owned_lock(out.parent / f".{out.name}.lock", "synthetic BraTS generation"):
        marker = read_marker(out)  # again under the lock: another process may have just written it
        if marker == wanted:
            return False
        if out.exists() and any(out.iterdir()) and marker is None:
            return False  # real data (or foreign files): never touched
        generate_brats_synthetic(out, overwrite=True, **params)
    return True
