"""One GPU check: `bash scripts/gpu_check.sh` (= `scripts/benchmark.py gpu-check`) prints ONE JSON doc.

Measured on one GPU, each with its peak memory (`torch.cuda.max_memory_allocated`):
- ResNet-50 at 224 px, training images/s: the medens X-ray module under a Lightning Trainer
  (bf16-mixed, channels_last; eager and `model.compile=true`) and a plain PyTorch loop (bf16 autocast,
  channels_last; eager and `torch.compile`), on the same in-memory batches;
- training step time of the CT 3D ResNet-18 at 64^3 and of the MRI U-Net at 128^3, networks, loss and
  batch sizes from medens' own configs (`experiment=ct`, `experiment=mri`);
- whole-volume sliding-window MRI inference on 240x240x155 with 4 modalities (the MRI config's inferer).

Where no GPU exists it prints `{"gpu": false, "reason": ...}` and exits 0. `--device cpu --tiny` runs the
same code on toy sizes (what the test does), so the GPU path is exercised without a GPU. A time budget
(`--budget-s`, default 420 s) skips the sections that would not fit, saying so, so the check stays
within 8 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def _compose(experiment: str, overrides: list[str], root: str) -> Any:
    """medens' own config of an experiment (networks, loss, inferer, batch sizes come from it)."""
    from medens.benchmarks.record import compose_config

    return compose_config(f"experiment={experiment}", f"paths.root_dir={root}", f"paths.output_dir={root}", *overrides)


class _Peak:
    """Peak GPU memory of one section (None on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> _Peak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def bytes(self) -> int | None:
        return int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device) -> Any:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _time_steps(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per step after `warmup` steps (the first ones include compilation and allocator growth)."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


# --------------------------------------------------------------------------------------------- X-ray


def _xray_batches(n: int, batch: int, size: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
        y = (torch.rand(batch, 14, generator=g) < 0.2).float().to(device)
        out.append((x, y))
    return out


def plain_xray(cfg: Any, batches: list, warmup: int, steps: int, device: torch.device, compile_backend: str | None) -> dict:
    """The same network and optimizer as the medens module, in a bare loop."""
    import hydra.utils

    torch.manual_seed(0)
    net = hydra.utils.instantiate(cfg.model.net).to(device).to(memory_format=torch.channels_last).train()
    opt = hydra.utils.instantiate(cfg.model.optimizer)(params=net.parameters())
    fwd = torch.compile(net, backend=compile_backend) if compile_backend else net
    loss_fn = nn.BCEWithLogitsLoss()
    it = iter(range(10**9))

    def step() -> None:
        x, y = batches[next(it) % len(batches)]
        with _autocast(device):
            loss = loss_fn(fwd(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with _Peak(device) as peak:
        sec = _time_steps(step, warmup, steps, device)
    batch = batches[0][0].shape[0]
    return {"images_per_s": round(batch / sec, 2), "step_seconds": round(sec, 5), "peak_memory_bytes": peak.bytes}


def medens_xray(cfg: Any, batches: list, warmup: int, steps: int, device: torch.device, compile_backend: str | None) -> dict:
    """The medens X-ray LightningModule (`experiment=xray`'s model config) under a Lightning Trainer."""
    import hydra.utils
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, Dataset

    class _Batches(Dataset):
        def __len__(self) -> int:
            return warmup + steps

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            x, y = batches[i % len(batches)]
            return {"image": x, "label": y}

    class _Timer(pl.Callback):
        t0: float | None = None
        t1: float | None = None

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == warmup:
                _sync(device)
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == warmup + steps - 1:
                _sync(device)
                self.t1 = time.perf_counter()

    torch.manual_seed(0)
    inductor = compile_backend == "inductor"
    model = hydra.utils.instantiate(cfg.model, scheduler=None, channels_last=True, compile=inductor)
    if compile_backend and not inductor:  # what `model.compile=true` does, with another backend
        model.net.compile(backend=compile_backend)
    timer = _Timer()
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision="bf16-mixed",
        max_steps=warmup + steps, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[timer],
    )  # fmt: skip
    loader = DataLoader(_Batches(), batch_size=None, shuffle=False)
    with _Peak(device) as peak:
        trainer.fit(model, train_dataloaders=loader)
    if timer.t0 is None or timer.t1 is None:
        raise RuntimeError("the medens module did not run the timed steps")
    sec = (timer.t1 - timer.t0) / steps
    batch = batches[0][0].shape[0]
    return {"images_per_s": round(batch / sec, 2), "step_seconds": round(sec, 5), "peak_memory_bytes": peak.bytes}


# ----------------------------------------------------------------------------------------- 3D nets


def train_step_3d(net: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, opt_factory: Callable,
                  warmup: int, steps: int, device: torch.device) -> dict:  # fmt: skip
    net = net.to(device).train()
    opt = opt_factory(params=net.parameters())

    def step() -> None:
        with _autocast(device):
            out = net(x)
        loss = loss_fn(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with _Peak(device) as peak:
        sec = _time_steps(step, warmup, steps, device)
    return {"step_seconds": round(sec, 5), "input_shape": list(x.shape), "peak_memory_bytes": peak.bytes}


def sliding_window(cfg: Any, volume: tuple[int, int, int], device: torch.device, repeats: int) -> dict:
    """Whole-volume inference with the MRI config's `SlidingWindowInferer` (ROI, overlap, Gaussian blend)."""
    import hydra.utils

    net = hydra.utils.instantiate(cfg.model.net).to(device).eval()
    inferer = hydra.utils.instantiate(cfg.model.inferer)
    x = torch.randn(1, int(cfg.model.net.in_channels), *volume, device=device)
    with torch.inference_mode(), _autocast(device):
        inferer(x, net)  # warm-up
        with _Peak(device) as peak:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(repeats):
                out = inferer(x, net)
            _sync(device)
    sec = (time.perf_counter() - t0) / repeats
    return {
        "seconds": round(sec, 4), "input_shape": list(x.shape), "output_shape": list(out.shape),
        "roi_size": list(inferer.roi_size), "overlap": inferer.overlap, "peak_memory_bytes": peak.bytes,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- main


def no_gpu_doc() -> dict | None:
    """The clean "no GPU here" answer, or None when CUDA is usable."""
    if torch.cuda.is_available():
        return None
    import os

    reason = (
        f"no CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build "
        f"{torch.version.cuda}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
    )
    return {"gpu": False, "reason": reason, "host": platform.node(), "torch": torch.__version__}


def run(args: argparse.Namespace) -> dict:
    """All sections, in a scratch folder (configs' output and cache dirs) that is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="medens_gpu_check_", ignore_cleanup_errors=True) as root:
        return _run_sections(args, root)


def _run_sections(args: argparse.Namespace, root: str) -> dict:
    """All sections; a section that would exceed the time budget is skipped and named."""
    device = torch.device(args.device)
    tiny = args.tiny
    start = time.perf_counter()
    doc: dict[str, Any] = {
        "gpu": device.type == "cuda",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "tiny": tiny, "torch": torch.__version__, "cuda": torch.version.cuda, "host": platform.node(),
        "precision": "bf16 autocast", "memory_format": "channels_last (2D)",
    }  # fmt: skip
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    backend = args.compile_backend
    warmup, steps = (1, 2) if tiny else (args.warmup, args.steps)

    def section(name: str, fn: Callable[[], dict]) -> None:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            doc[name] = {"skipped": f"time budget of {args.budget_s} s used ({elapsed:.0f} s)"}
            _log(f"{name}: skipped (budget)")
            return
        _log(f"{name} ...")
        t0 = time.perf_counter()
        try:
            doc[name] = fn()
        except Exception as exc:  # one failing section must not lose the others' numbers
            doc[name] = {"error": f"{type(exc).__name__}: {exc}"}
        doc[name]["wall_seconds"] = round(time.perf_counter() - t0, 2)
        _log(f"{name}: {doc[name]}")

    size, batch = (32, 2) if tiny else (224, args.xray_batch)
    xcfg = _compose("xray", ["model.net.arch=resnet18" if tiny else "model.net.arch=resnet50"], root)
    batches = _xray_batches(4, batch, size, device)
    xray: dict[str, Any] = {"arch": xcfg.model.net.arch, "image_size": size, "batch": batch}
    doc["resnet50_training"] = xray
    for key, fn, comp in (
        ("medens_module", medens_xray, None),
        ("plain_loop", plain_xray, None),
        ("medens_module_compiled", medens_xray, backend),
        ("plain_loop_compiled", plain_xray, backend),
    ):
        if comp is None and key.endswith("compiled"):
            continue
        section(f"_x_{key}", functools.partial(fn, xcfg, batches, warmup + (2 if comp else 0), steps, device, comp))
        xray[key] = doc.pop(f"_x_{key}")
    if "images_per_s" in xray.get("medens_module", {}) and "images_per_s" in xray.get("plain_loop", {}):
        xray["medens_vs_plain"] = round(xray["medens_module"]["images_per_s"] / xray["plain_loop"]["images_per_s"], 3)
    del batches

    ct_over = ["model.net.widen_factor=0.25", "data.patch_size=16", "data.batch_size=2"] if tiny else []
    ccfg = _compose("ct", ct_over, root)

    def ct() -> dict:
        import hydra.utils

        p, b = int(ccfg.data.patch_size), int(ccfg.data.batch_size)
        x = torch.randn(b, int(ccfg.model.net.n_input_channels), p, p, p, device=device)
        y = (torch.rand(b, 1, device=device) < 0.5).float()
        net = hydra.utils.instantiate(ccfg.model.net)
        res = train_step_3d(net, nn.BCEWithLogitsLoss(), x, y, hydra.utils.instantiate(ccfg.model.optimizer),
                            warmup, steps, device)  # fmt: skip
        return {"net": "monai resnet18 (3D)", "patch": p, "batch": b, **res}

    section("ct_resnet18_3d", ct)

    mri_over = ["model.net.channels=[4,8,16]", "model.net.strides=[2,2]", "model.net.num_res_units=1",
                "data.patch_size=[32,32,32]", "data.batch_size=1", "data.samples_per_volume=1"] if tiny else []  # fmt: skip
    mcfg = _compose("mri", mri_over, root)

    def mri() -> dict:
        import hydra.utils

        patch = [int(s) for s in mcfg.data.patch_size]
        b = int(mcfg.data.batch_size) * int(mcfg.data.get("samples_per_volume", 1))
        x = torch.randn(b, int(mcfg.model.net.in_channels), *patch, device=device)
        y = torch.randint(0, int(mcfg.model.net.out_channels), (b, 1, *patch), device=device)
        net = hydra.utils.instantiate(mcfg.model.net)
        loss = hydra.utils.instantiate(mcfg.model.loss)
        res = train_step_3d(net, loss, x, y, hydra.utils.instantiate(mcfg.model.optimizer), warmup, steps, device)
        return {"net": "monai UNet", "channels": list(mcfg.model.net.channels), "patch": patch, "batch": b, **res}

    section("mri_unet", mri)
    volume = (48, 48, 40) if tiny else (240, 240, 155)
    section("mri_sliding_window_inference", lambda: sliding_window(mcfg, volume, device, 1 if tiny else args.repeats))
    doc["total_seconds"] = round(time.perf_counter() - start, 1)
    return doc


def add_parsers(sub: Any) -> None:
    """Register `gpu-check` on the benchmark entry point's subparsers."""
    parser = sub.add_parser("gpu-check", help="the one prepared GPU script: one JSON document on stdout")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: exercise the code)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: checks the code path, measures nothing")
    parser.add_argument("--xray-batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="sliding-window runs timed")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend ('' skips compiled runs)")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.set_defaults(_run=run_cli)


def run_cli(args: argparse.Namespace) -> dict:
    """Print the one JSON document (no GPU: why, and exit 0); progress and Lightning's chatter go to stderr."""
    doc = no_gpu_doc() if args.device.startswith("cuda") else None
    if doc is not None:
        _log(doc["reason"] + "; nothing measured (exit 0). Run it on a GPU machine, or --device cpu --tiny.")
    else:
        with contextlib.redirect_stdout(sys.stderr):  # Lightning's chatter must not break the one JSON document
            doc = run(args)
    print(json.dumps(doc, indent=2))
    return doc
