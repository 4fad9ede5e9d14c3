"""CT patch-cache benchmark; the result is written as JSON under outputs/benchmarks/.

    python scripts/benchmark.py ct-cache [--epochs 2 --net light|default|none --patients 40 --scan-shape 112 112 96]

On the default synthetic LUNA16-format set (the `experiment=ct` data config: 64^3 patches at 1 mm), one
training epoch is timed twice over the same nodules, with the same augmentation and loader:
- cached: patches read from the on-disk cache (`CTDataModule`, what training uses);
- uncached: every item re-reads its scan (`.mhd`/`.raw`) and resamples its patch, as a pipeline without
  the cache would each epoch.
`--net none` times the data pipeline alone; `light` adds forward/backward of a small 3D ResNet-18
(widths 16-128, the `ct_lidc_voi` network); `default` the 33M-parameter one (minutes per epoch on a CPU).
Epochs alternate (cached, uncached, ...) so load from other processes affects both alike; the
one-off cache build (into a fresh folder, removed afterwards) is reported separately.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from monai.networks.nets import resnet18
from omegaconf import OmegaConf
from torch.utils.data import Dataset

import medens  # noqa: F401  (registers resolvers)
from medens.benchmarks.record import PROJECT_ROOT, RESULTS_DIR, compose_config, write_benchmark_result
from medens.data.ct import io as ct_io
from medens.data.ct.cache import extract_record_patches
from medens.data.ct.datamodule import CTDataModule
from medens.data.ct.sources import ErrorPolicy
from medens.data.ct.synthetic import ensure_luna16_synthetic
from medens.data.loaders import make_loader


class ScanPatchDataset(Dataset):
    """The cached dataset's items, rebuilt from the scans on every access (no cache)."""

    def __init__(self, dm: CTDataModule, split: str = "train") -> None:
        cached = dm.datasets[split]
        self.records, self.labels, self.transform = cached.records, cached.labels, cached.transform
        self.patch_config = dm.patch_config

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        scan = ct_io.read_scan(rec.source_file)
        ((_, patch),) = extract_record_patches(scan, [rec], self.patch_config, ErrorPolicy("error"))
        x = torch.from_numpy(patch.astype(np.float16).astype(np.float32))  # same precision as the cache
        if self.transform is not None:
            x = self.transform(x)
        return {"image": x.contiguous(), "label": torch.tensor(self.labels[i], dtype=torch.float32)}


def build_net(kind: str, channels: int) -> torch.nn.Module | None:
    if kind == "none":
        return None
    if kind == "light":
        return resnet18(spatial_dims=3, n_input_channels=channels, num_classes=1, widen_factor=0.25,
                        conv1_t_size=3, conv1_t_stride=2)  # fmt: skip
    return resnet18(spatial_dims=3, n_input_channels=channels, num_classes=1)


def time_epoch(loader: Any, net: torch.nn.Module | None, epoch: int) -> float:
    """Seconds for one pass over the loader (with a training step per batch when a net is given)."""
    loader.sampler.set_epoch(epoch)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4) if net is not None else None
    t0 = time.perf_counter()
    for batch in loader:
        if net is not None:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                net(batch["image"])[:, 0], batch["label"]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def add_parsers(sub: Any) -> None:
    """Register `ct-cache` on the benchmark entry point's subparsers."""
    parser = sub.add_parser("ct-cache", help="one CT training epoch with the patch cache vs re-reading scans")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per mode")
    parser.add_argument("--net", choices=["none", "light", "default"], default="light")
    parser.add_argument(
        "--patients", type=int, default=None, help="synthetic patients (default: data config)"
    )
    parser.add_argument(
        "--scan-shape", type=int, nargs=3, default=None, help="synthetic scan size, e.g. 256 256 160"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workdir", default=str(RESULTS_DIR / "ct_cache_work"))
    parser.set_defaults(_run=run)


def run(args: argparse.Namespace) -> Path:
    """Time cached vs uncached epochs; write outputs/benchmarks/ct_patch_cache_<time>.json."""
    torch.manual_seed(0)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(tempfile.mkdtemp(prefix="cache-", dir=work))  # fresh: the build is timed every run
    overrides = ["experiment=ct", f"paths.root_dir={PROJECT_ROOT}", f"data.cache_dir={cache_dir}", "paths.output_dir=.",
                 f"data.batch_size={args.batch_size}", "data.val_fraction=0.0", "data.test_fraction=0.0"]  # fmt: skip
    if args.patients or args.scan_shape:  # a set of its own, beside the default one
        shape = args.scan_shape or [112, 112, 96]
        overrides += [f"data.source.generator.scan_shape=[{','.join(map(str, shape))}]",
                      f"data.root={work}/ct_synthetic_{'x'.join(map(str, shape))}_{args.patients or 'default'}"]  # fmt: skip
        if args.patients:
            overrides.append(f"data.source.generator.n_patients={args.patients}")
    cfg = compose_config(*overrides)
    dm: CTDataModule = hydra.utils.instantiate(cfg.data)
    t0 = time.perf_counter()
    ensure_luna16_synthetic(dm.root, **dm.reader.generator)  # generated on first use only
    generate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dm.prepare_data()
    cache_build_s = time.perf_counter() - t0  # every patch of every nodule, each scan read once
    dm.setup("fit")
    loaders = {
        "cached": dm.train_dataloader(),
        "uncached": make_loader(
            ScanPatchDataset(dm),
            batch_size=dm.batch_size,
            shuffle=True,
            seed=dm.seed,
            num_workers=dm.num_workers,
            drop_last=True,
        ),  # fmt: skip
    }
    net = build_net(args.net, dm.num_channels)
    time_epoch(loaders["cached"], net, epoch=99)  # warm-up (allocator, page cache of both)
    times: dict[str, list[float]] = {"cached": [], "uncached": []}
    for epoch in range(args.epochs):
        for mode in ("cached", "uncached"):
            times[mode].append(time_epoch(loaders[mode], net, epoch))
            print(f"epoch {epoch} {mode}: {times[mode][-1]:.2f} s", flush=True)
    med = {m: float(np.median(v)) for m, v in times.items()}
    result = {
        "benchmark": "ct-patch-cache",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "torch_threads": torch.get_num_threads(),
        "net": args.net,
        "n_train_nodules": len(dm.datasets["train"]),
        "n_scans": len({r.source_file for r in dm.datasets["train"].records}),
        "scan_shape": list(cfg.data.source.generator.scan_shape),
        "patch_size": dm.patch_config.patch_size,
        "batch_size": dm.batch_size,
        "generator": OmegaConf.to_container(cfg.data.source.generator, resolve=True),
        "generate_seconds": round(generate_s, 2),
        "cache_build_seconds": round(cache_build_s, 2),
        "epoch_seconds": {m: [round(t, 3) for t in v] for m, v in times.items()},
        "median_epoch_seconds": med,
        "speedup_uncached_over_cached": med["uncached"] / med["cached"],
    }
    shutil.rmtree(cache_dir, ignore_errors=True)
    out = write_benchmark_result(RESULTS_DIR, f"ct_patch_cache_{datetime.now():%Y%m%d_%H%M%S}.json", result)
    print(
        json.dumps({k: result[k] for k in ("median_epoch_seconds", "speedup_uncached_over_cached")}, indent=2)
    )
    print(f"-> {out}")
    return out
