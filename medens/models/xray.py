"""Chest X-ray multi-label classifier: torchvision ResNet, BCE-with-logits, per-class AUROC."""

from __future__ import annotations

import logging
import math
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from medens.errors import CheckpointError, ConfigError
from medens.metrics.classification import LabelROC, mean_defined
from medens.models.base import MedensModule

log = logging.getLogger(__name__)


def resolve_weights(arch: str, name: str) -> torchvision.models.WeightsEnum:
    """The torchvision weights enum member `name` (e.g. `IMAGENET1K_V2`, `DEFAULT`) of `arch`; an unknown
    name is an error listing the valid ones."""
    enum = torchvision.models.get_model_weights(arch)
    valid = list(enum.__members__)
    key = name.split(".")[-1]  # also accept "ResNet50_Weights.IMAGENET1K_V2"
    if key not in enum.__members__:
        raise ConfigError(
            f"model.net.weights={name!r} is not a torchvision weights name for {arch}; valid: {', '.join(valid)}"
        )
    return enum[key]


def weights_cache_file(weights: torchvision.models.WeightsEnum) -> Path:
    """Where torchvision's own cache keeps these weights: `<TORCH_HOME>/hub/checkpoints/<file>`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def load_torchvision_weights(weights: torchvision.models.WeightsEnum, allow_download: bool) -> dict[str, Any]:
    """The state dict of `weights` from torchvision's cache (`TORCH_HOME`); downloaded (hash-checked, by
    torchvision's own `load_state_dict_from_url`) only when `allow_download`. Offline without the file,
    the error names the file and the folder to put it in."""
    path = weights_cache_file(weights)
    if not path.is_file() and not allow_download:
        raise CheckpointError(
            f"{path.name}: the {weights} weights are not in torchvision's cache folder {path.parent} "
            f"(TORCH_HOME={os.environ.get('TORCH_HOME', '<unset>')}). Put the file there (from {weights.url}), "
            "or set model.net.allow_download=true on a machine with internet access"
        )
    try:
        # an existing cached file is loaded as is (torchvision checks the hash prefix only on download)
        return weights.get_state_dict(progress=False, check_hash=True, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:  # URLError is an OSError
        raise CheckpointError(
            f"{path.name}: cannot load the {weights} weights from {path.parent} ({exc}); "
            f"place the file from {weights.url} there"
        ) from exc


def _fit_state(net: nn.Module, state: dict[str, Any], where: str, arch: str) -> None:
    own = net.state_dict()
    state = dict(state)
    w = state.get("conv1.weight")
    if w is not None and "conv1.weight" in own and w.shape[1] == 3 and own["conv1.weight"].shape[1] == 1:
        state["conv1.weight"] = w.sum(1, keepdim=True)  # RGB filters -> one greyscale channel
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(usable))
    if not usable:
        raise CheckpointError(f"{where}: no weight in this file fits {arch}")
    net.load_state_dict(usable, strict=False)
    log.info("loaded %d tensors from %s (skipped %d: %s)", len(usable), where, len(skipped), skipped[:4])


def build_resnet(
    arch: str = "resnet50",
    num_classes: int = 14,
    in_channels: int = 3,
    pretrained_path: str | None = None,
    weights: str | None = None,
    allow_download: bool = False,
) -> nn.Module:
    """A torchvision ResNet with `num_classes` outputs (the ImageNet head is always replaced).

    Pretrained weights come from a local file (`pretrained_path`: ImageNet weights or a medens
    checkpoint) or by torchvision weights name (`weights=IMAGENET1K_V2`) through torchvision's cache
    (`TORCH_HOME`), never downloaded unless `allow_download`. With named weights the network carries
    `medens_weights` (name and the weights' own preprocessing), which the checkpoint's io_contract records.
    """
    if not hasattr(torchvision.models, arch) or not arch.startswith(("resnet", "resnext", "wide_resnet")):
        raise ValueError(f"unknown ResNet architecture {arch!r} (e.g. resnet18, resnet34, resnet50)")
    if pretrained_path and weights:
        raise ConfigError("set model.net.pretrained_path or model.net.weights, not both")
    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if weights:
        enum = resolve_weights(arch, str(weights))
        _fit_state(net, load_torchvision_weights(enum, allow_download), str(weights_cache_file(enum)), arch)
        tf = enum.transforms()
        net.medens_weights = {
            "name": str(enum),
            "file": weights_cache_file(enum).name,
            "mean": [float(v) for v in tf.mean],
            "std": [float(v) for v in tf.std],
            "crop_size": int(tf.crop_size[0]),
            "resize_size": int(tf.resize_size[0]),
        }
    if pretrained_path:
        path = Path(pretrained_path)
        if not path.is_file():
            raise CheckpointError(f"{path}: pretrained weights file not found (nothing is downloaded)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model_state_dict", state.get("state_dict", state))
        _fit_state(net, state, str(path), arch)
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


class XRayClassifier(MedensModule):
    """Multi-label chest X-ray LightningModule; logs `val/auc` (mean over defined classes) and per class
    (`medens.metrics.classification`: unknown labels masked, a class without both outcomes left out)."""

    monitor = "val/auc"
    monitor_mode = "max"
    metric_key = "val_auc"

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        label_names: Sequence[str] | None = None,
        pos_weight: str | Sequence[float] | None = None,
        max_pos_weight: float = 20.0,
        name: str = "resnet50",
        **base: Any,
    ) -> None:
        super().__init__(net, optimizer, name=name, **base)  # scheduler, compile, monitor, ...: MedensModule's
        self.label_names = list(label_names or [])
        outputs = getattr(getattr(net, "fc", None), "out_features", None) or len(self.label_names) or 1
        self.val_roc, self.test_roc = LabelROC(outputs), LabelROC(outputs)
        self.pos_weight_mode = pos_weight
        self.max_pos_weight = max_pos_weight
        self.register_buffer("pos_weight", None, persistent=False)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        # data.augment_on=device: the datamodule's batched augmentation, applied in on_after_batch_transfer
        self.batch_augment = getattr(dm, "batch_augment", None)
        self._record_weights_preprocessing()
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

    def _record_weights_preprocessing(self) -> None:
        """Named pretrained weights bring their own preprocessing: the data must normalise with the same
        mean/std (else an error naming both), and the io_contract records the weights' transforms."""
        meta = getattr(self.net, "medens_weights", None)
        pre = self.io_contract.get("preprocessing") if self.io_contract else None
        if not meta or pre is None:
            return
        channels = len(pre.get("mean") or meta["mean"])
        mean, std = meta["mean"][:channels], meta["std"][:channels]
        data_mean, data_std = pre.get("mean"), pre.get("std")
        if data_mean is None or any(abs(a - b) > 1e-6 for a, b in zip(data_mean + data_std, mean + std, strict=True)):
            raise ConfigError(
                f"model.net.weights={meta['name']} expects inputs normalised with mean {mean}, std {std}; "
                f"the data normalises with mean {data_mean}, std {data_std} (data.normalize="
                f"{pre.get('normalize')!r}); use data.normalize=imagenet"
            )
        size = (pre.get("resize") or [None])[0]
        if size is not None and size != meta["crop_size"]:
            log.warning("model.net.weights=%s was trained at %d px; data.image_size is %s",
                        meta["name"], meta["crop_size"], size)  # fmt: skip
        pre["weights"] = dict(meta)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches of `data.augment_on=device` carry uint8 images and per-item parameters
        (`augment`): augment and normalise them here, batched, on the device (medens/data/xray_augment.py).
        Evaluation batches have no `augment` and pass through unchanged."""
        if not isinstance(batch, dict) or "augment" not in batch:
            return batch
        augment = getattr(self, "batch_augment", None)
        if augment is None:
            raise ConfigError(
                "a training batch carries on-device augmentation parameters but the model has no batch "
                "augmentation: train through a Trainer with the X-ray datamodule (data.augment_on=device), "
                "or set data.augment_on=loader"
            )
        batch = dict(batch)
        batch["image"] = augment(batch["image"], batch.pop("augment"))
        return batch

    def _step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch["image"]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.net(x)
        pw = self.pos_weight.to(logits.device) if self.pos_weight is not None else None
        return logits, masked_bce_with_logits(logits, batch["label"], pw)

    def on_train_epoch_start(self) -> None:
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        _, loss = self._step(batch)
        # `self.log` costs ~1-3 ms per call in Lightning (its result metric is moved to the device on every
        # call): on a GPU step of ~30 ms that was most of medens' overhead over a plain loop. The epoch
        # mean is the same when accumulated here and logged once, on the epoch's last batch.
        n = int(batch["image"].shape[0])
        weighted = loss.detach() * n
        self._loss_sum = weighted if getattr(self, "_loss_sum", None) is None else self._loss_sum + weighted
        self._loss_count = getattr(self, "_loss_count", 0) + n
        total = self.trainer.num_training_batches
        if not math.isfinite(total) or batch_idx + 1 >= total:
            self.log("train/loss", self._loss_sum / self._loss_count, on_step=False, on_epoch=True, prog_bar=True,
                     sync_dist=True, batch_size=self._loss_count)  # fmt: skip
            self._loss_sum, self._loss_count = None, 0
        elif self.trainer.progress_bar_callback is not None and batch_idx % max(1, self.trainer.log_every_n_steps) == 0:
            self.log("loss_step", loss.detach(), prog_bar=True, logger=False, batch_size=n)  # not in the history
        return loss

    def _eval_step(self, stage: str, batch: dict[str, Any]) -> None:
        logits, loss = self._step(batch)
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True, batch_size=batch["image"].shape[0])
        (self.val_roc if stage == "val" else self.test_roc).update(torch.sigmoid(logits.float()), batch["label"])

    def log_epoch_metrics(self, stage: str) -> None:
        roc = self.val_roc if stage == "val" else self.test_roc
        if roc.update_count == 0:
            return
        aucs = [float(a) for a in roc.auroc()]  # torchmetrics syncs the epoch's scores across DDP ranks
        roc.reset()
        self.log(f"{stage}/auc", mean_defined(aucs), sync_dist=False, rank_zero_only=False)
        names = self.label_names or [str(i) for i in range(len(aucs))]
        for name, auc in zip(names, aucs, strict=True):
            self.log(f"{stage}/auc_{name}", auc)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        x = batch["image"]
        logits = self.net(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)
        # what evaluation reports per case (`trainer.predict`); the patient is the bootstrap unit
        return {"probs": torch.sigmoid(logits.float()), "label": batch.get("label"), "case_id": batch["case_id"],
                "patient_id": batch.get("patient_id", batch["case_id"])}  # fmt: skip
