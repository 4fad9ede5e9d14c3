"""A small synthetic LUNA16-format CT set with learnable, known nodule structure.

Each patient gets one chest-like scan (`.mhd`/`.raw`, int16 HU, anisotropic spacing): air around a
soft-tissue body, two lungs with parenchymal texture and vessels, and a few nodules. Malignancy is
carried by margin and texture, not size: malignant nodules are lobulated and spiculated with a
heterogeneous interior (sometimes a low-density core or a ground-glass halo); benign ones are
smooth and homogeneous (sometimes centrally calcified). Diameters overlap (benign 5-16 mm,
malignant 6-18 mm), so a diameter-only baseline stays well below a model that sees shape.
Malignancy is written LIDC-style (1-2 benign, 4-5 malignant, 3 indeterminate with mixed features).

Output: ``subset0/<seriesuid>.mhd|.raw``, ``annotations.csv`` (LUNA16 columns), ``labels.csv``
(``seriesuid, patient_id, nodule_id, coordX, coordY, coordZ, diameter_mm, malignancy, margin,
texture``) and ``generator_params.json`` (written last; it marks a complete set and lets the
datamodule regenerate when the requested parameters differ). Deterministic given the parameters.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medens.errors import DataError
from medens.utils.atomic import replace_folder_atomically
from medens.utils.jsonio import read_json_or_none

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
PARAMS_FILE = "generator_params.json"
UID_ROOT = "1.2.826.0.1.3680043.8.498"  # pydicom's root for generated UIDs


def synthetic_params(
    n_patients: int = 12,
    nodules_per_patient: int = 5,
    seed: int = 0,
    scan_shape: Sequence[int] = (112, 112, 96),
    spacing_mm: Sequence[float] = (0.8, 0.8, 1.25),
    malignant_fraction: float = 0.5,
    indeterminate_fraction: float = 0.1,
    noise_hu: float = 20.0,
) -> dict[str, Any]:
    """The normalised, JSON-able parameter set (what is recorded beside the data and compared)."""
    if n_patients < 1 or nodules_per_patient < 1:
        raise ValueError("n_patients and nodules_per_patient must be >= 1")
    shape = [int(s) for s in scan_shape]
    spacing = [float(s) for s in spacing_mm]
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 32 or min(spacing) <= 0:
        raise ValueError(
            f"scan_shape needs 3 sizes >= 32 and spacing 3 positive values, got {shape}, {spacing}"
        )
    if not (0 <= malignant_fraction <= 1 and 0 <= indeterminate_fraction < 1):
        raise ValueError("malignant_fraction must be in [0, 1] and indeterminate_fraction in [0, 1)")
    return {
        "generator_version": GENERATOR_VERSION,
        "n_patients": int(n_patients),
        "nodules_per_patient": int(nodules_per_patient),
        "seed": int(seed),
        "scan_shape": shape,
        "spacing_mm": spacing,
        "malignant_fraction": float(malignant_fraction),
        "indeterminate_fraction": float(indeterminate_fraction),
        "noise_hu": float(noise_hu),
    }


def _unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _render_vessel(
    vol: np.ndarray,
    grids: tuple[np.ndarray, ...],
    spacing: np.ndarray,
    p0: np.ndarray,
    p1: np.ndarray,
    radius: float,
) -> None:
    """Burn a soft-edged cylinder (a vessel, 40 HU) between two points (mm, volume frame)."""
    lo = np.maximum(np.floor((np.minimum(p0, p1) - radius - 2) / spacing).astype(int), 0)
    hi = np.minimum(np.ceil((np.maximum(p0, p1) + radius + 2) / spacing).astype(int) + 1, vol.shape)
    if np.any(hi <= lo):
        return
    x, y, z = (g[lo[a] : hi[a]] for a, g in enumerate(grids))
    px, py, pz = np.meshgrid(x, y, z, indexing="ij")
    pts = np.stack([px, py, pz], -1)
    d = p1 - p0
    t = np.clip(((pts - p0) @ d) / max(float(d @ d), 1e-9), 0, 1)
    dist = np.linalg.norm(pts - (p0 + t[..., None] * d), axis=-1)
    occ = np.clip(radius - dist + 0.5, 0, 1)
    box = vol[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    box[...] = box * (1 - occ) + 40.0 * occ


def _render_nodule(
    vol: np.ndarray,
    grids: tuple[np.ndarray, ...],
    spacing: np.ndarray,
    centre: np.ndarray,
    diameter: float,
    malignant: bool,
    rng: np.random.Generator,
) -> tuple[str, str]:
    """Burn one nodule into ``vol``; returns (margin, texture) descriptions."""
    r0 = diameter / 2.0
    reach = 2.4 * r0 + 4.0
    lo = np.maximum(np.floor((centre - reach) / spacing).astype(int), 0)
    hi = np.minimum(np.ceil((centre + reach) / spacing).astype(int) + 1, vol.shape)
    x, y, z = (g[lo[a] : hi[a]] - centre[a] for a, g in enumerate(grids))
    dx, dy, dz = np.meshgrid(x, y, z, indexing="ij")
    r = np.sqrt(dx**2 + dy**2 + dz**2)
    u = np.stack([dx, dy, dz], -1) / np.maximum(r, 1e-6)[..., None]
    radius = np.full(r.shape, r0)
    if malignant:
        for v in _unit_vectors(rng, int(rng.integers(4, 7))):  # lobulation
            radius += r0 * rng.uniform(0.12, 0.3) * np.exp(rng.uniform(3, 8) * (u @ v - 1))
        for s in _unit_vectors(rng, int(rng.integers(7, 14))):  # spicules
            radius += r0 * rng.uniform(0.5, 1.3) * np.exp(rng.uniform(40, 120) * (u @ s - 1))
        margin = "spiculated"
    else:
        axes = rng.uniform(0.88, 1.12, size=3)  # mildly ellipsoidal, smooth
        radius = r0 / np.sqrt(((u / axes) ** 2).sum(-1))
        for v in _unit_vectors(rng, 3):
            radius += r0 * rng.uniform(-0.05, 0.05) * np.exp(3 * (u @ v - 1))
        margin = "smooth"
    occ = np.clip(radius - r + 0.5, 0, 1)  # ~1 mm partial-volume edge
    if malignant:
        field = ndimage.gaussian_filter(rng.normal(size=r.shape), sigma=1.2)
        field /= field.std() + 1e-6
        hu = rng.uniform(0, 40) + field * rng.uniform(70, 120)
        texture = "heterogeneous"
        if rng.random() < 0.5:
            hu = np.where(r < 0.35 * r0, hu - rng.uniform(120, 250), hu)
            texture += "+necrotic core"
        if rng.random() < 0.4:
            halo = np.clip(radius + rng.uniform(1.5, 3.0) - r + 0.5, 0, 1) - occ
            box = vol[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
            box[...] = box * (1 - halo) - 450.0 * halo
            texture += "+ground-glass halo"
    else:
        hu = rng.uniform(25, 60) + rng.normal(0, 6, size=r.shape)
        texture = "homogeneous"
        if rng.random() < 0.3:
            hu = np.where(r < 0.4 * r0, hu + rng.uniform(300, 600), hu)
            texture += "+central calcification"
    box = vol[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    box[...] = box * (1 - occ) + hu * occ
    return margin, texture


def make_scan(
    p: dict[str, Any], rng: np.random.Generator, malignant_prob: float | None = None
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """One scan (HU, indexed [i, j, k]), its origin, and its nodules (centres in world mm).

    ``malignant_prob`` (the multi-modal cohort's per-patient risk) replaces the set-wide fractions:
    every nodule of the scan is then malignant with that probability and none is indeterminate.
    """
    shape = np.asarray(p["scan_shape"])
    spacing = np.asarray(p["spacing_mm"])
    extent = (shape - 1) * spacing
    grids = tuple(np.arange(n) * s for n, s in zip(shape, spacing, strict=True))  # mm from voxel 0
    c = extent / 2
    gx, gy, gz = np.meshgrid(*[g - ci for g, ci in zip(grids, c, strict=True)], indexing="ij", sparse=True)
    body = (gx / (0.47 * extent[0])) ** 2 + (gy / (0.42 * extent[1])) ** 2 <= 1
    vol = np.where(body, 40.0, -1000.0) + 0 * gz
    lungs = []
    for side in (-1, 1):
        lc = np.array([side * 0.22 * extent[0], 0.0, 0.0])
        lr = np.array([0.19 * extent[0], 0.34 * extent[1], 0.46 * extent[2]])
        lungs.append((lc, lr))
        inside = ((gx - lc[0]) / lr[0]) ** 2 + ((gy - lc[1]) / lr[1]) ** 2 + ((gz - lc[2]) / lr[2]) ** 2 <= 1
        vol = np.where(inside, -850.0, vol)
    lung_mask = vol == -850.0
    texture = ndimage.gaussian_filter(rng.normal(size=vol.shape).astype(np.float32), sigma=1.5)
    vol = np.where(lung_mask, vol + 120.0 * texture, vol).astype(np.float32)
    for lc, lr in lungs:
        for _ in range(8):
            a = lc + lr * 0.8 * _unit_vectors(rng, 1)[0] * rng.uniform(0, 1) + c
            b = a + _unit_vectors(rng, 1)[0] * rng.uniform(20, 45)
            _render_vessel(vol, grids, spacing, a, b, rng.uniform(0.6, 1.4))

    origin = np.round(np.array([-c[0], -c[1], -extent[2] - 60.0]) + rng.uniform(-20, 20, size=3), 3)
    nodules: list[dict[str, Any]] = []
    for n in range(p["nodules_per_patient"]):
        u = rng.random()
        indeterminate = u < p["indeterminate_fraction"] and malignant_prob is None
        frac = p["malignant_fraction"] if malignant_prob is None else malignant_prob
        malignant = bool(rng.random() < frac) if not indeterminate else bool(rng.random() < 0.5)
        diameter = float(rng.uniform(6, 18) if malignant else rng.uniform(5, 16))
        score = 3 if indeterminate else int(rng.choice([4, 5]) if malignant else rng.choice([1, 2]))
        for _ in range(200):
            lc, lr = lungs[int(rng.integers(0, 2))]
            centre = lc + lr * 0.7 * _unit_vectors(rng, 1)[0] * rng.uniform(0, 1) ** (1 / 3) + c
            if all(
                np.linalg.norm(centre - q["centre"]) > (diameter + q["diameter"]) / 2 + 8 for q in nodules
            ):
                break
        else:
            log.warning("synthetic CT: no room for nodule %d, stopping at %d nodules", n, len(nodules))
            break
        margin, tex = _render_nodule(vol, grids, spacing, centre, diameter, malignant, rng)
        nodules.append(
            {"centre": centre, "diameter": diameter, "malignancy": score, "margin": margin, "texture": tex}
        )
    vol += rng.normal(0, p["noise_hu"], size=vol.shape).astype(np.float32)
    hu = np.clip(np.round(vol), -1024, 3071).astype(np.int16)
    for q in nodules:
        q["world"] = origin + q["centre"]  # identity direction
    return hu, origin, nodules


def write_metaimage(hu: np.ndarray, origin: np.ndarray, spacing: Sequence[float], path: Path) -> None:
    """An int16 HU volume indexed [i, j, k] as an uncompressed `.mhd`/`.raw` pair, identity direction."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(hu.transpose(2, 1, 0))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path), useCompression=False)


def nodule_rows(
    uid: str, patient: str, nodules: Sequence[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """LUNA16 `annotations.csv` rows and medens `labels.csv` rows for one scan's nodules."""
    ann_rows, lab_rows = [], []
    for n, q in enumerate(nodules):
        x, y, z = (round(float(v), 4) for v in q["world"])
        d = round(q["diameter"], 3)
        ann_rows.append({"seriesuid": uid, "coordX": x, "coordY": y, "coordZ": z, "diameter_mm": d})
        lab_rows.append(
            {
                "seriesuid": uid,
                "patient_id": patient,
                "nodule_id": n + 1,
                "coordX": x,
                "coordY": y,
                "coordZ": z,
                "diameter_mm": d,
                "malignancy": q["malignancy"],
                "margin": q["margin"],
                "texture": q["texture"],
            }
        )
    return ann_rows, lab_rows


def write_luna16_tables(out: Path, ann_rows: list[dict[str, Any]], lab_rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    pd.DataFrame(ann_rows, columns=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]).to_csv(
        out / "annotations.csv", index=False
    )
    pd.DataFrame(lab_rows).to_csv(out / "labels.csv", index=False)


def _write_set(out: Path, p: dict[str, Any]) -> None:
    scans_dir = out / "subset0"
    scans_dir.mkdir(parents=True)
    ann_rows, lab_rows = [], []
    children = np.random.SeedSequence(p["seed"]).spawn(p["n_patients"])
    for i, child in enumerate(children):
        rng = np.random.default_rng(child)
        hu, origin, nodules = make_scan(p, rng)
        uid = f"{UID_ROOT}.{p['seed']}.{i + 1}"
        write_metaimage(hu, origin, p["spacing_mm"], scans_dir / f"{uid}.mhd")
        a, lab = nodule_rows(uid, f"SYN-{i + 1:04d}", nodules)
        ann_rows += a
        lab_rows += lab
    write_luna16_tables(out, ann_rows, lab_rows)
    with open(out / PARAMS_FILE, "w") as fh:
        json.dump(p, fh, indent=2)


def read_recorded_params(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The parameters a complete synthetic set at ``out_dir`` was generated with, else None."""
    return read_json_or_none(Path(out_dir) / PARAMS_FILE)


def generate_luna16_synthetic(
    out_dir: str | os.PathLike,
    n_patients: int = 12,
    nodules_per_patient: int = 5,
    seed: int = 0,
    scan_shape: Sequence[int] = (112, 112, 96),
    spacing_mm: Sequence[float] = (0.8, 0.8, 1.25),
    malignant_fraction: float = 0.5,
    indeterminate_fraction: float = 0.1,
    noise_hu: float = 20.0,
) -> Path:
    """Write (or rewrite) a synthetic LUNA16-format set at ``out_dir`` and return its path.

    Built in a temporary sibling folder and swapped in, so a crash never leaves a half set. Refuses
    to replace a non-empty folder that is not a medens synthetic set (no `generator_params.json`).
    """
    p = synthetic_params(
        n_patients,
        nodules_per_patient,
        seed,
        scan_shape,
        spacing_mm,
        malignant_fraction,
        indeterminate_fraction,
        noise_hu,
    )
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / PARAMS_FILE).is_file():
        raise DataError(
            f"{out}: exists and is not a medens synthetic CT set (no {PARAMS_FILE}); not overwriting"
        )
    replace_folder_atomically(out, lambda tmp: _write_set(tmp, p))
    log.info("synthetic CT set written to %s (%d patients)", out, p["n_patients"])
    return out


def ensure_luna16_synthetic(out_dir: str | os.PathLike, **params: Any) -> Path:
    """Generate the set unless one with exactly these parameters is already there (locked)."""
    from medens.data.ct.cache import file_lock

    out = Path(out_dir)
    wanted = synthetic_params(**params)
    with file_lock(out.parent / f".{out.name}.lock"):
        if read_recorded_params(out) == wanted:
            return out
        if out.exists():
            log.info("synthetic CT set at %s has other parameters: regenerating", out)
        return generate_luna16_synthetic(out, **params)
