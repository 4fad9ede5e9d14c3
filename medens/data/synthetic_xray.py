"""Synthetic NIH ChestX-ray14: PNGs + `Data_Entry_2017.csv` with known, learnable findings.

Each finding draws its own pattern (position, shape, brightness) on a chest-like background, and
findings co-occur the way they do in NIH (effusion with atelectasis, oedema with cardiomegaly, ...),
so a classifier can learn every label and the metrics mean something. Written in the real format
so the default experiment trains through the NIH loader.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from medens.data.xray import NIH_LABELS, NO_FINDING
from medens.utils.atomic import replace_folder_atomically
from medens.utils.jsonio import read_json_or_none
from medens.utils.locking import owned_lock, pid_alive

log = logging.getLogger(__name__)

#: Per-image prevalence of each finding before co-occurrence (raised from NIH's so rare labels appear).
PREVALENCE = {
    "Atelectasis": 0.14, "Cardiomegaly": 0.10, "Effusion": 0.16, "Infiltration": 0.20,
    "Mass": 0.10, "Nodule": 0.12, "Pneumonia": 0.08, "Pneumothorax": 0.10,
    "Consolidation": 0.08, "Edema": 0.08, "Emphysema": 0.08, "Fibrosis": 0.08,
    "Pleural_Thickening": 0.08, "Hernia": 0.06,
}  # fmt: skip
#: (finding, co-finding, probability): if the first is present, the second is added with this probability.
CO_OCCURRENCE = (
    ("Effusion", "Atelectasis", 0.4),
    ("Edema", "Cardiomegaly", 0.5),
    ("Edema", "Effusion", 0.4),
    ("Pneumonia", "Infiltration", 0.5),
    ("Mass", "Nodule", 0.3),
    ("Consolidation", "Infiltration", 0.3),
    ("Emphysema", "Pneumothorax", 0.2),
)
GENERATOR_VERSION = 1


def sample_findings(rng: np.random.Generator) -> list[str]:
    """Draw one image's findings: independent primaries, then correlated co-findings."""
    present = {name for name, p in PREVALENCE.items() if rng.random() < p}
    for a, b, p in CO_OCCURRENCE:
        if a in present and rng.random() < p:
            present.add(b)
    return [name for name in NIH_LABELS if name in present]


def _disk(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0).astype(np.float32)


def _blob(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, s: float) -> np.ndarray:
    return np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))).astype(np.float32)


def render_chest(findings: list[str], size: int, rng: np.random.Generator) -> np.ndarray:
    """A size x size uint8 radiograph-like image with each finding's pattern drawn in."""
    s = size / 256.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.full((size, size), 40.0, np.float32)
    jitter = rng.normal(0, 4 * s, size=2)
    lungs = _disk(yy, xx, 120 * s + jitter[0], 80 * s + jitter[1], 80 * s, 45 * s)
    lungs += _disk(yy, xx, 120 * s + jitter[0], 176 * s + jitter[1], 80 * s, 45 * s)
    lung_level = 70.0 if "Emphysema" not in findings else 35.0
    img += lungs * lung_level
    heart_r = (42 if "Cardiomegaly" in findings else 28) * s
    img += _disk(yy, xx, 175 * s, 135 * s, heart_r * 0.9, heart_r * 1.3) * 120
    img += _disk(yy, xx, 100 * s, 128 * s, 70 * s, 12 * s) * 90  # mediastinum
    f = set(findings)
    if "Effusion" in f:
        img += lungs * (yy > 170 * s) * 110
    if "Atelectasis" in f:
        img += (np.abs(yy - (150 * s + 0.3 * (xx - 80 * s))) < 5 * s) * (lungs > 0) * 120 * (xx < 128 * s)
    if "Infiltration" in f:
        img += lungs * np.clip(rng.normal(0, 1, (size, size)), 0, None).astype(np.float32) * 45 * (yy > 90 * s)
    if "Mass" in f:
        img += _disk(yy, xx, 110 * s + rng.normal(0, 10 * s), 176 * s + rng.normal(0, 8 * s), 20 * s, 20 * s) * 140
    if "Nodule" in f:
        for _ in range(2):
            img += _disk(yy, xx, 95 * s + rng.normal(0, 12 * s), 70 * s + rng.normal(0, 10 * s), 5 * s, 5 * s) * 150
    if "Pneumonia" in f:
        img += _blob(yy, xx, 160 * s, 190 * s, 18 * s) * 120
    if "Pneumothorax" in f:
        img -= _disk(yy, xx, 65 * s, 60 * s, 25 * s, 30 * s) * lungs * 60
        img += (np.abs(np.hypot((yy - 65 * s) / 25, (xx - 60 * s) / 30) - s) < 0.08 * s) * 120
    if "Consolidation" in f:
        img += _disk(yy, xx, 140 * s, 90 * s, 22 * s, 16 * s) * lungs * 150
    if "Edema" in f:
        img += (_blob(yy, xx, 115 * s, 90 * s, 25 * s) + _blob(yy, xx, 115 * s, 166 * s, 25 * s)) * 80
    if "Fibrosis" in f:
        img += lungs * (yy < 100 * s) * ((np.sin(xx / (2.5 * s)) * np.sin(yy / (2.5 * s))) > 0.5) * 90
    if "Pleural_Thickening" in f:
        edge = _disk(yy, xx, 120 * s, 80 * s, 80 * s, 45 * s) - _disk(yy, xx, 120 * s, 80 * s, 74 * s, 39 * s)
        img += edge * 150
    if "Hernia" in f:
        img += _disk(yy, xx, 205 * s, 128 * s, 16 * s, 24 * s) * 130
    img += rng.normal(0, 10, (size, size)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def generate_synthetic_nih(
    out_dir: str | Path,
    n_patients: int = 120,
    images_per_patient: int = 3,
    image_size: int = 256,
    seed: int = 0,
    views: tuple[str, ...] = ("PA", "AP"),
) -> Path:
    """Write `images/*.png` and `Data_Entry_2017.csv` (NIH columns) under `out_dir`."""
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(1, n_patients + 1):
        age, sex = int(rng.integers(18, 90)), str(rng.choice(["M", "F"]))
        n_img = max(1, int(rng.poisson(images_per_patient - 1)) + 1)
        for k in range(n_img):
            findings = sample_findings(rng)
            name = f"{p:08d}_{k:03d}.png"
            Image.fromarray(render_chest(findings, image_size, rng), mode="L").save(images / name)
            rows.append(
                {
                    "Image Index": name,
                    "Finding Labels": "|".join(findings) if findings else NO_FINDING,
                    "Follow-up #": k,
                    "Patient ID": p,
                    "Patient Age": age,
                    "Patient Gender": sex,
                    "View Position": str(rng.choice(list(views))),
                    "OriginalImage[Width": image_size,
                    "Height]": image_size,
                    "OriginalImagePixelSpacing[x": 0.143,
                    "y]": 0.143,
                }
            )
    pd.DataFrame(rows).to_csv(out / "Data_Entry_2017.csv", index=False)
    return out


def _stamp(root: Path) -> dict[str, Any] | None:
    return read_json_or_none(root / "synthetic.json")


def _remove_dead_builds(root: Path) -> None:
    """Delete build folders (`.<name>.tmp-<pid>-*`) left beside `root` by killed generators."""
    pattern = re.compile(rf"^\.{re.escape(root.name)}\.(tmp-(\d+)-|old-)[0-9a-f]+$")
    if not root.parent.is_dir():
        return
    for p in root.parent.iterdir():
        m = pattern.match(p.name)
        if m and p.is_dir() and (m.group(2) is None or not pid_alive(int(m.group(2)))):
            log.warning("removing %s, left by an interrupted synthetic X-ray generation", p)
            shutil.rmtree(p, ignore_errors=True)


def ensure_synthetic_nih(root: str | Path, **params: Any) -> Path:
    """Generate the synthetic set at `root` unless one made with the same parameters is there.

    The parameters are recorded in `synthetic.json`; a different request regenerates the set, so a
    changed config never trains on stale data. Generation holds an owned lock (`.<name>.lock` beside
    `root`: a second process waits, then finds the set ready instead of regenerating it) and builds in
    a hidden sibling folder renamed into place, so a killed generator leaves no half set: the next run
    removes its build folder and generates again.
    """
    root = Path(root)
    wanted = json.loads(json.dumps({"generator": "nih_cxr14", "version": GENERATOR_VERSION, **params}))
    if _stamp(root) == wanted:
        return root
    with owned_lock(root.parent / f".{root.name}.lock", "synthetic NIH X-ray generation"):
        if _stamp(root) == wanted:  # generated by another process while we waited
            return root
        if root.exists() and not (root / "synthetic.json").is_file():
            raise FileExistsError(f"{root}: exists and was not written by the synthetic generator; refusing to overwrite")
        _remove_dead_builds(root)

        def build(tmp: Path) -> None:
            generate_synthetic_nih(tmp, **params)
            (tmp / "synthetic.json").write_text(json.dumps(wanted, indent=2))

        replace_folder_atomically(root, build)
        log.info("synthetic NIH set written to %s (%s)", root, params)
    return root
