"""Reading and writing medens checkpoints.

A medens `.pth` file is a plain dict (loadable with `torch.load(..., weights_only=True)`) with the
DESIGN.md keys at the top level (`model_state_dict` is the bare network's state dict, so
`torchvision.models.resnet50(num_classes=14)` loads it directly) and, under `lightning`, the loop and
callback state that Lightning needs to resume a run exactly. `MedensCheckpointIO` converts between
this file and Lightning's in-memory checkpoint, so Lightning's `ModelCheckpoint` writes it and
`trainer.fit(ckpt_path=...)` reads it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from medens.errors import CheckpointError
from medens.utils.atomic import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "medens-checkpoint/1"
#: Seconds to pause between writing a checkpoint's temp file and renaming it (tests of kill -9 only).
SAVE_DELAY_ENV = "MEDENS_TEST_SAVE_DELAY_S"
NET_PREFIX = "net."
# Keys the LightningModule puts under checkpoint["medens"]; they become top-level keys of the file.
MEDENS_KEY = "medens"
_LIGHTNING_MAPPED = {"state_dict", "optimizer_states", "lr_schedulers", MEDENS_KEY}


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file in the same folder, fsync, then rename over `path`.

    A crash mid-write leaves the previous file intact, never a truncated one; the temporary name
    (`.<name>.<random>.tmp`) never ends in `.pth`, so it is never taken for a checkpoint, and the next run in
    the folder (or `scripts/housekeeping.py action=clean`) removes it.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
        if delay := os.environ.get(SAVE_DELAY_ENV):  # tests only: widen the window a kill -9 lands mid-save
            time.sleep(float(delay))


def lightning_to_medens(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Turn Lightning's checkpoint dict into the medens file layout."""
    state = checkpoint.get("state_dict", {})
    model_state = {k[len(NET_PREFIX) :]: v for k, v in state.items() if k.startswith(NET_PREFIX)}
    extra_state = {k: v for k, v in state.items() if not k.startswith(NET_PREFIX)}
    optimizers = checkpoint.get("optimizer_states", [])
    schedulers = checkpoint.get("lr_schedulers", [])
    medens = dict(checkpoint.get(MEDENS_KEY, {}))
    out: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "epoch": medens.pop("epoch", int(checkpoint.get("epoch", 0)) + 1),
        "global_step": int(checkpoint.get("global_step", 0)),
        "model_state_dict": model_state,
        "optimizer_state_dict": optimizers[0] if len(optimizers) == 1 else (optimizers or None),
        "scheduler_state_dict": schedulers[0] if len(schedulers) == 1 else (schedulers or None),
    }
    out.update(medens)
    if extra_state:
        out["extra_state_dict"] = extra_state
    out["lightning"] = {k: v for k, v in checkpoint.items() if k not in _LIGHTNING_MAPPED}
    return out


def medens_to_lightning(ckpt: dict[str, Any], path: str | os.PathLike = "<checkpoint>") -> dict[str, Any]:
    """Rebuild Lightning's checkpoint dict from a medens file, for `trainer.fit(ckpt_path=...)`."""
    if ckpt.get("format") != CHECKPOINT_FORMAT or "lightning" not in ckpt:
        raise CheckpointError(
            f"{path}: not a resumable medens checkpoint (format={ckpt.get('format')!r}, "
            f"has lightning state: {'lightning' in ckpt})"
        )
    out = dict(ckpt["lightning"])
    state = {NET_PREFIX + k: v for k, v in ckpt["model_state_dict"].items()}
    state.update(ckpt.get("extra_state_dict", {}))
    out["state_dict"] = state
    opt = ckpt.get("optimizer_state_dict")
    out["optimizer_states"] = [] if opt is None else (opt if isinstance(opt, list) else [opt])
    sch = ckpt.get("scheduler_state_dict")
    out["lr_schedulers"] = [] if sch is None else (sch if isinstance(sch, list) else [sch])
    out[MEDENS_KEY] = {k: v for k, v in ckpt.items() if k not in ("lightning", "model_state_dict")}
    return out


class MedensCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint plugin that writes and reads the medens file format, atomically.

    Lightning calls `save_checkpoint` on global rank 0 only; the log line names the rank so that
    multi-process runs can be checked for it.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_torch_save(lightning_to_medens(checkpoint), path)
        log.info("medens checkpoint written by rank %s: %s", rank_zero_only.rank, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        from medens.checkpoint.safe_build import load_checkpoint_verified

        ckpt = load_checkpoint_verified(path)  # a versioned file's SHA-256 checked; data, never code
        return medens_to_lightning(ckpt, path)


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Load a medens checkpoint dict safely (`weights_only=True`, mapped to CPU by default); `mmap=True`
    maps the tensors instead of reading them, for callers that only look at the other keys."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        keys = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a medens checkpoint (no 'model_state_dict'; found {keys})")
    return ckpt


@dataclass
class LoadReport:
    """What `load_network_weights` matched; empty lists mean an exact fit."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def describe(self, limit: int = 8) -> str:
        parts = []
        for name, keys in (
            ("missing keys", self.missing),
            ("unexpected keys", self.unexpected),
            ("shape mismatches", self.shape_mismatch),
        ):
            if keys:
                more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
                parts.append(f"{len(keys)} {name}: {', '.join(keys[:limit])}{more}")
        return "; ".join(parts) or "exact match"


def state_dict_report(net: nn.Module, state: dict[str, Any]) -> LoadReport:
    """Missing, unexpected and wrongly shaped keys of `state` against `net` (what a strict load checks)."""
    own = net.state_dict()
    return LoadReport(
        missing=[k for k in own if k not in state],
        unexpected=[k for k in state if k not in own],
        shape_mismatch=[
            f"{k} (checkpoint {tuple(state[k].shape)} vs network {tuple(own[k].shape)})"
            for k in own
            if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
        ],
    )


def load_network_weights(
    net: nn.Module,
    source: str | os.PathLike | dict[str, Any],
    strict: bool = True,
) -> LoadReport:
    """Load a checkpoint's `model_state_dict` into a bare network.

    With `strict=True` any missing, unexpected or wrongly shaped key raises `CheckpointError` listing them;
    with `strict=False` every key that matches by name and shape is loaded and the rest are reported.
    """
    label = str(source) if not isinstance(source, dict) else "<state dict>"
    ckpt = load_checkpoint(source) if not isinstance(source, dict) else source
    state = ckpt["model_state_dict"] if "model_state_dict" in ckpt else ckpt
    report = state_dict_report(net, state)
    if strict and not report.exact:
        arch = ckpt.get("hyperparameters", {}).get("model", {}) if isinstance(ckpt, dict) else {}
        hint = f" (checkpoint model config: {arch.get('net', arch)})" if arch else ""
        raise CheckpointError(
            f"{label}: checkpoint does not fit {type(net).__name__}: {report.describe()}{hint}. "
            "Pass strict=False to load only the matching weights."
        )
    mismatched = {m.split(" ")[0] for m in report.shape_mismatch}
    loadable = {k: v for k, v in state.items() if k not in report.unexpected and k not in mismatched}
    net.load_state_dict(loadable, strict=False)
    return report
