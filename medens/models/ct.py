"""CT nodule classifier (benign / malignant): a MONAI 3D ResNet, class-weighted loss, AUC and operating points.

The network is a plain `monai.networks.nets.resnet18(spatial_dims=3, ...)` built by Hydra from `model.net`
(about 33M parameters at the default widths), so a checkpoint's `model_state_dict` loads into
`resnet18(**hyperparameters["model"]["net"])` without medens. One output (sigmoid, BCE) or two
(softmax, cross-entropy) are both accepted; either way the model's score is the probability of
malignancy. Validation logs AUC, sensitivity and specificity at the configured `threshold`, and the
highest threshold that still reaches `target_sensitivity` (0.90 by default) with its specificity; that
operating point is written into every checkpoint (`operating_point`, and the threshold into
`hyperparameters.io_contract`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from medens.checkpoint.io import MEDENS_KEY
from medens.errors import ConfigError
from medens.metrics.classification import LabelROC
from medens.models.base import MedensModule
from medens.models.tta import spatial_flips


def count_parameters(net: nn.Module) -> int:
    """Trainable parameters of a network (e.g. 33.16M for MONAI's 3D resnet18 with one output)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def _num_outputs(net: nn.Module) -> int | None:
    fc = getattr(net, "fc", None)
    return getattr(fc, "out_features", None)


def _in_channels(net: nn.Module) -> int | None:
    conv = getattr(net, "conv1", None)
    return getattr(conv, "in_channels", None)


class CTClassifier(MedensModule):
    """Benign/malignant nodule LightningModule around a bare 3D network (`self.net`).

    `pos_weight` handles class imbalance: `balanced` weighs malignant cases by benign/malignant in the
    training split (capped at `max_pos_weight`), a number uses that weight, null none. `tta_flips`
    averages the malignancy probability over the 8 axis flips at validation, test and prediction
    (patches are world-aligned cubes, so flips are plausible views); training never uses it.
    """

    monitor = "val/auc"
    monitor_mode = "max"
    metric_key = "val_auc"

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        pos_weight: str | float | None = "balanced",
        max_pos_weight: float = 20.0,
        threshold: float = 0.5,
        target_sensitivity: float = 0.9,
        tta_flips: bool = False,
        name: str = "3dcnn",
        **base: Any,
    ) -> None:
        super().__init__(net, optimizer, name=name, **base)  # scheduler, compile, monitor, ...: MedensModule's
        if isinstance(pos_weight, str) and pos_weight != "balanced":
            raise ConfigError(f"model.pos_weight must be null, 'balanced' or a number, got {pos_weight!r}")
        if not 0.0 < float(threshold) < 1.0:
            raise ConfigError(f"model.threshold must be in (0, 1), got {threshold}")
        if not 0.0 < float(target_sensitivity) <= 1.0:
            raise ConfigError(f"model.target_sensitivity must be in (0, 1], got {target_sensitivity}")
        outputs = _num_outputs(net)
        if outputs is not None and outputs not in (1, 2):
            raise ConfigError(
                f"model.net.num_classes={outputs}: the CT classifier takes 1 (sigmoid) or 2 (softmax) outputs"
            )
        self.pos_weight_mode = pos_weight
        self.max_pos_weight = float(max_pos_weight)
        self.threshold = float(threshold)
        self.target_sensitivity = float(target_sensitivity)
        self.tta_flips = bool(tta_flips)
        self.register_buffer("pos_weight", None, persistent=False)
        self.operating_point: dict[str, Any] = {}
        # the epoch's exact ROC (torchmetrics, synced across DDP ranks): AUC and both operating points
        self.val_roc, self.test_roc = LabelROC(1), LabelROC(1)

    @property
    def sens_tag(self) -> str:
        """`90` for target_sensitivity 0.9: the suffix of the logged operating-point metrics."""
        return f"{round(self.target_sensitivity * 100):d}"

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        channels = getattr(dm, "num_channels", None)
        net_in = _in_channels(self.net)
        if channels is not None and net_in is not None and channels != net_in:
            raise ConfigError(
                f"model.net.n_input_channels={net_in} but data.channels gives {channels} channel(s) "
                f"({', '.join(getattr(dm, 'io_contract', dict)().get('channels', []))}); set them to agree"
            )
        mode = self.pos_weight_mode
        if mode is None:
            self.pos_weight = None
        elif mode == "balanced":
            if stage == "fit" and dm is not None:
                counts = dm.class_counts()
                ratio = counts["benign"] / max(counts["malignant"], 1)
                self.pos_weight = torch.tensor(
                    min(max(ratio, 1.0 / self.max_pos_weight), self.max_pos_weight)
                )
        else:
            self.pos_weight = torch.tensor(float(mode))

    # ------------------------------------------------------------------ forward
    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[1] not in (1, 2):
            raise ConfigError(f"CT network must return [batch, 1 or 2] logits, got {tuple(logits.shape)}")
        pw = self.pos_weight.to(logits.device) if self.pos_weight is not None else None
        if logits.shape[1] == 1:
            return nn.functional.binary_cross_entropy_with_logits(logits[:, 0], target, pos_weight=pw)
        weight = None if pw is None else torch.stack([torch.ones_like(pw), pw]).float()
        return nn.functional.cross_entropy(logits.float(), target.long(), weight=weight)

    @staticmethod
    def probability(logits: torch.Tensor) -> torch.Tensor:
        """Malignancy probability [N, 1] from [N, 1] (sigmoid) or [N, 2] (softmax) logits."""
        logits = logits.float()
        if logits.shape[1] == 1:
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=1)[:, 1:2]

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Malignancy probability [N, 1] of a batch, averaged over axis flips when `tta_flips`."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        if not self.tta_flips:
            return self.probability(self.net(x))
        probs = [self.probability(self.net(torch.flip(x, dims=f) if f else x)) for f in spatial_flips(x.ndim)]
        return torch.stack(probs).mean(0)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = batch["image"]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        loss = self._loss(self.net(x), batch["label"])
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=x.shape[0])  # fmt: skip
        return loss

    def _eval_step(self, stage: str, batch: dict[str, Any]) -> None:
        x = batch["image"]
        logits = self.net(x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x)
        loss = self._loss(logits, batch["label"])
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True, batch_size=x.shape[0])
        probs = self.predict_proba(x) if self.tta_flips else self.probability(logits)
        (self.val_roc if stage == "val" else self.test_roc).update(probs[:, 0], batch["label"].float())

    # ------------------------------------------------------------------ epoch metrics
    def log_epoch_metrics(self, stage: str) -> None:
        roc = self.val_roc if stage == "val" else self.test_roc
        if roc.update_count == 0:
            return
        auc = float(roc.auroc()[0])  # NaN without both classes (medens.metrics.classification)
        op = roc.operating_point(self.threshold, self.target_sensitivity)
        roc.reset()
        at = {"sensitivity": op["sensitivity"], "specificity": op["specificity"]}
        values = {
            "auc": auc,
            "sensitivity": at["sensitivity"],
            "specificity": at["specificity"],
            f"threshold_at_{self.sens_tag}_sensitivity": op["threshold_at_target"],
            f"specificity_at_{self.sens_tag}_sensitivity": op["specificity_at_target"],
        }
        for key, value in values.items():
            self.log(f"{stage}/{key}", value, sync_dist=False, rank_zero_only=False)
        if stage == "val" and not self.trainer.sanity_checking:
            self.operating_point = {
                "split": "val",
                "epoch": self.current_epoch + 1,
                "threshold": self.threshold,
                "sensitivity": at["sensitivity"],
                "specificity": at["specificity"],
                "target_sensitivity": self.target_sensitivity,
                "threshold_at_target_sensitivity": op["threshold_at_target"],
                "sensitivity_at_target_threshold": op["sensitivity_at_target"],
                "specificity_at_target_sensitivity": op["specificity_at_target"],
            }

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return {
            "probs": self.predict_proba(batch["image"]),
            "label": batch.get("label"),
            "case_id": batch["case_id"],
            "patient_id": batch.get("patient_id", batch["case_id"]),  # the bootstrap unit of evaluation
        }

    # ------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The base keys, plus the validation operating point of this checkpoint's epoch."""
        super().on_save_checkpoint(checkpoint)
        medens = checkpoint[MEDENS_KEY]
        op = {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in self.operating_point.items()
        }
        medens["operating_point"] = op or {
            "threshold": self.threshold,
            "target_sensitivity": self.target_sensitivity,
        }
        hyper = medens["hyperparameters"]
        hyper["io_contract"] = {
            **hyper.get("io_contract", {}),
            "decision_threshold": self.threshold,
            "threshold_at_target_sensitivity": op.get("threshold_at_target_sensitivity"),
            "target_sensitivity": self.target_sensitivity,
        }
