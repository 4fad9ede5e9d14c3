"""X-ray data benchmarks on full-size (1024x1024) synthetic NIH PNGs; JSON under outputs/benchmarks/.

    python scripts/benchmark.py xray-data [--images 192 --workers 2 --repeats 3]
    python scripts/benchmark.py xray-e2e  [--images 192 --workers 2 --repeats 2 --arch resnet18]

`xray-data`: images/s of one pass over the training split through medens' loader (same sampler,
transforms, batch size and worker count) reading (a) the 1024x1024 PNGs, decoded every epoch, (b) the
decoded-image cache (one uint8 memory-mapped array, `medens.data.xray_cache`), and (c) per-image `.npy`
files of the same decoded images (the alternative layout); then (a) and (b) again with the evaluation
transforms (no augmentation). Sources alternate per repeat; medians are reported with the cache build
time and its size on disk per 1,000 images. With `--augment-on device` (the default, as
`data.augment_on`) the training loader carries the uint8 image and per-item parameters, and the random
augmentation runs batched after the loader: its cost per batch on this CPU is reported beside the ratio
(`device_augment_ms_per_batch_on_this_cpu`); `--augment-on loader` measures the per-image PIL chain.

`xray-e2e`: one training epoch of ResNet-18 at 224 px through `scripts/train.py` (cache on, images/s
of the training batches as `perf/images_per_s` measures it: epoch start to the end of the last batch)
vs a plain PyTorch loop over a straightforward PIL `Dataset` of the same training PNGs with the same
augmentations, batch size and worker count, timed the same way. Runs alternate; medians reported.

The set is generated once under outputs/benchmarks/data/ (synthetic generator, `image_size=1024`).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medens.benchmarks.record import PROJECT_ROOT, RESULTS_DIR, write_benchmark_result
from medens.utils.atomic import replace_folder_atomically
from medens.utils.jsonio import read_json_object


def add_parsers(sub: Any) -> None:
    """Register `xray-data` and `xray-e2e` on the benchmark entry point's subparsers."""
    for name, help_ in (("xray-data", "one epoch from 1024 px PNGs vs the decoded-image cache"),
                        ("xray-e2e", "scripts/train.py (cache on) vs a plain PyTorch loop over PIL PNGs")):  # fmt: skip
        p = sub.add_parser(name, help=help_)
        p.add_argument("--images", type=int, default=192, help="synthetic NIH images (one per patient)")
        p.add_argument("--png-size", type=int, default=1024)
        p.add_argument("--image-size", type=int, default=224)
        p.add_argument("--workers", type=int, default=2)
        p.add_argument("--batch", type=int, default=16)
        p.add_argument("--repeats", type=int, default=3 if name == "xray-data" else 2)
        p.add_argument("--arch", default="resnet18")
        # xray-data times the loader alone as a GPU run feeds it (uint8 out, augmentation after the transfer);
        # xray-e2e trains on this CPU with the default config's choice (auto: loader with workers on a CPU)
        p.add_argument("--augment-on", default="device" if name == "xray-data" else "auto",
                       choices=["auto", "device", "loader"],
                       help="data.augment_on: device (loader carries uint8, augmentation batched after it), "
                            "loader, or auto (loader when training on the CPU with workers, else device)")
        p.add_argument("--data-root", default=None, help="default: outputs/benchmarks/data/nih<png-size>-<images>")
        p.add_argument("--out", default=str(RESULTS_DIR))
        p.set_defaults(_run=functools.partial(run, name))


def _dataset_root(args: argparse.Namespace) -> Path:
    from medens.data.synthetic_xray import ensure_synthetic_nih

    root = Path(args.data_root or RESULTS_DIR / "data" / f"nih{args.png_size}-{args.images}")
    t0 = time.perf_counter()
    ensure_synthetic_nih(root, n_patients=args.images, images_per_patient=1, image_size=args.png_size, seed=0)
    print(f"data: {root} ({time.perf_counter() - t0:.0f}s to generate/check)", flush=True)
    return root


def _datamodule(root: Path, args: argparse.Namespace, cache: bool, cache_dir: Path) -> Any:
    from medens.data.xray import XRayDataModule

    dm = XRayDataModule(
        str(root), image_size=args.image_size, val_fraction=0.05, test_fraction=0.05, batch_size=args.batch,
        num_workers=args.workers, verify_images=False, augment_on=args.augment_on,
        train_augment=[{"_target_": "torchvision.transforms.v2.RandomAffine", "degrees": 7,
                        "translate": [0.04, 0.04], "scale": [0.95, 1.05]},
                       {"_target_": "torchvision.transforms.v2.ColorJitter", "brightness": 0.1, "contrast": 0.1}],
        cache={"enabled": cache, "dir": str(cache_dir), "size": None, "progress": False},
    )  # fmt: skip
    dm.setup()
    return dm


class _NpyFiles(torch.utils.data.Dataset):
    """The alternative layout: one decoded uint8 `.npy` per image, same transforms as the cache path."""

    def __init__(self, ds: Any, folder: Path) -> None:
        self.ds, self.folder = ds, folder

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        raw = torch.from_numpy(np.load(self.folder / f"{self.ds.ids[i]}.npy"))[None]
        return {"image": self.ds.transform(raw), "label": self.ds.targets[i], "case_id": self.ds.ids[i]}


def _eval_view(dm: Any) -> Any:
    """The training split with the evaluation transforms (no augmentation): the decode-bound case."""
    import copy

    ds = copy.copy(dm.datasets["train"])
    ds.transform = dm.datasets["val"].transform
    return ds


def _epoch_images_per_s(ds: Any, args: argparse.Namespace) -> tuple[float, float]:
    """(images/s of the whole epoch, worker start included; images/s after the first batch)."""
    from medens.data.loaders import make_loader

    loader = make_loader(ds, batch_size=args.batch, shuffle=True, seed=0, num_workers=args.workers, drop_last=True)
    n, t0, first = 0, time.perf_counter(), None
    it = iter(loader)
    for batch in it:
        n += batch["image"].shape[0]
        if first is None:
            first = (n, time.perf_counter())
    t1 = time.perf_counter()
    workers = getattr(loader, "_iterator", None)  # persistent workers: stop them now, not at some later GC
    if hasattr(workers, "_shutdown_workers"):  # (a forked child's GC would otherwise try, and fail)
        workers._shutdown_workers()
    steady = (n - first[0]) / (t1 - first[1]) if first and n > first[0] else float("nan")
    return n / (t1 - t0), steady


def xray_data(args: argparse.Namespace) -> dict[str, Any]:
    root = _dataset_root(args)
    cache_dir = root.parent / f"cache-{root.name}"
    t0 = time.perf_counter()
    cached = _datamodule(root, args, True, cache_dir)
    build_s = time.perf_counter() - t0  # 0-ish when the cache already existed
    png = _datamodule(root, args, False, cache_dir)
    npy_dir = root.parent / f"npy-{root.name}-{cached.cache.size}"
    if not npy_dir.is_dir():

        def write_npy(tmp: Path) -> None:
            for name in cached.cache.names:
                np.save(tmp / f"{name}.npy", cached.cache.image(cached.cache.row(name)))

        replace_folder_atomically(npy_dir, write_npy)
    sources = {"png": png.datasets["train"], "cache": cached.datasets["train"],
               "npy_files": _NpyFiles(cached.datasets["train"], npy_dir),
               "png_eval": _eval_view(png), "cache_eval": _eval_view(cached)}  # fmt: skip
    runs: dict[str, list[float]] = {k: [] for k in sources}
    steady: dict[str, list[float]] = {k: [] for k in sources}
    for r in range(args.repeats):
        order = list(sources) if r % 2 == 0 else list(reversed(sources))
        for name in order:
            epoch, after_first = _epoch_images_per_s(sources[name], args)
            runs[name].append(epoch)
            steady[name].append(after_first)
            print(f"repeat {r + 1}: {name:9s} {epoch:8.1f} images/s ({after_first:.1f} after the first batch)",
                  flush=True)  # fmt: skip
    augment_ms = _device_augment_ms(cached, args)
    med = {k: float(np.median(v)) for k, v in runs.items()}
    med_steady = {k: float(np.median(v)) for k, v in steady.items()}
    n_cached = len(cached.cache.names)
    return {
        "benchmark": "xray-data",
        "png_size": args.png_size, "cache_size": cached.cache.size, "image_size": args.image_size,
        "images": n_cached, "train_images": len(sources["png"]), "workers": args.workers, "batch_size": args.batch,
        "repeats": args.repeats, "images_per_s": runs, "median_images_per_s": med,
        "ratio_cache_over_png": med["cache"] / med["png"], "ratio_npy_files_over_png": med["npy_files"] / med["png"],
        "images_per_s_after_first_batch": steady, "median_images_per_s_after_first_batch": med_steady,
        "ratio_cache_over_png_after_first_batch": med_steady["cache"] / med_steady["png"],
        "ratio_cache_over_png_eval_transforms": med["cache_eval"] / med["png_eval"],
        "cache_build_seconds_this_run": round(build_s, 2),
        "cache_build_seconds_recorded": cached.cache.manifest.get("build_seconds"),
        "cache_bytes": cached.cache.nbytes(), "cache_mb_per_1000_images": cached.cache.nbytes() / n_cached * 1000 / 1e6,
        "png_mb_per_1000_images": sum((root / "images" / n).stat().st_size for n in cached.cache.names)
        / n_cached * 1000 / 1e6,
        "cache_folder": str(cached.cache.folder), "augment_on": args.augment_on,
        "device_augment_ms_per_batch_on_this_cpu": augment_ms,
    }  # fmt: skip


def _device_augment_ms(dm: Any, args: argparse.Namespace) -> float | None:
    """With augment_on=device the random augmentation left the loader: its cost per batch, timed here on
    the CPU (one thread of the training process; on a GPU it is a fraction of a millisecond)."""
    if dm.batch_augment is None:
        return None
    ds = dm.datasets["train"]
    items = [ds[i] for i in range(args.batch)]
    images, params = torch.stack([it["image"] for it in items]), torch.stack([it["augment"] for it in items])
    dm.batch_augment(images, params)
    t0 = time.perf_counter()
    for _ in range(10):
        dm.batch_augment(images, params)
    return round((time.perf_counter() - t0) / 10 * 1000, 2)


# -- end to end -----------------------------------------------------------------------------------------
class _PlainPIL(torch.utils.data.Dataset):
    """What a PyTorch user writes: open the PNG with PIL, torchvision transforms, a label tensor."""

    def __init__(self, paths: list[Path], targets: torch.Tensor, size: int) -> None:
        from torchvision import transforms as T

        self.paths, self.targets = paths, targets
        self.tf = T.Compose([
            T.Resize((size, size)), T.RandomAffine(7, translate=(0.04, 0.04), scale=(0.95, 1.05)),
            T.ColorJitter(brightness=0.1, contrast=0.1), T.Grayscale(3), T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ])  # fmt: skip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.tf(im.convert("L")), self.targets[i]


def _plain_epoch(root: Path, args: argparse.Namespace) -> tuple[float, float]:
    """(images/s timed as `perf/images_per_s` times scripts/train.py's epoch, images/s of the whole epoch).

    Lightning starts the training loader's workers and fetches its first batch before
    `on_train_epoch_start`, where `DataWait` starts its clock; the first figure starts this loop's clock
    at the same point (first batch fetched), the second at the loader's creation (worker start included).
    """
    import torchvision

    from medens.data.xray import XRayDataModule

    dm = XRayDataModule(str(root), image_size=args.image_size, val_fraction=0.05, test_fraction=0.05,
                        verify_images=False, cache=False)  # fmt: skip
    dm.setup()
    ds = dm.datasets["train"]
    loader = torch.utils.data.DataLoader(_PlainPIL(ds.paths, ds.targets, args.image_size), batch_size=args.batch,
                                         shuffle=True, num_workers=args.workers, drop_last=True)  # fmt: skip
    torch.manual_seed(0)
    net = getattr(torchvision.models, args.arch)(num_classes=14)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    net.train()
    n, t_start = 0, time.perf_counter()
    it = iter(loader)
    first = next(it)
    t0 = time.perf_counter()
    for x, y in itertools.chain([first], it):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += x.shape[0]
    t1 = time.perf_counter()
    return n / (t1 - t0), n / (t1 - t_start)


def _medens_epoch(root: Path, args: argparse.Namespace, run_root: Path) -> tuple[float, float, float, str]:
    """(images/s of the training batches, data-wait fraction, process seconds, where the training
    augmentation ran) of scripts/train.py."""
    saved = run_root / "saved_models"
    cmd = [
        sys.executable, str(PROJECT_ROOT / "scripts" / "train.py"), "experiment=xray", f"data.root={root}",
        "data/source=xray_nih", "data.verify_images=false",
        f"data.cache.dir={root.parent / f'cache-{root.name}'}", "data.cache.progress=false",
        f"model.net.arch={args.arch}", f"data.image_size={args.image_size}", f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}", "data.val_fraction=0.05", "data.test_fraction=0.05",
        "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "test=false", "logger=none", f"paths.saved_models_dir={saved}",
        f"data.augment_on={args.augment_on}",
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=run_root, env={**os.environ, "MEDENS_ROOT": str(run_root)},
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/train.py failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    wall = time.perf_counter() - t0
    history = read_json_object(saved / "xray" / "training_history.json", "training history", RuntimeError)
    (epoch,) = history["epochs"]
    from medens.checkpoint.io import load_checkpoint

    (ckpt,) = (saved / "xray").glob("*_best.pth")  # where the augmentation ran, as the run recorded it
    where = load_checkpoint(ckpt)["hyperparameters"]["io_contract"]["train_augment_on"]
    return epoch["perf/images_per_s"], epoch["perf/data_wait_fraction"], wall, where


def xray_e2e(args: argparse.Namespace) -> dict[str, Any]:
    import shutil
    import tempfile

    root = _dataset_root(args)
    medens, plain, plain_whole, waits, walls, where = [], [], [], [], [], set()
    for r in range(args.repeats):
        run_root = Path(tempfile.mkdtemp(prefix="medens-e2e-"))
        try:
            ips, wait, wall, augment_ran_on = _medens_epoch(root, args, run_root)
            where.add(augment_ran_on)
        finally:
            shutil.rmtree(run_root, ignore_errors=True)
        medens.append(ips)
        waits.append(wait)
        walls.append(wall)
        same_clock, whole = _plain_epoch(root, args)
        plain.append(same_clock)
        plain_whole.append(whole)
        print(f"repeat {r + 1}: medens {ips:.1f} images/s (data wait {wait:.0%}, process {wall:.0f}s)   "
              f"plain {same_clock:.1f} images/s ({whole:.1f} with worker start-up)", flush=True)  # fmt: skip
    return {
        "benchmark": "xray-e2e", "arch": args.arch, "png_size": args.png_size, "image_size": args.image_size,
        "images": args.images, "workers": args.workers, "batch_size": args.batch, "repeats": args.repeats,
        "medens_images_per_s": medens, "plain_images_per_s": plain, "medens_data_wait_fraction": waits,
        "plain_images_per_s_whole_epoch_incl_worker_start": plain_whole,
        "clock": "both from the first batch fetched (Lightning's on_train_epoch_start) to the end of the last batch",
        "medens_process_seconds": walls, "medens_train_augment_ran_on": sorted(where),
        "medens_median": float(np.median(medens)),
        "plain_median": float(np.median(plain)), "ratio_median": float(np.median(medens) / np.median(plain)),
    }  # fmt: skip


def run(name: str, args: argparse.Namespace) -> Path:
    """Run `xray-data` or `xray-e2e` and write outputs/benchmarks/<name>.json."""
    result = xray_data(args) if name == "xray-data" else xray_e2e(args)
    result["augment_on"] = args.augment_on
    path = write_benchmark_result(args.out, f"{name}.json", result)
    key = "ratio_cache_over_png" if name == "xray-data" else "ratio_median"
    print(f"{name}: {key} = {result[key]:.2f} -> {path}")
    return path
