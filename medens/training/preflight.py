"""Preflight: a checkpoint round trip before the first training step (on by default; `preflight=false`).

The initial state (weights, optimizer, scheduler, hyperparameters, loop state: after a `ckpt_path=`
restore, the restored state) is written in the medens format to a temporary file in the folder the run
will write its checkpoints to, read back with `weights_only=True`, loaded strictly into a freshly built
module, and compared tensor by tensor, together with the optimizer state and the hyperparameters. Any
failure (unwritable folder, full disk, a hyperparameter that cannot be loaded safely, a state dict that
does not load) stops the run before training with a `PreflightError` naming the cause, instead of after
hours of training at the first checkpoint.
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from medens.checkpoint.io import lightning_to_medens, medens_to_lightning, state_dict_report
from medens.errors import CheckpointError

log = logging.getLogger(__name__)


class PreflightError(CheckpointError):
    """The checkpoint round trip before training failed; the message names the cause."""


def _loads_safely(value: Any) -> bool:
    buf = io.BytesIO()
    try:
        torch.save(value, buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)
    except Exception:
        return False
    return True


def find_unloadable(obj: Any, path: str = "") -> str | None:
    """Path (`hyperparameters.model.x`) of the first value that `torch.load(weights_only=True)` refuses."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = find_unloadable(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
        return None
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = find_unloadable(v, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if _loads_safely(obj) else f"{path} (a {type(obj).__module__}.{type(obj).__qualname__})"


def _diff(a: Any, b: Any, path: str) -> str | None:
    """First difference between two nested containers of plain values and tensors, or None."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{path}: {type(a).__name__} vs {type(b).__name__}"
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a.detach().cpu(), b.detach().cpu()):
            return f"{path}: tensor differs ({tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype})"
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        if set(map(str, a)) != set(map(str, b)):
            return f"{path}: keys differ ({sorted(set(map(str, a)) ^ set(map(str, b)))[:5]})"
        bs = {str(k): v for k, v in b.items()}
        for k, v in a.items():
            d = _diff(v, bs[str(k)], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = _diff(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    return None if a == b else f"{path}: {a!r} vs {b!r}"


def _load_strict(net: torch.nn.Module, state: dict[str, Any], assign: bool) -> None:
    """Load `state` into `net` strictly; names the missing, unexpected and wrongly shaped keys. With
    `assign` (a module built on the meta device) the file's tensors become the module's."""
    report = state_dict_report(net, state)
    if not report.exact:
        raise CheckpointError(f"checkpoint does not fit {type(net).__name__}: {report.describe()}")
    net.load_state_dict(state, strict=True, assign=assign)


def _build_fresh(build_module: Callable[[], pl.LightningModule]) -> tuple[pl.LightningModule, bool]:
    """A fresh module, built on the meta device when it can be (no weight initialisation: the file's
    tensors are assigned), else on the CPU."""
    try:
        with torch.device("meta"):
            return build_module(), True
    except Exception:
        return build_module(), False


def _match_lazy_shapes(fresh_net: torch.nn.Module, trained_net: torch.nn.Module) -> None:
    """Networks whose layers are sized by the data at `setup` (the stacking MLP's `build`) get the same
    sizes in the fresh copy, as a resume's `setup` would give them."""
    build = getattr(fresh_net, "build", None)
    sizes = (getattr(trained_net, "in_features", None), getattr(trained_net, "out_features", None))
    if callable(build) and None not in sizes and getattr(fresh_net, "in_features", None) is None:
        build(*sizes)


def preflight_round_trip(
    trainer: pl.Trainer, module: pl.LightningModule, folder: str | os.PathLike,
    build_module: Callable[[], pl.LightningModule],
) -> dict[str, float]:  # fmt: skip
    """Run the round trip (see module docstring); returns its timings in seconds and the file size."""
    folder = Path(folder)
    t0 = time.perf_counter()
    ckpt = lightning_to_medens(trainer._checkpoint_connector.dump_checkpoint(weights_only=False))
    tmp = folder / f".{getattr(module, 'name', 'model')}.preflight-{os.getpid()}.tmp"
    timings: dict[str, float] = {}
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                torch.save(ckpt, fh)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise PreflightError(
                f"preflight: cannot write a checkpoint in {folder} ({type(exc).__name__}: {exc}); "
                "the run would fail at its first checkpoint"
            ) from exc
        except Exception as exc:
            bad = find_unloadable(ckpt)
            raise PreflightError(f"preflight: the checkpoint cannot be saved: {bad or exc}") from exc
        timings["bytes"] = float(tmp.stat().st_size)
        t1 = time.perf_counter()
        try:
            loaded = torch.load(tmp, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            bad = find_unloadable(ckpt)
            raise PreflightError(
                f"preflight: the checkpoint does not load with torch.load(weights_only=True): "
                f"{'value ' + bad + ' is not a plain type' if bad else exc}. Checkpoint values must be plain "
                "containers, numbers, strings and tensors"
            ) from exc
        t2 = time.perf_counter()
        fresh, on_meta = _build_fresh(build_module)
        _match_lazy_shapes(fresh.net, module.net)
        try:
            _load_strict(fresh.net, loaded["model_state_dict"], assign=on_meta)
        except (CheckpointError, RuntimeError) as exc:
            raise PreflightError(
                f"preflight: the state dict does not load into a freshly built module: {exc}"
            ) from exc
        fresh_state = fresh.net.state_dict()
        for k, v in module.net.state_dict().items():
            if not torch.equal(fresh_state[k].cpu(), v.detach().cpu()):
                raise PreflightError(f"preflight: tensor {k} differs after the round trip")
        for what, key in (("optimizer", "optimizer_state_dict"), ("scheduler", "scheduler_state_dict"),
                          ("hyperparameters", "hyperparameters"), ("extra state", "extra_state_dict")):  # fmt: skip
            d = _diff(ckpt.get(key), loaded.get(key), key)
            if d:
                raise PreflightError(f"preflight: the {what} differ after the round trip: {d}")
        opt_state = loaded.get("optimizer_state_dict")
        if opt_state is not None and hasattr(fresh, "optimizer_factory"):
            try:
                opt = fresh.optimizer_factory(params=[p for p in fresh.parameters() if p.requires_grad])
                opt.load_state_dict(opt_state if isinstance(opt_state, dict) else opt_state[0])
            except Exception as exc:
                raise PreflightError(
                    f"preflight: the optimizer state does not load into a fresh optimizer: {exc}"
                ) from exc
        try:
            medens_to_lightning(loaded, tmp)
        except CheckpointError as exc:
            raise PreflightError(f"preflight: not resumable: {exc}") from exc
        t3 = time.perf_counter()
        timings.update(dump_and_write=t1 - t0, read=t2 - t1, rebuild_and_compare=t3 - t2, total=t3 - t0)
        return timings
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the folder itself is not usable: nothing was written
            pass


class Preflight(Callback):
    """Runs `preflight_round_trip` on rank 0 at `on_train_start` (after any resume restore)."""

    def __init__(self, folder: str | os.PathLike, build_module: Callable[[], pl.LightningModule]) -> None:
        self.folder = Path(folder)
        self.build_module = build_module
        self.timings: dict[str, float] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        error = None
        if trainer.is_global_zero:
            try:
                self.timings = preflight_round_trip(trainer, pl_module, self.folder, self.build_module)
            except PreflightError as exc:
                error = str(exc)
        if trainer.world_size > 1:
            error = trainer.strategy.broadcast(error)
        if error:
            raise PreflightError(error + " (preflight=false skips this check)")
        if self.timings:
            t = self.timings
            log.info("preflight round trip OK in %.2fs (%.1f MB in %s: write %.2fs, read %.2fs, rebuild+compare %.2fs)",
                     t["total"], t["bytes"] / 1e6, self.folder, t["dump_and_write"], t["read"],
                     t["rebuild_and_compare"])  # fmt: skip


class EpochTimer(Callback):
    """Wall seconds of the training part of each epoch (data loading included) and of validation, and the
    training batches run (used by `scripts/benchmark.py preflight`)."""

    def __init__(self) -> None:
        self.train_seconds = 0.0
        self.train_batches = 0
        self.val_seconds = 0.0
        self._t: float | None = None
        self._v = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        self.train_batches += 1

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._v = time.perf_counter()
        if self._t is not None:
            self.train_seconds += self._v - self._t
            self._t = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.val_seconds += time.perf_counter() - self._v
