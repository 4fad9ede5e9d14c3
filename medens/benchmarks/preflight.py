"""`python scripts/benchmark.py preflight`: the preflight round trip's cost as a fraction of one epoch.

Trains the default X-ray experiment (`experiment=xray`: ResNet-50, 224 px, the embedded synthetic NIH
set) for one epoch in a scratch folder and reads the preflight's own timings and the epoch's. With
`--limit-train-batches N` only N training batches run and the epoch is extrapolated: measured seconds
per training batch x the full epoch's batch count + the measured validation time (explained in the JSON).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from medens.benchmarks.record import RESULTS_DIR, compose_config, write_benchmark_result


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `preflight` on the benchmark entry point's subparsers."""
    p = sub.add_parser("preflight", help="preflight round-trip cost vs one epoch of the default X-ray run")
    p.add_argument("--limit-train-batches", type=int, default=None, help="run N batches and extrapolate")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--root", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--override", action="append", default=[], help="extra Hydra overrides")
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.set_defaults(_run=run)


def run(args: argparse.Namespace) -> dict:
    from omegaconf import open_dict

    import medens  # noqa: F401  (resolvers)
    from medens.training.preflight import EpochTimer, Preflight
    from medens.training.train import train

    root = Path(args.root or tempfile.mkdtemp(prefix="medens-preflight-bench-"))
    overrides = [f"paths.root_dir={root}", f"paths.output_dir={root}/run", "experiment=xray",
                 "trainer.max_epochs=1", "test=false", "logger=none", "trainer.enable_progress_bar=false",
                 f"trainer.accelerator={args.accelerator}", *args.override]  # fmt: skip
    if args.limit_train_batches:
        overrides.append(f"trainer.limit_train_batches={args.limit_train_batches}")
    cfg = compose_config(*overrides)
    with open_dict(cfg):
        cfg.callbacks.epoch_timer = {"_target_": "medens.training.preflight.EpochTimer"}
    _, objects = train(cfg)
    trainer = objects["trainer"]
    pre = next(cb for cb in trainer.callbacks if isinstance(cb, Preflight)).timings or {}
    timer = next(cb for cb in trainer.callbacks if isinstance(cb, EpochTimer))
    full_batches = len(objects["datamodule"].train_dataloader())
    per_batch = timer.train_seconds / max(1, timer.train_batches)
    measured_epoch = timer.train_seconds + timer.val_seconds
    epoch = per_batch * full_batches + timer.val_seconds if args.limit_train_batches else measured_epoch
    result = {
        "name": "preflight",
        "experiment": "xray (ResNet-50, 224 px, synthetic NIH default)",
        "preflight_seconds": pre.get("total"),
        "preflight_breakdown_s": {k: v for k, v in pre.items() if k != "bytes"},
        "checkpoint_mb": round(pre.get("bytes", 0) / 1e6, 1),
        "epoch_seconds": round(epoch, 3),
        "epoch": {
            "train_batches_run": timer.train_batches,
            "train_batches_full": full_batches,
            "train_seconds": round(timer.train_seconds, 3),
            "val_seconds": round(timer.val_seconds, 3),
            "extrapolated": bool(args.limit_train_batches),
            "how": "seconds per training batch x full batch count + measured validation"
            if args.limit_train_batches
            else "one full epoch measured",
        },  # fmt: skip
        "fraction_of_epoch": round(pre.get("total", 0) / epoch, 4) if epoch else None,
        "target": "< 0.02",
        "device": str(trainer.strategy.root_device),
    }
    path = write_benchmark_result(args.out, "preflight.json", result)
    print(json.dumps(result, indent=2))
    print(
        f"preflight {result['preflight_seconds']:.2f}s = {result['fraction_of_epoch']:.2%} of one epoch -> {path}"
    )
    return result
