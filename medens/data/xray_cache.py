"""Decoded-image cache for chest X-rays: decode, greyscale and resize each PNG once, read many times.

NIH ChestX-ray14 is 112,120 PNGs of 1024x1024; decoding one and resizing it costs ~10-20 ms per core,
so a GPU training at thousands of images/s would wait on the CPU. The cache holds every image of a
dataset as one uint8 array ``images.npy`` of shape ``[N, S, S]`` (``S`` = ``data.cache.size``, by default
the training size), read through ``np.load(...,
mmap_mode='r')``: a DataLoader worker on any rank reads one 64 KB row (at S=256) without decoding,
and the page cache shares it between workers and ranks. Measured against per-image ``.npy`` files
and PNG decoding in ``scripts/benchmark.py xray-data`` (see README, "X-ray at NIH scale").

Layout: ``<cache dir>/xray-<key16>/{images.npy, manifest.json}``. The key hashes the preprocessing
(cache version, size, decode and resize method), the resolved image folder, the ordered image names
and a fingerprint of the source files: (name, size, mtime) by default (``fingerprint: stat``, one
``stat`` per file: ~1 s for 112k local files, where hashing the content would read 42 GB on every
start), or their SHA-256 (``fingerprint: sha256``) for file systems whose mtimes cannot be trusted.
A cache built with another config or from changed files therefore has another key and is never
reused. It is built in parallel beside its final name and renamed into place under an owned lock
(``medens.utils.locking``), so an interrupted build never leaves a cache that looks complete and
two processes (DDP ranks, two terminals) never build it twice. Images that fail to decode are named
in the log and listed in ``manifest.json`` (``failed``), then skipped or fatal per
``data.missing_images``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medens.errors import ConfigError, DataError
from medens.utils.atomic import replace_folder_atomically
from medens.utils.hashing import sha256_file, sha256_json, sha256_text
from medens.utils.jsonio import read_json_or_none
from medens.utils.locking import owned_lock

log = logging.getLogger(__name__)

CACHE_VERSION = 1
IMAGES = "images.npy"
MANIFEST = "manifest.json"
#: How pixels are produced; part of the key, so a change here rebuilds every cache.
DECODE = "medens.load_xray_image:L8"
RESIZE = "PIL.BILINEAR(antialias)"
_CHUNK = 32


@dataclass(frozen=True)
class CacheSettings:
    """`data.cache.*`: whether and where to cache, at which size, how to build and fingerprint."""

    enabled: bool = False
    dir: str | None = None
    size: int | None = None
    workers: int | None = None
    fingerprint: str = "stat"
    on_unwritable: str = "error"
    progress: bool = True

    def resolved_size(self, image_size: int) -> int:
        """The cache's side: `size`, else the training size itself.

        The training transforms resize the whole image to `image_size` before augmenting (no random crop
        reads the border), so a larger cache would only add a resize per item (~1-2 ms of a ~5 ms item);
        set `size` above `image_size` (e.g. 256 for 224) for a pipeline that crops from a larger image.
        """
        return int(self.size) if self.size else int(image_size)

    def resolved_workers(self) -> int:
        if self.workers:
            return int(self.workers)
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)


def cache_settings(cfg: Mapping[str, Any] | bool | None) -> CacheSettings:
    """Validate `data.cache` (a mapping, or a bool for on/off); errors name the key and what is allowed."""
    if cfg is None or isinstance(cfg, bool):
        return CacheSettings(enabled=bool(cfg))
    known = set(CacheSettings.__dataclass_fields__)
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) data.cache.{unknown[0]}; data.cache takes {sorted(known)}")
    s = CacheSettings(**{k: cfg[k] for k in cfg})
    if s.fingerprint not in ("stat", "sha256"):
        raise ConfigError(f"data.cache.fingerprint={s.fingerprint!r}: must be 'stat' or 'sha256'")
    if s.on_unwritable not in ("error", "no_cache"):
        raise ConfigError(f"data.cache.on_unwritable={s.on_unwritable!r}: must be 'error' or 'no_cache'")
    if s.size is not None and (not isinstance(s.size, int) or isinstance(s.size, bool) or s.size < 8):
        raise ConfigError(f"data.cache.size={s.size!r}: must be null or an integer >= 8 (pixels)")
    if s.workers is not None and (not isinstance(s.workers, int) or isinstance(s.workers, bool) or s.workers < 1):
        raise ConfigError(f"data.cache.workers={s.workers!r}: must be null (all CPUs) or an integer >= 1")
    if s.enabled and not s.dir:
        raise ConfigError("data.cache.enabled=true needs data.cache.dir (the folder that holds the caches)")
    return s


def decode_resized(path: Path, size: int) -> np.ndarray:
    """One image as the cache stores it: 8-bit greyscale, `size` x `size` (errors name the file)."""
    from medens.data.xray import load_xray_image

    im = load_xray_image(path)
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def source_fingerprint(image_root: Path, names: Sequence[str], mode: str = "stat") -> str:
    """sha256 over each source image's (name, size, mtime_ns) or, with mode='sha256', its content."""
    h = hashlib.sha256()
    for name in names:
        p = image_root / name
        try:
            if mode == "sha256":
                h.update(f"{name}|{sha256_file(p)}\n".encode())
            else:
                st = p.stat()
                h.update(f"{name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{name}|missing\n".encode())
    return h.hexdigest()


def cache_payload(image_root: Path, names: Sequence[str], size: int, fingerprint: str) -> dict[str, Any]:
    """What decides the cache's pixels; its hash names the cache folder."""
    return {
        "version": CACHE_VERSION,
        "size": int(size),
        "decode": DECODE,
        "resize": RESIZE,
        "image_root": str(Path(image_root).resolve()),
        "n_images": len(names),
        "names_sha256": sha256_text("\n".join(names)),
        "fingerprint_mode": fingerprint,
        "fingerprint": source_fingerprint(image_root, names, fingerprint),
    }


class XRayCache:
    """A built cache: row `i` of `images.npy` is image `names[i]`; `failed` maps names to their error.

    The memory map is opened lazily in each process (and dropped when pickled to a DataLoader worker),
    so workers and ranks each map the file themselves.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.names: list[str] = list(manifest["names"])
        self.failed: dict[str, str] = dict(manifest.get("failed") or {})
        self.size = int(manifest["payload"]["size"])
        self._rows = {n: i for i, n in enumerate(self.names)}
        self._images: np.ndarray | None = None

    def row(self, name: str) -> int:
        return self._rows[name]

    def image(self, row: int) -> np.ndarray:
        """Image `row` as a writable uint8 [S, S] array (a copy, safe to hand to torch)."""
        if self._images is None:
            self._images = np.load(self.folder / IMAGES, mmap_mode="r")
        return np.array(self._images[row])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_images"] = None
        return state

    def nbytes(self) -> int:
        return (self.folder / IMAGES).stat().st_size


def _read_complete(folder: Path, payload: Mapping[str, Any]) -> XRayCache | None:
    """The cache at `folder` if it is complete and was built from exactly `payload`, else None."""
    manifest = read_json_or_none(folder / MANIFEST)
    if not isinstance(manifest, dict):
        return None
    if manifest.get("payload") != dict(payload):
        log.warning("X-ray cache %s was built from another config or other files: not reused", folder)
        return None
    n, size = int(payload["n_images"]), int(payload["size"])
    try:
        arr = np.load(folder / IMAGES, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if arr.shape != (n, size, size) or arr.dtype != np.uint8:
        return None
    return XRayCache(folder, manifest)


# -- parallel build ------------------------------------------------------------------------------------
_W: dict[str, Any] = {}


def _init_worker(images_path: str, image_root: str, names: Sequence[str], size: int) -> None:
    _W.update(path=images_path, root=Path(image_root), names=names, size=size, arr=None)


def _build_chunk(rows: Sequence[int]) -> tuple[int, dict[str, str]]:
    if _W["arr"] is None:
        _W["arr"] = np.load(_W["path"], mmap_mode="r+")
    arr, failed = _W["arr"], {}
    for i in rows:
        name = _W["names"][i]
        try:
            arr[i] = decode_resized(_W["root"] / name, _W["size"])
        except DataError as exc:
            failed[name] = str(exc)
    arr.flush()
    return len(rows), failed


def _build(
    tmp: Path, image_root: Path, names: Sequence[str], size: int, workers: int, progress: bool
) -> dict[str, str]:
    from tqdm.auto import tqdm

    images = tmp / IMAGES
    np.lib.format.open_memmap(images, mode="w+", dtype=np.uint8, shape=(len(names), size, size)).flush()
    chunks = [range(i, min(i + _CHUNK, len(names))) for i in range(0, len(names), _CHUNK)]
    workers = max(1, min(workers, len(chunks)))
    failed: dict[str, str] = {}
    bar = tqdm(total=len(names), desc=f"X-ray cache ({size}px, {workers} workers)", unit="img",
               disable=not progress, mininterval=1.0)  # fmt: skip
    args = (str(images), str(image_root), list(names), size)
    try:
        if workers == 1:
            _init_worker(*args)
            results: Iterable[tuple[int, dict[str, str]]] = map(_build_chunk, chunks)
            for done, bad in results:
                failed.update(bad)
                bar.update(done)
            _W.clear()
        else:
            with mp.get_context().Pool(workers, initializer=_init_worker, initargs=args) as pool:
                for done, bad in pool.imap_unordered(_build_chunk, chunks):
                    failed.update(bad)
                    bar.update(done)
    finally:
        bar.close()
    return dict(sorted(failed.items()))


def ensure_xray_cache(
    image_root: Path,
    names: Sequence[str],
    settings: CacheSettings,
    image_size: int,
    missing_images: str = "error",
) -> XRayCache | None:
    """Open the cache of these images, building it first when needed; None when disabled or (with
    `on_unwritable: no_cache`) when its folder cannot be written.

    Raises `DataError` naming the images that failed to decode when `missing_images` is 'error', and
    naming the folder and the knobs when the cache folder is not writable and `on_unwritable` is 'error'.
    """
    if not settings.enabled:
        return None
    image_root = Path(image_root)
    size = settings.resolved_size(image_size)
    payload = cache_payload(image_root, names, size, settings.fingerprint)
    key = sha256_json(payload)
    root = Path(str(settings.dir)).expanduser()
    folder = root / f"xray-{key[:16]}"
    cache = _read_complete(folder, payload)
    if cache is None:
        try:
            root.mkdir(parents=True, exist_ok=True)
            with owned_lock(root / f".xray-{key[:16]}.lock", "X-ray image cache build"):
                cache = _read_complete(folder, payload)  # built by another process while we waited
                if cache is None:
                    cache = _build_locked(folder, image_root, names, payload, key, settings)
        except OSError as exc:
            msg = (
                f"{root}: cannot write the X-ray image cache there ({exc.__class__.__name__}: {exc}). "
                "Set data.cache.dir to a writable folder, data.cache.enabled=false, or "
                "data.cache.on_unwritable=no_cache to read the PNGs directly"
            )
            if settings.on_unwritable == "no_cache":
                log.warning("%s; continuing WITHOUT the cache (every epoch decodes the PNGs)", msg)
                return None
            raise DataError(msg) from exc
    if cache.failed:
        listed = "; ".join(f"{n}: {e}" for n, e in list(cache.failed.items())[:5])
        msg = (f"{len(cache.failed)} of {len(names)} images in {image_root} failed to decode "
               f"(listed in {folder / MANIFEST}): {listed}")  # fmt: skip
        if missing_images == "error":
            raise DataError(msg + "; fix or remove them, or set data.missing_images=skip")
        log.warning("%s; skipping them (data.missing_images=skip)", msg)
    return cache


def _build_locked(
    folder: Path, image_root: Path, names: Sequence[str], payload: Mapping[str, Any], key: str,
    settings: CacheSettings,
) -> XRayCache:  # fmt: skip
    size, workers = int(payload["size"]), settings.resolved_workers()
    log.info("building the X-ray image cache %s: %d images -> %dx%d uint8, up to %d workers",
             folder, len(names), size, size, workers)  # fmt: skip
    t0 = time.perf_counter()
    result: dict[str, Any] = {}

    def build(tmp: Path) -> None:
        failed = _build(tmp, image_root, names, size, workers, settings.progress)
        manifest = {
            "payload": dict(payload),
            "key": key,
            "names": list(names),
            "failed": failed,
            "shape": [len(names), size, size],
            "settings": asdict(settings),
            "build_seconds": round(time.perf_counter() - t0, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        result["manifest"] = manifest

    replace_folder_atomically(folder, build)
    cache = XRayCache(folder, result["manifest"])
    log.info("X-ray image cache ready in %.1fs: %s (%.1f MB, %d failed)",
             time.perf_counter() - t0, folder, cache.nbytes() / 1e6, len(cache.failed))  # fmt: skip
    return cache
