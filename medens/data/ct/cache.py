"""On-disk cache of nodule patches, keyed by the preprocessing config and the input files.

Layout: ``<cache_dir>/ct-<source>-<key16>/{patches.npy, manifest.json}``. ``patches.npy`` is float16
``[N, C, P, P, P]`` already windowed to [0, 1]; ``manifest.json`` holds each kept record (with its
row), every skipped nodule with its reason, and the config that produced it. The key hashes the
patch config (size, spacing, window, padding, channels, error mode) and a fingerprint of the inputs
(CSV contents, scan file sizes and mtimes), so a changed spacing/window or a regenerated scan
makes a new cache instead of reusing a stale one. A cache is built in a temporary folder and
renamed into place (`replace_folder_atomically`) under a file lock, so two processes never race or see half a cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medens.data.ct import io as ct_io
from medens.data.ct.geometry import (
    hu_window,
    inside_volume,
    sample_patch,
    sphere_mask,
    voxel_to_world,
    world_to_voxel,
)
from medens.data.ct.labels import NoduleRecord
from medens.data.ct.sources import ErrorPolicy
from medens.errors import DataError
from medens.utils.atomic import replace_folder_atomically
from medens.utils.jsonio import read_json_object

log = logging.getLogger(__name__)

CACHE_VERSION = 1
MANIFEST = "manifest.json"
PATCHES = "patches.npy"


@dataclass(frozen=True)
class PatchConfig:
    """Everything that changes a patch's pixels."""

    patch_size: int = 64
    spacing_mm: float = 1.0
    hu_window: tuple[float, float] = (-1000.0, 400.0)
    pad_hu: float = -1000.0
    channels: tuple[str, ...] = ("image",)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock so concurrent prepare_data calls build a cache once; the lock file names its owner
    (`medens.utils.locking.owned_lock`), and one left by a dead process is taken over with a warning."""
    from medens.utils.locking import owned_lock

    with owned_lock(path, f"building {path.name.lstrip('.').removesuffix('.lock')}"):
        yield




def fingerprint_tree(
    folders: Sequence[Path], suffixes: Sequence[str] | None = None, exclude: Sequence[Path] = ()
) -> str:
    """sha256 over (relative path, size, mtime) of the files under some folders (stat only, fast).

    ``exclude`` (e.g. a cache folder placed inside the data root) is not walked, so writing the
    cache never changes the key it is stored under.
    """
    h = hashlib.sha256()
    skip = {Path(p).resolve() for p in exclude}
    for folder in folders:
        if not folder.exists():
            h.update(f"missing:{folder}".encode())
            continue
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(
                d for d in dirnames if not d.startswith(".") and (Path(dirpath) / d).resolve() not in skip
            )
            for name in sorted(filenames):
                if name.startswith(".") or (suffixes and not name.lower().endswith(tuple(suffixes))):
                    continue
                p = Path(dirpath) / name
                st = p.stat()
                h.update(f"{p.relative_to(folder)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_path_for(cache_dir: Path, source: str, key: str) -> Path:
    return Path(cache_dir) / f"ct-{source}-{key[:16]}"


def load_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of a complete cache, or None if there is none."""
    mf = path / MANIFEST
    if not mf.is_file() or not (path / PATCHES).is_file():
        return None
    return read_json_object(mf, "CT patch cache manifest", DataError)


def _read_mask(rec: NoduleRecord, scan: ct_io.Scan) -> np.ndarray:
    mask = ct_io.read_image_file(rec.mask_file)  # type: ignore[arg-type]
    if mask.shape != scan.shape:
        raise DataError(f"{rec.mask_file}: mask is {mask.shape}, its image {scan.path} is {scan.shape}")
    if not (
        np.allclose(mask.spacing, scan.spacing, atol=1e-3)
        and np.allclose(mask.origin, scan.origin, atol=1e-2)
    ):
        raise DataError(f"{rec.mask_file}: mask geometry (origin/spacing) differs from its image {scan.path}")
    return (mask.array > 0).astype(np.float32)


def extract_record_patches(
    scan: ct_io.Scan, records: Sequence[NoduleRecord], cfg: PatchConfig, policy: ErrorPolicy
) -> list[tuple[NoduleRecord, np.ndarray]]:
    """Patches [C, P, P, P] (windowed image, optional mask) for the nodules of one scan.

    A nodule centre outside the scan is a DataError (or a counted skip), never an all-air patch.
    """
    out = []
    lo, hi = cfg.hu_window
    mask_array: np.ndarray | None = None
    for rec in records:
        if rec.center_world is None:
            centre = voxel_to_world(
                (np.asarray(scan.shape) - 1) / 2.0, scan.origin, scan.spacing, scan.direction
            )
        else:
            centre = np.asarray(rec.center_world, dtype=np.float64)
            idx = world_to_voxel(centre, scan.origin, scan.spacing, scan.direction)
            if not inside_volume(idx, scan.shape):
                policy.fail(
                    f"{scan.path}: nodule {rec.case_id} at world ({', '.join(f'{c:.2f}' for c in centre)}) mm "
                    f"maps to voxel ({', '.join(f'{c:.1f}' for c in idx)}), outside the scan of size "
                    f"{scan.shape}",
                    [rec.case_id],
                    scan.path,
                )
                continue
        chans = [hu_window(sample_patch(scan, centre, cfg.patch_size, cfg.spacing_mm, cfg.pad_hu), lo, hi)]
        if "mask" in cfg.channels:
            if rec.mask_file:
                try:
                    if mask_array is None:
                        mask_array = _read_mask(rec, scan)
                except DataError as exc:
                    policy.fail(str(exc), [rec.case_id], rec.mask_file)
                    continue
                m = sample_patch(scan, centre, cfg.patch_size, cfg.spacing_mm, 0.0, order=1, array=mask_array)
                chans.append((m >= 0.5).astype(np.float32))
            elif np.isfinite(rec.diameter_mm) and rec.diameter_mm > 0:
                chans.append(sphere_mask(cfg.patch_size, cfg.spacing_mm, rec.diameter_mm))
            else:
                policy.fail(
                    f"{rec.source_file}: mask channel requested but nodule {rec.case_id} has no mask file and "
                    "no diameter_mm to draw one",
                    [rec.case_id],
                    rec.source_file,
                )
                continue
        out.append((rec, np.stack(chans)))
    return out


def build_cache(
    path: Path,
    records: Sequence[NoduleRecord],
    cfg: PatchConfig,
    policy: ErrorPolicy,
    info: Mapping[str, Any],
    read: Callable[[str], ct_io.Scan] = ct_io.read_scan,
) -> dict[str, Any]:
    """Extract every record's patch (each scan read once, by the reader's ``read_case``) and write the
    cache atomically at ``path``."""
    path = Path(path)
    t0 = time.perf_counter()
    result: dict[str, Any] = {}

    def build(tmp: Path) -> None:
        shape = (max(len(records), 1), len(cfg.channels), *(cfg.patch_size,) * 3)
        arr = np.lib.format.open_memmap(tmp / PATCHES, mode="w+", dtype=np.float16, shape=shape)
        groups: dict[str, list[NoduleRecord]] = {}
        for rec in records:
            groups.setdefault(rec.source_file, []).append(rec)
        kept: list[dict[str, Any]] = []
        for source_file, recs in groups.items():
            # one crop per record for pre-cropped sets; several nodules per scan for LUNA16/DICOM
            try:
                scan = read(source_file)
            except DataError as exc:
                policy.fail(str(exc), [r.case_id for r in recs], source_file)
                continue
            for rec, patch in extract_record_patches(scan, recs, cfg, policy):
                arr[len(kept)] = patch.astype(np.float16)
                kept.append({**rec.to_json(), "row": len(kept)})
        arr.flush()
        del arr
        result["manifest"] = {
            "version": CACHE_VERSION,
            "info": dict(info),
            "patch_config": asdict(cfg),
            "items": kept,
            "skipped": list(policy.skipped),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST).write_text(json.dumps(result["manifest"], default=str))

    replace_folder_atomically(path, build)
    manifest = result["manifest"]
    log.info(
        "CT patch cache %s: %d patches, %d skipped, %.1f s",
        path,
        len(manifest["items"]),
        len(policy.skipped),
        time.perf_counter() - t0,
    )
    return manifest
