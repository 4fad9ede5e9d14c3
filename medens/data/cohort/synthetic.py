"""A synthetic multi-modal cohort: one hidden disease state per patient, seen partly by each modality.

Every patient draws three independent latent factors: ``a_xray``, ``a_ct`` and ``a_mri``. Each modality
shows only its own factor, through the same renderers as the single-modality generators:

- X-ray (NIH PNG + ``Data_Entry_2017.csv``): Mass, Nodule and Effusion are present with a probability
  rising with ``a_xray``; the other findings follow the usual NIH-like prevalence.
- CT (LUNA16 ``.mhd``/``.raw`` + annotations): every nodule of the scan is malignant with probability
  ``sigmoid(3 * a_ct)``; the manifest points at the first (index) nodule.
- MRI (BraTS 2021 naming): the tumour's size rises with ``a_mri``.

The patient-level targets mix the factors (plus noise), so no single modality can reach what the
three together can. ``latent.csv`` keeps the factors (never read by training) so the ceiling can be
reported. Patients are split once: ``base`` patients' files are written as the three base models'
training sets under ``base/``; ``meta`` and ``test`` patients' files go under ``holdout/``, so no base
model can ever see a case the stacking stage trains or is evaluated on.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from medens.data.ct import synthetic as ct_synth
from medens.data.mri import synthetic as mri_synth
from medens.data.synthetic_xray import render_chest, sample_findings
from medens.data.xray import NIH_LABELS, NO_FINDING
from medens.errors import ConfigError, DataError
from medens.utils.atomic import replace_folder_atomically
from medens.utils.jsonio import read_json_or_none

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2
STAMP_FILE = "cohort.json"
MANIFEST_FILE = "manifest.csv"
SPLITS = ("base", "meta", "test")
#: X-ray findings driven by the patient's X-ray factor, with their offsets (lower: rarer).
XRAY_DRIVEN = {"Mass": -0.6, "Nodule": -0.4, "Effusion": -0.6}
#: Each target: weights on (a_xray, a_ct, a_mri), threshold, noise std.
DEFAULT_TARGETS: dict[str, dict[str, Any]] = {
    "malignancy": {"weights": [1.0, 1.0, 1.0], "threshold": 0.2, "noise": 0.35},
    "progression": {"weights": [0.5, 0.8, 1.0], "threshold": 0.35, "noise": 0.35},
}


def cohort_params(
    n_patients: int = 600,
    seed: int = 0,
    split_fractions: Mapping[str, float] | None = None,
    missing_rate: float = 0.08,
    xray_image_size: int = 256,
    xray_images_per_base_patient: int = 2,
    ct_scan_shape: Sequence[int] = (80, 80, 64),
    ct_spacing_mm: Sequence[float] = (1.0, 1.0, 1.25),
    ct_nodules_per_patient: int = 2,
    mri_shape: Sequence[int] = (48, 48, 40),
    targets: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The normalised, JSON-able parameters (recorded in ``cohort.json`` and compared on reuse)."""
    fractions = dict(split_fractions or {"base": 0.35, "meta": 0.4, "test": 0.25})
    if set(fractions) != set(SPLITS) or any(v <= 0 for v in fractions.values()):
        raise ConfigError(f"cohort split_fractions needs positive {list(SPLITS)}, got {fractions}")
    total = sum(fractions.values())
    if n_patients < 12:
        raise ConfigError(f"cohort n_patients must be >= 12, got {n_patients}")
    if not 0 <= missing_rate < 0.5:
        raise ConfigError(f"cohort missing_rate must be in [0, 0.5), got {missing_rate}")
    tg = {k: dict(v) for k, v in (targets or DEFAULT_TARGETS).items()}
    for name, spec in tg.items():
        if len(spec.get("weights", [])) != 3:
            raise ConfigError(f"cohort target {name!r}: weights must be 3 numbers (xray, ct, mri)")
        tg[name] = {
            "weights": [float(w) for w in spec["weights"]],
            "threshold": float(spec.get("threshold", 0.0)),
            "noise": float(spec.get("noise", 0.35)),
        }
    return {
        "generator": "medens.data.cohort.synthetic",
        "version": GENERATOR_VERSION,
        "n_patients": int(n_patients),
        "seed": int(seed),
        "split_fractions": {k: float(fractions[k]) / total for k in SPLITS},
        "missing_rate": float(missing_rate),
        "xray_image_size": int(xray_image_size),
        "xray_images_per_base_patient": int(xray_images_per_base_patient),
        "ct_scan_shape": [int(v) for v in ct_scan_shape],
        "ct_spacing_mm": [float(v) for v in ct_spacing_mm],
        "ct_nodules_per_patient": int(ct_nodules_per_patient),
        "mri_shape": [int(v) for v in mri_shape],
        "targets": tg,
    }


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def _xray_findings(a: float, rng: np.random.Generator) -> list[str]:
    present = set(sample_findings(rng)) - set(XRAY_DRIVEN)
    present |= {name for name, b in XRAY_DRIVEN.items() if rng.random() < _sigmoid(2.0 * a + b)}
    return [name for name in NIH_LABELS if name in present]


def _nih_row(name: str, findings: list[str], patient: str, k: int, size: int) -> dict[str, Any]:
    return {
        "Image Index": name,
        "Finding Labels": "|".join(findings) if findings else NO_FINDING,
        "Follow-up #": k,
        "Patient ID": patient,
        "Patient Age": 60,
        "Patient Gender": "F",
        "View Position": "PA",
        "OriginalImage[Width": size,
        "Height]": size,
        "OriginalImagePixelSpacing[x": 0.143,
        "y]": 0.143,
    }


def _write(tmp: Path, p: dict[str, Any]) -> None:
    n = p["n_patients"]
    rng = np.random.default_rng(p["seed"])
    latent = rng.normal(size=(n, 3))
    fr = p["split_fractions"]
    order = rng.permutation(n)
    n_base, n_meta = round(n * fr["base"]), round(n * fr["meta"])
    split = np.empty(n, dtype=object)
    split[order[:n_base]] = "base"
    split[order[n_base : n_base + n_meta]] = "meta"
    split[order[n_base + n_meta :]] = "test"
    # each modality missing independently, never all three
    missing = rng.random((n, 3)) < p["missing_rate"]
    missing[missing.all(1), int(rng.integers(0, 3))] = False
    targets = {}
    for name, spec in p["targets"].items():
        w = np.asarray(spec["weights"])
        score = latent @ w / np.linalg.norm(w) + spec["noise"] * rng.normal(size=n)
        targets[name] = (score > spec["threshold"]).astype(int)

    ct_p = ct_synth.synthetic_params(
        n_patients=1, nodules_per_patient=p["ct_nodules_per_patient"], seed=p["seed"],
        scan_shape=p["ct_scan_shape"], spacing_mm=p["ct_spacing_mm"],
    )  # fmt: skip
    mri_shape = tuple(p["mri_shape"])
    affine = mri_synth.brats_affine((1.0, 1.0, 1.0), mri_shape)
    xray_rows: dict[str, list[dict[str, Any]]] = {"base": [], "holdout": []}
    ann_rows: dict[str, list[dict[str, Any]]] = {"base": [], "holdout": []}
    lab_rows: dict[str, list[dict[str, Any]]] = {"base": [], "holdout": []}
    manifest = []
    children = np.random.SeedSequence(p["seed"]).spawn(n)
    for i in range(n):
        pid = f"COH-{i + 1:04d}"
        part = "base" if split[i] == "base" else "holdout"
        prng = np.random.default_rng(children[i])
        row: dict[str, Any] = {"patient_id": pid, "split": split[i]}
        # X-ray
        if not missing[i, 0]:
            images = tmp / part / "xray" / "images"
            images.mkdir(parents=True, exist_ok=True)
            n_img = p["xray_images_per_base_patient"] if part == "base" else 1
            for k in range(n_img):
                name = f"{pid}_{k:03d}.png"
                findings = _xray_findings(latent[i, 0], prng)
                img = render_chest(findings, p["xray_image_size"], prng)
                Image.fromarray(img, mode="L").save(images / name)
                xray_rows[part].append(_nih_row(name, findings, pid, k, p["xray_image_size"]))
            row["xray_path"] = f"{part}/xray/images/{pid}_000.png"
        # CT: one scan, nodules sharing the patient's malignancy risk; the first is the index nodule
        if not missing[i, 1]:
            scans = tmp / part / "ct" / "subset0"
            scans.mkdir(parents=True, exist_ok=True)
            hu, origin, nodules = ct_synth.make_scan(ct_p, prng, malignant_prob=_sigmoid(3.0 * latent[i, 1]))
            uid = f"{ct_synth.UID_ROOT}.{p['seed']}.9{i + 1}"
            ct_synth.write_metaimage(hu, origin, ct_p["spacing_mm"], scans / f"{uid}.mhd")
            a, lab = ct_synth.nodule_rows(uid, pid, nodules)
            ann_rows[part] += a
            lab_rows[part] += lab
            row["ct_path"] = f"{part}/ct/subset0/{uid}.mhd"
            row.update({"ct_x": a[0]["coordX"], "ct_y": a[0]["coordY"], "ct_z": a[0]["coordZ"]})
            row["ct_diameter_mm"] = a[0]["diameter_mm"]
        # MRI: tumour size follows the MRI factor
        if not missing[i, 2]:
            images_mri, parts = mri_synth.make_case(prng, mri_shape, tumour_size=_sigmoid(2.0 * latent[i, 2]))
            mri_synth.write_case(tmp / part / "mri" / pid, pid, images_mri, parts, "2021", affine)
            row["mri_path"] = f"{part}/mri/{pid}"
        for name, y in targets.items():
            row[name] = int(y[i])
        manifest.append(row)
    for part in ("base", "holdout"):
        if xray_rows[part]:
            pd.DataFrame(xray_rows[part]).to_csv(tmp / part / "xray" / "Data_Entry_2017.csv", index=False)
        if ann_rows[part]:
            ct_synth.write_luna16_tables(tmp / part / "ct", ann_rows[part], lab_rows[part])
    cols = [
        "patient_id",
        "split",
        "xray_path",
        "ct_path",
        "ct_x",
        "ct_y",
        "ct_z",
        "ct_diameter_mm",
        "mri_path",
    ]
    df = pd.DataFrame(manifest).reindex(columns=cols + list(targets))
    df.to_csv(tmp / MANIFEST_FILE, index=False)
    pd.DataFrame(latent, columns=["a_xray", "a_ct", "a_mri"]).assign(patient_id=df["patient_id"]).to_csv(
        tmp / "latent.csv", index=False
    )


def read_stamp(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    return read_json_or_none(Path(out_dir) / STAMP_FILE)


def generate_synthetic_cohort(out_dir: str | os.PathLike, **params: Any) -> Path:
    """Write the cohort (manifest, base/ and holdout/ modality sets, latent.csv) at ``out_dir``.

    Built in a temporary sibling and swapped in, so a crash never leaves half a cohort; a folder not
    written by this generator is never replaced.
    """
    p = cohort_params(**params)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and read_stamp(out) is None:
        raise DataError(
            f"{out}: exists and is not a medens synthetic cohort (no {STAMP_FILE}); not overwriting"
        )

    def build(tmp: Path) -> None:
        _write(tmp, p)
        (tmp / STAMP_FILE).write_text(json.dumps(p, indent=2, sort_keys=True))

    replace_folder_atomically(out, build)
    log.info("synthetic cohort written to %s (%d patients)", out, p["n_patients"])
    return out


def ensure_synthetic_cohort(out_dir: str | os.PathLike, **params: Any) -> bool:
    """Generate unless a cohort with exactly these parameters is there; True when (re)generated."""
    from medens.utils.locking import owned_lock

    if read_stamp(out_dir) == cohort_params(**params):
        return False
    out = Path(out_dir)
    with owned_lock(out.parent / f".{out.name}.lock", "synthetic cohort generation"):
        if read_stamp(out) == cohort_params(**params):  # written by another process while we waited
            return False
        generate_synthetic_cohort(out, **params)
    return True
