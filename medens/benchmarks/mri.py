"""MRI benchmarks; results are written as JSON under outputs/benchmarks/.

    python scripts/benchmark.py mri-inference [--overlap 0.5 --sw-batch 1 --repeats 1]
    python scripts/benchmark.py mri-cache [--cases 4 --net default|none --modes none memory disk]

`inference`: whole-volume sliding-window inference of the default experiment's U-Net (composed from
`conf/`, `experiment=mri`: ~19.2M parameters, 128^3 windows, overlap 0.5, Gaussian blending) on one
4x240x240x155 volume: seconds and peak resident memory (`resource.getrusage`, in a fresh process).

`cache`: one training epoch of the default U-Net on synthetic BraTS cases of the real size
(240x240x155, four modalities, generated once under outputs/benchmarks/data/) with each cache mode
of `BraTSDataModule` (`none` decodes every NIfTI every epoch; `memory` decodes once at set-up;
`disk` reads MONAI `PersistentDataset` files). Each mode runs in its own process, modes alternate
`--repeats` times (medians reported); set-up (decode, cache fill) is timed apart from the epoch, and
the time the loop waited on data is reported beside it. `--net none` times the data pipeline alone.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medens.benchmarks.record import PROJECT_ROOT, RESULTS_DIR, compose_config, write_benchmark_result

VOLUME = (240, 240, 155)


def _rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _default_cfg(*overrides: str) -> Any:
    """The default MRI experiment's config, as `python scripts/train.py experiment=mri` composes it."""
    return compose_config(f"paths.root_dir={PROJECT_ROOT}", "experiment=mri", *overrides)


def _n_windows(shape: tuple[int, ...], roi: list[int], overlap: float) -> int:
    n = 1
    for size, r in zip(shape, roi, strict=True):
        step = max(int(r * (1 - overlap)), 1)
        n *= 1 if size <= r else math.ceil((size - r) / step) + 1
    return n


def _inference_child(args: dict[str, Any], queue: Any) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    cfg = _default_cfg(f"model.inferer.overlap={args['overlap']}", f"model.inferer.sw_batch_size={args['sw_batch']}")
    net = instantiate(cfg.model.net).eval()
    inferer = instantiate(cfg.model.inferer)
    x = torch.randn(1, 4, *VOLUME)
    rss_before = _rss_mb()
    times = []
    with torch.inference_mode():
        for _ in range(args["repeats"]):
            t0 = time.perf_counter()
            out = inferer(x, net)
            times.append(time.perf_counter() - t0)
    assert out.shape == (1, 4, *VOLUME)
    roi = list(cfg.model.inferer.roi_size)
    queue.put(
        {
            "benchmark": "mri-inference",
            "volume": [4, *VOLUME],
            "params": sum(p.numel() for p in net.parameters()),
            "net": {k: v for k, v in OmegaConf.to_container(cfg.model.net, resolve=True).items() if k != "_target_"},
            "roi_size": roi,
            "overlap": args["overlap"],
            "sw_batch_size": args["sw_batch"],
            "mode": str(cfg.model.inferer.mode),
            "windows": _n_windows(VOLUME, roi, args["overlap"]),
            "seconds": times,
            "seconds_median": sorted(times)[len(times) // 2],
            "rss_before_inference_mb": round(rss_before, 1),
            "peak_rss_mb": round(_rss_mb(), 1),
        }
    )


def _in_child(target: Any, args: dict[str, Any]) -> dict[str, Any]:
    """Run `target(args, queue)` in a fresh spawned process: clean peak-RSS figures, no shared caches."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if proc.exitcode:
        raise RuntimeError(f"benchmark process failed with exit code {proc.exitcode}")
    return result


def mri_inference(args: argparse.Namespace) -> dict[str, Any]:
    """Sliding-window inference of the default U-Net on one 4x240x240x155 volume."""
    result = _in_child(_inference_child, {"overlap": args.overlap, "sw_batch": args.sw_batch, "repeats": args.repeats})
    print(f"inference {result['seconds_median']:.1f} s ({result['windows']} windows), "
          f"peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
    return result


def _cache_child(args: dict[str, Any], queue: Any) -> None:
    from hydra.utils import instantiate

    from medens.data.mri import BraTSDataModule

    torch.manual_seed(0)
    dm = BraTSDataModule(
        root=args["root"], patch_size=args["patch"], samples_per_volume=args["samples"], batch_size=args["batch"],
        val_fraction=0.0, test_fraction=0.0, cache=args["mode"], cache_dir=args["cache_dir"], seed=0,
    )  # fmt: skip
    t0 = time.perf_counter()
    dm.prepare_data()
    dm.setup("fit")
    setup_s = time.perf_counter() - t0
    net = loss_fn = opt = None
    if args["net"] == "default":
        cfg = _default_cfg()
        net = instantiate(cfg.model.net).train()
        loss_fn = instantiate(cfg.model.loss)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    data_s, steps = 0.0, 0
    t0 = time.perf_counter()
    t_data = time.perf_counter()
    for batch in loader:
        data_s += time.perf_counter() - t_data
        if net is not None:
            loss = loss_fn(net(batch["image"]), batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        steps += 1
        t_data = time.perf_counter()
    epoch_s = time.perf_counter() - t0
    queue.put({"mode": args["mode"], "setup_seconds": round(setup_s, 2), "epoch_seconds": round(epoch_s, 2),
               "data_seconds": round(data_s, 2), "steps": steps, "peak_rss_mb": round(_rss_mb(), 1)})  # fmt: skip


def mri_cache(args: argparse.Namespace) -> dict[str, Any]:
    """One training epoch with each cache mode (ratio of epoch times against `none`)."""
    from medens.data.mri import generate_brats_synthetic
    from medens.data.mri.synthetic import read_marker

    data = Path(args.data_dir) / f"brats_synthetic_{args.cases}x{'x'.join(map(str, VOLUME))}"
    marker = read_marker(data)
    if marker is None or marker["n_cases"] != args.cases:
        print(f"generating {args.cases} synthetic cases of {VOLUME} under {data} ...", flush=True)
        generate_brats_synthetic(data, n_cases=args.cases, shape=VOLUME, seed=0, overwrite=True)
    cache_dir = Path(args.data_dir) / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.modes}
    for _ in range(args.repeats):  # modes alternate, so load from other processes affects all alike
        for mode in args.modes:
            child = {"root": str(data), "mode": mode, "cache_dir": str(cache_dir), "net": args.net,
                     "patch": [args.patch] * 3, "samples": args.samples, "batch": args.batch}  # fmt: skip
            r = _in_child(_cache_child, child)
            runs[mode].append(r)
            print(f"cache={mode}: set-up {r['setup_seconds']:.1f} s, epoch {r['epoch_seconds']:.1f} s "
                  f"(waiting on data {r['data_seconds']:.1f} s), peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
    shutil.rmtree(cache_dir, ignore_errors=True)
    result: dict[str, Any] = {
        "benchmark": "mri-cache",
        "net": args.net,
        "cases": args.cases,
        "volume": [4, *VOLUME],
        "patch_size": [args.patch] * 3,
        "samples_per_volume": args.samples,
        "batch_size": args.batch,
        "repeats": args.repeats,
        "runs": runs,
    }
    for key in ("epoch_seconds", "data_seconds", "setup_seconds"):
        result[f"median_{key}"] = {m: float(np.median([r[key] for r in rs])) for m, rs in runs.items()}
    if "none" in runs:
        med = result["median_epoch_seconds"]
        for mode in runs:
            if mode != "none":
                result[f"epoch_ratio_none_over_{mode}"] = round(med["none"] / med[mode], 3)
    return result


def add_parsers(sub: Any) -> None:
    """Register `mri-inference` and `mri-cache` on the benchmark entry point's subparsers."""
    p = sub.add_parser("mri-inference", help="default U-Net, sliding window over a 4x240x240x155 volume")
    _options(p, "inference")
    p.set_defaults(_run=lambda args: run("inference", args))
    p = sub.add_parser("mri-cache", help="one training epoch per BraTS cache mode")
    _options(p, "cache")
    p.set_defaults(_run=lambda args: run("cache", args))


def _options(p: argparse.ArgumentParser, name: str) -> None:
    if name == "inference":
        p.add_argument("--overlap", type=float, default=0.5)
        p.add_argument("--sw-batch", type=int, default=1)
        p.add_argument("--repeats", type=int, default=1)
    else:
        p.add_argument("--cases", type=int, default=4)
        p.add_argument("--net", choices=["default", "none"], default="default")
        p.add_argument("--modes", nargs="+", choices=["none", "memory", "disk"], default=["none", "memory", "disk"])
        p.add_argument("--patch", type=int, default=128)
        p.add_argument("--samples", type=int, default=2)
        p.add_argument("--batch", type=int, default=1)
        p.add_argument("--repeats", type=int, default=1)
        p.add_argument("--data-dir", default=str(RESULTS_DIR / "data"))
    p.add_argument("--out", default=str(RESULTS_DIR))


def run(name: str, args: argparse.Namespace) -> Path:
    """Run benchmark `name` (`inference` or `cache`) and write `outputs/benchmarks/mri-<name>[-...].json`."""
    result = mri_inference(args) if name == "inference" else mri_cache(args)
    suffix = f"-{args.net}" if name == "cache" else ""
    path = write_benchmark_result(args.out, f"mri-{name}{suffix}.json", result)
    print(json.dumps(result))
    print(f"-> {path}")
    return path
