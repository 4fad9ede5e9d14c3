"""Chest X-ray multi-label classifier: torchvision ResNet, BCE-with-logits, per-class AUROC."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchmetrics.functional.classification import binary_auroc

from medens.errors import CheckpointError, ConfigError
from medens.models.base import MedensModule

log = logging.getLogger(__name__)


def build_resnet(
    arch: str = "resnet50",
    num_classes: int = 14,
    in_channels: int = 3,
    pretrained_path: str | None = None,
) -> nn.Module:
    """A torchvision ResNet with `num_classes` outputs; weights only from a local file, never downloaded.

    `pretrained_path` may hold ImageNet weights (the 1000-class head is dropped) or a medens checkpoint.
    """
    if not hasattr(torchvision.models, arch) or not arch.startswith(("resnet", "resnext", "wide_resnet")):
        raise ValueError(f"unknown ResNet architecture {arch!r} (e.g. resnet18, resnet34, resnet50)")
    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if pretrained_path:
        path = Path(pretrained_path)
        if not path.is_file():
            raise CheckpointError(f"{path}: pretrained weights file not found (nothing is downloaded)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model_state_dict", state.get("state_dict", state))
        own = net.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        skipped = sorted(set(state) - set(usable))
        if not usable:
            raise CheckpointError(f"{path}: no weight in this file fits {arch}")
        net.load_state_dict(usable, strict=False)
        log.info("loaded %d tensors from %s (skipped %d: %s)", len(usable), path, len(skipped), skipped[:4])
    return net


def masked_bce_with_logits(
    logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """BCE over known targets only: NaN targets (a label a dataset does not have) are skipped."""
    known = ~torch.isnan(targets)
    loss = nn.functional.binary_cross_entropy_with_logits(
        logits, torch.nan_to_num(targets), pos_weight=pos_weight, reduction="none"
    )
    return (loss * known).sum() / known.sum().clamp_min(1)


def per_class_auroc(probs: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """AUROC per column; NaN where a column has no positive or no negative (AUC undefined)."""
    out = []
    for c in range(targets.shape[1]):
        known = ~torch.isnan(targets[:, c])
        t = targets[known, c]
        if t.numel() == 0 or t.min() == t.max():
            out.append(math.nan)
        else:
            out.append(float(binary_auroc(probs[known, c], t.long())))
    return out


class XRayClassifier(MedensModule):
    """Multi-label chest X-ray LightningModule; logs `val/auc` (mean over defined classes) and per class."""

    monitor = "val/auc"
    monitor_mode = "max"
    metric_key = "val_auc"

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        label_names: Sequence[str] | None = None,
        pos_weight: str | Sequence[float] | None = None,
        max_pos_weight: float = 20.0,
        compile: bool = False,
        channels_last: bool = False,
        name: str = "resnet50",
    ) -> None:
        super().__init__(net, optimizer, scheduler, scheduler_interval, compile, channels_last, name)
        self.label_names = list(label_names or [])
        self.pos_weight_mode = pos_weight
        self.max_pos_weight = max_pos_weight
        self.register_buffer("pos_weight", None, persistent=False)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "labels"):
            if not self.label_names:
                self.label_names = list(dm.labels)
            outputs = getattr(getattr(self.net, "fc", None), "out_features", None)
            if outputs is not None and outputs != len(self.label_names):
                raise ConfigError(
                    f"model.net.num_classes={outputs} but the data has {len(self.label_names)} labels "
                    f"({', '.join(self.label_names[:4])}, ...)"
                )
        mode = self.pos_weight_mode
        if mode is None:
            return
        if mode == "balanced":
            if stage == "fit":
                prevalence = self.trainer.datamodule.positive_fraction().clamp(1e-3, 1 - 1e-3)
                self.pos_weight = ((1 - prevalence) / prevalence).clamp(max=self.max_pos_weight)
            return
        if isinstance(mode, str):
            raise ValueError(f"pos_weight must be null, 'balanced' or a list of floats, got {mode!r}")
        weights = torch.as_tensor(list(mode), dtype=torch.float32)
        if self.label_names and weights.numel() != len(self.label_names):
            raise ValueError(f"pos_weight has {weights.numel()} values for {len(self.label_names)} labels")
        self.pos_weight = weights

    def _step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch["image"]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.net(x)
        pw = self.pos_weight.to(logits.device) if self.pos_weight is not None else None
        return logits, masked_bce_with_logits(logits, batch["label"], pw)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        _, loss = self._step(batch)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=batch["image"].shape[0])  # fmt: skip
        return loss

    def _eval_step(self, stage: str, batch: dict[str, Any]) -> None:
        logits, loss = self._step(batch)
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True, batch_size=batch["image"].shape[0])
        self.collect_outputs(stage, torch.sigmoid(logits.float()), batch["label"])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _epoch_auc(self, stage: str) -> None:
        gathered = self.gather_outputs(stage)
        if gathered is None:
            return
        aucs = per_class_auroc(*gathered)
        defined = [a for a in aucs if not math.isnan(a)]
        mean = sum(defined) / len(defined) if defined else math.nan
        self.log(f"{stage}/auc", mean, sync_dist=False, rank_zero_only=False)
        names = self.label_names or [str(i) for i in range(len(aucs))]
        for name, auc in zip(names, aucs, strict=True):
            self.log(f"{stage}/auc_{name}", auc)
        if stage == "val" and not self.trainer.sanity_checking and not math.isnan(mean):
            self.update_best(mean)

    def on_validation_epoch_end(self) -> None:
        self._epoch_auc("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_auc("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        logits, _ = self._step(batch)
        return {"probs": torch.sigmoid(logits.float()), "label": batch["label"], "case_id": batch["case_id"]}
