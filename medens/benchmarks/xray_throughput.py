"""`python scripts/benchmark.py xray-throughput [--arch resnet50 --size 224 --batch 16 --steps 8]`.

`xray-throughput` trains the same network on the same in-memory synthetic batches twice: through
the medens X-ray LightningModule with a Lightning Trainer, and through a plain PyTorch loop. It
reports images/s of each and their ratio (target >= 0.97).

Two designs (`--design`):
- `paired` (default): in each repeat, one medens fit whose callback also runs one plain-loop step (a second
  copy of the network, same batch) inside every medens step, alternately before and after it. Plain and
  medens steps alternate step by step, so a slow minute of the shared machine slows both alike; each
  medens step's time is its window between two batch starts less the plain step inside it.
- `runs`: whole runs in ABBA order (plain, medens, medens, plain, ...). Drift in machine load over a run
  (minutes on a CPU) moves this ratio by +-10%.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medens.benchmarks.record import RESULTS_DIR, write_benchmark_result
from medens.data.synthetic_xray import render_chest, sample_findings
from medens.data.xray import IMAGENET_MEAN, IMAGENET_STD, NIH_LABELS
from medens.models.xray import XRayClassifier, build_resnet, masked_bce_with_logits


def synthetic_batches(n_batches: int, batch: int, size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Preprocessed synthetic NIH images (normalised, 3 channels), identical for both loops."""
    rng = np.random.default_rng(seed)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = []
    for _ in range(n_batches):
        images, labels = [], []
        for _ in range(batch):
            found = sample_findings(rng)
            img = torch.from_numpy(render_chest(found, size, rng)).float().div(255).expand(3, -1, -1)
            images.append((img - mean) / std)
            labels.append(torch.tensor([float(n in found) for n in NIH_LABELS]))
        out.append({"image": torch.stack(images), "label": torch.stack(labels)})
    return out


class _Batches(Dataset):
    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.batches[i]


class _StepTimer(pl.Callback):
    """Each timed step's seconds, from one batch's start to the next one's (Lightning's work between
    steps included), the last step to its end."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.starts, self.t_end = warmup, [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx >= self.warmup:
            self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.t_end = time.perf_counter()

    def steps(self) -> list[float]:
        return _intervals([*self.starts, self.t_end])


def _intervals(marks: list[float]) -> list[float]:
    """Seconds between consecutive time marks."""
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def _images_per_s(steps: list[float], batch: int) -> float:
    return batch * len(steps) / sum(steps)


def _optimizer() -> functools.partial:
    return functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=1e-4)


def run_plain(batches, arch: str, warmup: int) -> list[float]:  # noqa: ANN001
    """Seconds of each timed step of a plain PyTorch loop."""
    step = _PlainStep(arch)
    return [step(b) for b in batches][warmup:]


def run_medens(batches, arch: str, warmup: int) -> list[float]:  # noqa: ANN001
    """Seconds of each timed step of the medens X-ray module under a Lightning Trainer."""
    timer = _StepTimer(warmup)
    _fit_medens(batches, arch, timer)
    return timer.steps()


def _fit_medens(batches, arch: str, callback: pl.Callback) -> None:  # noqa: ANN001
    """One epoch of the medens X-ray module over `batches` under a plain CPU Trainer."""
    torch.manual_seed(0)
    model = XRayClassifier(build_resnet(arch, num_classes=14), optimizer=_optimizer(), label_names=NIH_LABELS)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback], limit_val_batches=0,
    )  # fmt: skip
    loader = DataLoader(_Batches(batches), batch_size=None, shuffle=False)
    trainer.fit(model, train_dataloaders=loader)


class _PlainStep:
    """One plain-loop training step per call, on its own copy of the network and optimizer."""

    def __init__(self, arch: str) -> None:
        torch.manual_seed(0)
        self.net = build_resnet(arch, num_classes=14)
        self.net.train()
        self.opt = _optimizer()(params=self.net.parameters())

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        t0 = time.perf_counter()
        with torch.enable_grad():
            loss = masked_bce_with_logits(self.net(batch["image"]), batch["label"])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return time.perf_counter() - t0


class _PairedSteps(pl.Callback):
    """Runs a plain step inside each medens step (before it on even batches, after it on odd ones) and
    records both: a medens step is the time between two batch starts less the plain step inside it."""

    def __init__(self, plain: _PlainStep, batches: list[dict[str, torch.Tensor]], warmup: int) -> None:
        self.plain, self.batches, self.warmup = plain, batches, warmup
        self.plain_s: list[float] = []
        self.medens_s: list[float] = []
        self._start: float | None = None
        self._inside = 0.0

    def _close_window(self, batch_idx: int) -> None:
        if self._start is not None and batch_idx - 1 >= self.warmup:
            self.medens_s.append(time.perf_counter() - self._start - self._inside)

    def _plain_step(self, batch_idx: int) -> None:
        dt = self.plain(self.batches[batch_idx])
        self._inside += dt
        if batch_idx >= self.warmup:
            self.plain_s.append(dt)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._close_window(batch_idx)
        self._start, self._inside = time.perf_counter(), 0.0
        if batch_idx % 2 == 0:
            self._plain_step(batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx % 2 == 1:
            self._plain_step(batch_idx)

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._close_window(len(self.batches))


def run_paired(batches, arch: str, warmup: int) -> tuple[list[float], list[float]]:  # noqa: ANN001
    """(plain, medens) seconds of each timed step, the two loops alternating step by step in one fit."""
    paired = _PairedSteps(_PlainStep(arch), batches, warmup)
    _fit_medens(batches, arch, paired)
    return paired.plain_s, paired.medens_s


def xray_throughput(args: argparse.Namespace) -> dict:
    batches = synthetic_batches(args.warmup + args.steps, args.batch, args.size)
    if args.design == "paired":
        plain_steps, medens_steps = [], []
        for _ in range(args.repeats):
            plain, medens = run_paired(batches, args.arch, args.warmup)
            plain_steps.append(plain)
            medens_steps.append(medens)
            _print_repeat(plain, medens, args.batch, " (paired steps)")
        return _result(args, plain_steps, medens_steps)
    plain_steps, medens_steps = [], []
    for r in range(args.repeats):  # ABBA order: drift in machine load does not favour either loop
        first, second = (run_plain, run_medens) if r % 2 == 0 else (run_medens, run_plain)
        for fn in (first, second):
            (plain_steps if fn is run_plain else medens_steps).append(fn(batches, args.arch, args.warmup))
        _print_repeat(plain_steps[-1], medens_steps[-1], args.batch)
    return _result(args, plain_steps, medens_steps)


def _print_repeat(plain: list[float], medens: list[float], batch: int, note: str = "") -> None:
    print(f"plain {_images_per_s(plain, batch):.2f} img/s   medens {_images_per_s(medens, batch):.2f} img/s{note}",
          flush=True)  # fmt: skip


def _result(args: argparse.Namespace, plain_steps: list[list[float]], medens_steps: list[list[float]]) -> dict:
    plain = [_images_per_s(s, args.batch) for s in plain_steps]
    medens = [_images_per_s(s, args.batch) for s in medens_steps]
    ratios = [m / p for m, p in zip(medens, plain, strict=True)]
    # the median step of each run: one slow step (another process, the allocator) moves it less than the mean
    ratios_median_step = [float(np.median(p) / np.median(m)) for m, p in zip(medens_steps, plain_steps, strict=True)]
    return {
        "benchmark": "xray-throughput",
        "design": args.design,
        "arch": args.arch,
        "image_size": args.size,
        "batch_size": args.batch,
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        "repeats": args.repeats,
        "plain_images_per_s": plain,
        "medens_images_per_s": medens,
        "plain_median": float(np.median(plain)),
        "medens_median": float(np.median(medens)),
        "ratio_median": float(np.median(medens) / np.median(plain)),
        "ratio_per_repeat": ratios,
        # each repeat's two runs are adjacent (ABBA): the median of their ratios is less swayed by load drift
        "median_of_ratio_per_repeat": float(np.median(ratios)),
        "ratio_per_repeat_from_median_step": ratios_median_step,
        "median_of_ratio_from_median_step": float(np.median(ratios_median_step)),
        "plain_step_seconds": plain_steps,
        "medens_step_seconds": medens_steps,
    }  # the machine block, load average included, is added by write_benchmark_result when it is written


def add_parsers(sub: Any) -> None:
    """Register `xray-throughput` on the benchmark entry point's subparsers."""
    p = sub.add_parser("xray-throughput", help="medens X-ray module vs a plain PyTorch loop")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--design", choices=("paired", "runs"), default="paired",
                   help="paired: the loops alternate step by step in one fit; runs: whole runs in ABBA order")  # fmt: skip
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.set_defaults(_run=run)


def run(args: argparse.Namespace) -> Path:
    """Run the benchmark and write `<out>/xray-throughput.json`."""
    result = xray_throughput(args)
    path = write_benchmark_result(args.out, "xray-throughput.json", result)
    print(f"ratio (medens/plain, median): {result['ratio_median']:.3f} -> {path}")
    return path
