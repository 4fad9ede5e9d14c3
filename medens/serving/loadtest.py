"""`scripts/benchmark.py serve-load`: N concurrent clients for a fixed time against the X-ray endpoint.

For each `--batch-sizes` value a fresh `scripts/serve.py model=xray max_batch_size=<b>` is started on a free
port (same exports, same threads), warmed up, then `--clients` threads each send the same PNG in a loop on
a keep-alive connection for `--duration` seconds. Reported per run: requests/s, p50/p95/p99 latency, error
and 5xx counts, the server's batch-size histogram and the 1-minute load average; overall, the throughput
ratio of the largest batch size to batch size 1 (target >= 1.5 at 16 clients, with zero errors). The
default order `1,8,8,1` (A B B A) interleaves the settings so that a change in the machine's load during
the benchmark weighs on both alike; each setting's requests/s is the mean of its runs.

After the servers stop, the served export's forward pass alone (the server's own `run_batch`, no HTTP or
decoding) is timed at each batch size: milliseconds per image, and their ratio, the most that batching
can gain on this machine when its cores are already busy at batch size 1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from medens.benchmarks.record import PROJECT_ROOT, RESULTS_DIR, write_benchmark_result


def add_parsers(sub: Any) -> None:
    """Register `serve-load` on the benchmark entry point's subparsers."""
    p = sub.add_parser("serve-load", help="concurrent clients against scripts/serve.py model=xray")
    p.add_argument("--root", default=os.environ.get("MEDENS_ROOT", str(PROJECT_ROOT)),
                   help="project root whose saved_models/exports holds an X-ray export")  # fmt: skip
    p.add_argument("--image", default=None, help="PNG/JPEG to send (default: a synthetic radiograph)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=60.0, help="seconds per batch-size setting")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--batch-sizes", default="1,8,8,1",
                   help="max_batch_size of each run, in order (repeats are averaged: A B B A)")  # fmt: skip
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=None, help="server intra-op threads (default: all cores)")
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.set_defaults(_run=run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image(path: str | None) -> bytes:
    if path:
        return Path(path).read_bytes()
    import io

    from PIL import Image

    from medens.data.synthetic_xray import render_chest, sample_findings

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(render_chest(sample_findings(rng), 512, rng)).save(buf, format="PNG")
    return buf.getvalue()


def _start(root: Path, batch: int, wait_ms: float, threads: int | None) -> tuple[subprocess.Popen, int, Path]:
    port = _free_port()
    log = root / "outputs" / "benchmarks" / f"serve-load_b{batch}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, str(PROJECT_ROOT / "scripts" / "serve.py"), "model=xray", f"port={port}", "host=127.0.0.1",
            f"max_batch_size={batch}", f"max_wait_ms={wait_ms}", f"hydra.run.dir={log.parent}/serve-load_b{batch}"]  # fmt: skip
    if threads:
        args.append(f"threads={threads}")
    proc = subprocess.Popen(args, cwd=root, stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            env={**os.environ, "MEDENS_ROOT": str(root)}, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return proc, port, log
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"serve.py did not start: {log.read_text()[-3000:]}")
        time.sleep(0.3)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _clients(port: int, body: bytes, clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/invocations", body=body, headers={"Content-Type": "image/png"})
                resp = conn.getresponse()
                resp.read()
                key = str(resp.status)
            except (OSError, http.client.HTTPException) as exc:
                key = type(exc).__name__
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            dt = time.perf_counter() - t0
            with lock:
                statuses[key] = statuses.get(key, 0) + 1
                if key == "200":
                    latencies.append(dt)
        conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    ok = statuses.get("200", 0)
    lat = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
    return {
        "requests_ok": ok,
        "errors": sum(v for k, v in statuses.items() if k != "200"),
        "status_5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
        "statuses": statuses,
        "seconds": round(elapsed, 2),
        "requests_per_s": round(ok / elapsed, 3),
        "latency_ms": {
            q: round(float(np.percentile(lat, p)), 1) for q, p in (("p50", 50), ("p95", 95), ("p99", 99))
        },
    }


def forward_ms_per_image(root: Path, sizes: list[int], threads: int | None) -> dict[int, float]:
    """Median milliseconds per image of the served X-ray export's `run_batch` at each batch size."""
    import torch

    from medens.serving.cli import cpu_cores
    from medens.serving.models import ServedModel, resolve_bundle

    torch.set_num_threads(threads or cpu_cores())
    saved = root / "saved_models"
    served = ServedModel("xray", resolve_bundle("xray", None, saved, saved / "exports"), ["onnx", "torchscript", "export"])
    x = torch.zeros([int(v) for v in served.io_contract["input_shape"]])
    out = {}
    for b in sorted(set(sizes)):
        items = [x] * b
        served.run_batch("xray", items)  # warm-up: the first call compiles and allocates
        times = []
        for _ in range(max(3, 24 // b)):
            t0 = time.perf_counter()
            served.run_batch("xray", items)
            times.append((time.perf_counter() - t0) / b)
        out[b] = round(float(np.median(times)) * 1000, 1)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark, write `serve-load.json` under `--out`, print a summary; returns the result."""
    root = Path(args.root).resolve()
    body = _image(args.image)
    sizes = [int(b) for b in str(args.batch_sizes).split(",")]
    runs = []
    for b in sizes:
        proc, port, log = _start(root, b, args.max_wait_ms, args.threads)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/info", timeout=10) as r:
                info = json.loads(r.read())
            _clients(port, body, args.clients, args.warmup)
            res = _clients(port, body, args.clients, args.duration)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as r:
                res["server_batches"] = json.loads(r.read())
        finally:
            _stop(proc)
        res.update(max_batch_size=b, max_wait_ms=args.max_wait_ms, load_average_1min=os.getloadavg()[0])
        runs.append(res)
        print(f"max_batch_size={b}: {res['requests_per_s']:.2f} req/s, p50 {res['latency_ms']['p50']} ms, "
              f"p95 {res['latency_ms']['p95']} ms, p99 {res['latency_ms']['p99']} ms, errors {res['errors']}, "
              f"5xx {res['status_5xx']}", flush=True)  # fmt: skip
    mean_rps = {
        b: round(float(np.mean([r["requests_per_s"] for r in runs if r["max_batch_size"] == b])), 3)
        for b in dict.fromkeys(sizes)
    }
    largest = max(sizes)
    forward = forward_ms_per_image(root, sizes, args.threads)
    result = {
        "benchmark": "serve-load",
        "model": {k: info.get(k) for k in ("model_name", "export", "file", "sha256", "version", "optimized")},
        "input_shape": (info.get("io_contract") or {}).get("input_shape"),
        "clients": args.clients,
        "duration_s": args.duration,
        "image_bytes": len(body),
        "runs": runs,
        "requests_per_s_by_batch_size": mean_rps,
        "batching_speedup": round(mean_rps[largest] / mean_rps[1], 3) if mean_rps.get(1) else None,
        "zero_errors": all(r["errors"] == 0 for r in runs),
        "forward_ms_per_image_by_batch_size": forward,
        # the speed-up batching gives the forward pass alone: the load speed-up's ceiling on a busy CPU
        "forward_batching_ceiling": round(forward[1] / forward[largest], 3) if 1 in forward else None,
    }
    path = write_benchmark_result(args.out, "serve-load.json", result)
    print(
        f"batching speed-up (max_batch_size={largest} vs 1, mean of runs): {result['batching_speedup']}; "
        f"forward pass alone: {forward} ms per image, ceiling {result['forward_batching_ceiling']} -> {path}"
    )
    return result
