"""CPU latency of the production exports against eager PyTorch; JSON under outputs/benchmarks/.

    OMP_NUM_THREADS=1 python scripts/benchmark.py export --threads 1 [--models xray ct --batches 1 32]
        [--repeats 10 --xray-ckpt saved_models/xray/resnet50_best.pth
         --ct-ckpt saved_models/ct/3dcnn_best.pth]

On a CPU shared with other jobs use one thread: with more OpenMP threads than free cores, eager PyTorch
(and TorchScript) slow down up to tenfold while onnxruntime's own thread pool does not, which would
exaggerate the gap between them.

Networks: X-ray ResNet-50 (3x224x224 in, 14 logits out) and the default CT network of conf/model/ct.yaml
(MONAI 3D ResNet-18, 33M parameters, 1x64x64x64 in). Without checkpoints the weights are random, with
BatchNorm statistics from a few random batches (as after training: outputs O(1), so the differences mean
something). Each network is exported with `medens.export.export_module` (TorchScript trace, ONNX through
the dynamo exporter at opset 18, torch.export) into a temporary folder, verified there as in production,
and then timed in this process: eager, TorchScript, onnxruntime (CPU provider, as many threads as torch)
and the torch.export program, on the same seeded input. Backends run round-robin (one call each per
round) after warm-up, so load from other processes on a shared CPU falls on all alike; the median per
cell is reported, with the max abs difference of each export's output from eager at that batch.
A round stops being repeated after `--repeats` rounds, or after `--budget-s` seconds once `--min-repeats`
rounds are done (the CT network at batch 32 takes about a minute per call on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

import medens  # noqa: F401  (registers resolvers)
from medens.benchmarks.record import PROJECT_ROOT, RESULTS_DIR, write_benchmark_result
from medens.export import export_module, load_runner, load_source_network
from medens.models.xray import build_resnet

BACKENDS = {"torchscript": "torchscript_trace", "onnxruntime": "onnx", "torch.export": "torch_export"}
SUFFIX = {"torchscript_trace": "pt", "onnx": "onnx", "torch_export": "pt2"}


def calibrate_batchnorm(net: nn.Module, shape: tuple[int, ...], batches: int = 2, batch: int = 4) -> None:
    """Running BatchNorm statistics from random batches, so that a random-init network's outputs are O(1)."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        net.train()
        for _ in range(batches):
            net(torch.randn((batch, *shape), generator=gen))
    net.eval()


def build(model: str, ckpt: str | None) -> tuple[nn.Module, tuple[int, ...], str]:
    """(network, input shape without batch, description)."""
    if ckpt:
        source = load_source_network(ckpt, model)
        return source.net, tuple(source.input_shape), f"weights of {ckpt}"
    torch.manual_seed(0)
    if model == "xray":
        net, shape = build_resnet("resnet50", num_classes=14, in_channels=3), (3, 224, 224)
    else:
        net_cfg = OmegaConf.load(PROJECT_ROOT / "conf/model/ct.yaml").net
        net, shape = instantiate(net_cfg), (int(net_cfg.n_input_channels), 64, 64, 64)
    calibrate_batchnorm(net, shape)
    return net.eval(), shape, "random init, BatchNorm statistics from 2 random batches of 4"


def time_cell(
    runners: dict[str, Callable[[torch.Tensor], np.ndarray]],
    x: torch.Tensor,
    warmup: int,
    repeats: int,
    min_repeats: int,
    budget_s: float,
) -> dict[str, dict[str, Any]]:
    """Round-robin timing of every backend on `x`; outputs compared with the eager one."""
    outputs = {}
    for name, run in runners.items():
        for _ in range(warmup):
            outputs[name] = run(x)
    times: dict[str, list[float]] = {name: [] for name in runners}
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats and (rounds < min_repeats or time.perf_counter() - start < budget_s):
        for name, run in runners.items():
            t0 = time.perf_counter()
            outputs[name] = run(x)
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    ref = outputs["eager"]
    result = {}
    for name, ts in times.items():
        median = float(np.median(ts)) * 1000
        result[name] = {
            "median_ms": round(median, 2),
            "min_ms": round(min(ts) * 1000, 2),
            "ms_per_sample": round(median / x.shape[0], 2),
            "runs": len(ts),
            "max_abs_diff_vs_eager": float(np.abs(outputs[name] - ref).max()),
        }
    result["eager"]["max_abs_output"] = float(np.abs(ref).max())
    return result


def add_parsers(sub: Any) -> None:
    """Register `export` on the benchmark entry point's subparsers."""
    parser = sub.add_parser("export", help="CPU latency of the production exports against eager PyTorch")
    parser.add_argument("--models", nargs="+", default=["xray", "ct"], choices=["xray", "ct"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--min-repeats", type=int, default=3)
    parser.add_argument(
        "--budget-s", type=float, default=60.0, help="per (model, batch) cell, after min-repeats"
    )
    parser.add_argument("--xray-ckpt", default=None)
    parser.add_argument("--ct-ckpt", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch (and onnxruntime) intra-op threads")
    parser.add_argument("--out", default=str(RESULTS_DIR / "export_latency.json"))
    parser.set_defaults(_run=run)


def run(args: argparse.Namespace) -> Path:
    """Export, verify and time each network; write `--out` (outputs/benchmarks/export_latency.json)."""
    if args.threads:
        torch.set_num_threads(args.threads)

    report: dict[str, Any] = {
        "benchmark": "export-latency",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "host": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
        },
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "note": "median over round-robin repeats in one process; the CPU may be shared with other jobs",
        "models": {},
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="medens_export_bench_") as tmp:
        for model in args.models:
            net, shape, weights = build(model, getattr(args, f"{model}_ckpt"))
            entry: dict[str, Any] = {
                "network": type(net).__name__,
                "parameters": sum(p.numel() for p in net.parameters()),
                "input_shape": ["batch", *shape],
                "weights": weights,
                "exports": {},
                "latency": {},
            }
            example = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0))
            runners: dict[str, Callable[[torch.Tensor], np.ndarray]] = {}

            def eager(x: torch.Tensor, net: nn.Module = net) -> np.ndarray:
                with torch.no_grad():
                    return net(x).numpy()

            runners["eager"] = eager
            for backend, kind in BACKENDS.items():
                path = Path(tmp) / f"{model}_{kind}.{SUFFIX[kind]}"
                t0 = time.perf_counter()
                result = export_module(net, example, kind, path, verify_batches=(1, 3))
                entry["exports"][backend] = {
                    "kind": kind,
                    "export_and_verify_s": round(time.perf_counter() - t0, 1),
                    "size_mb": round(path.stat().st_size / 1e6, 1),
                    "verification": result.checks,
                }
                run = load_runner(kind, path)
                runners[backend] = lambda x, run=run: run((x,))[0]
                print(f"{model}: {backend} exported and verified in {time.perf_counter() - t0:.1f} s")
            for batch in args.batches:
                x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(batch))
                warmup = 2 if batch * int(np.prod(shape)) <= 3 * 224 * 224 * 8 else 1
                t0 = time.perf_counter()
                cell = time_cell(runners, x, warmup, args.repeats, args.min_repeats, args.budget_s)
                cell["_warmup_runs"] = warmup
                entry["latency"][str(batch)] = cell
                print(f"{model} batch {batch}: timed in {time.perf_counter() - t0:.0f} s")
                for backend in runners:
                    c = cell[backend]
                    rows.append((model, batch, backend, c["median_ms"], c["ms_per_sample"], c["runs"],
                                 c["max_abs_diff_vs_eager"]))  # fmt: skip
            report["models"][model] = entry
            del runners, net

    out = write_benchmark_result(Path(args.out).parent, Path(args.out).name, report)
    header = f"{'model':<5} {'batch':>5}  {'backend':<12} {'median ms':>10} {'ms/sample':>10} {'runs':>4}"
    header += "  max|diff| vs eager"
    print("\n" + header + "\n" + "-" * len(header))
    for model, batch, backend, med, per, runs, diff in rows:
        print(f"{model:<5} {batch:>5}  {backend:<12} {med:>10.1f} {per:>10.1f} {runs:>4}  {diff:.2e}")
    print(f"\nthreads: {report['threads']}; written {out}")
    return out
