"""The stacking meta-learner: a 2-hidden-layer MLP over frozen base-model features.

Its input is the ensemble datamodule's vector (z-scored base outputs, 0 where a modality is missing,
then one missing-indicator per modality); its output one logit per patient-level target. Training
randomly hides whole modalities (`modality_dropout`), so it learns to predict from any subset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medens.errors import ConfigError
from medens.metrics.classification import LabelROC, mean_defined
from medens.models.base import MedensModule


class StackingMLP(nn.Module):
    """in -> hidden[0] -> hidden[1] -> out, ReLU and dropout between; ~48K parameters at the defaults.

    `in_features`/`out_features` may be left None in config: the stacking datamodule knows them and
    `build` creates the layers at setup (the checkpoint then records the numbers).
    """

    def __init__(
        self,
        in_features: int | None = None,
        out_features: int | None = None,
        hidden: Sequence[int] = (256, 160),
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.hidden = [int(h) for h in hidden]
        self.dropout = float(dropout)
        self.in_features = in_features
        self.out_features = out_features
        self.layers: nn.Sequential | None = None
        if in_features is not None and out_features is not None:
            self.build(in_features, out_features)

    def build(self, in_features: int, out_features: int) -> None:
        if self.layers is not None:
            if (self.in_features, self.out_features) != (in_features, out_features):
                raise ConfigError(
                    f"meta-learner built for {self.in_features} inputs / {self.out_features} targets, "
                    f"but the data has {in_features} / {out_features}"
                )
            return
        self.in_features, self.out_features = int(in_features), int(out_features)
        dims = [self.in_features, *self.hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(self.dropout)]
        layers.append(nn.Linear(dims[-1], self.out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layers is None:
            raise RuntimeError("StackingMLP.build(in_features, out_features) has not been called")
        return self.layers(x)


class MetaLearner(MedensModule):
    """Stacking head over the base models' features; val/auc (mean over targets) picks the checkpoint."""

    monitor = "val/auc"
    monitor_mode = "max"
    metric_key = "val_auc"

    def __init__(
        self,
        net: StackingMLP,
        modality_dropout: float | None = None,
        name: str = "meta_learner",
        **base: Any,
    ) -> None:
        super().__init__(net=net, name=name, **base)  # optimizer, scheduler, monitor, ...: MedensModule's
        self.modality_dropout = modality_dropout
        self.targets: list[str] = []
        self._slices: dict[str, tuple[list[int], int]] = {}
        self.val_roc: LabelROC | None = None  # built at setup, when the number of targets is known
        self.test_roc: LabelROC | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "num_features"):
            return
        self.net.build(dm.num_features, len(dm.targets))
        self.targets = list(dm.targets)
        if self.val_roc is None or self.val_roc.num_labels != len(self.targets):
            self.val_roc, self.test_roc = LabelROC(len(self.targets)), LabelROC(len(self.targets))
        self._slices = dm.modality_slices()
        if self.modality_dropout is None:
            self.modality_dropout = float(getattr(dm, "modality_dropout", 0.0))
        net_cfg = self.run_config.get("model", {}).get("net")
        if isinstance(net_cfg, dict):  # the checkpoint records the built sizes
            net_cfg["in_features"], net_cfg["out_features"] = self.net.in_features, self.net.out_features

    def _drop_modalities(self, x: torch.Tensor) -> torch.Tensor:
        """Hide each present modality of each case with probability `modality_dropout` (never all)."""
        if not self.modality_dropout or len(self._slices) < 2:
            return x
        x = x.clone()
        mods = list(self._slices.values())
        drop = torch.rand(x.shape[0], len(mods), device=x.device) < self.modality_dropout
        drop[drop.all(1)] = False
        for j, (cols, ind) in enumerate(mods):
            rows = drop[:, j] & (x[:, ind] < 0.5)
            x[rows.nonzero(as_tuple=True)[0].unsqueeze(1), torch.tensor(cols, device=x.device)] = 0.0
            x[rows, ind] = 1.0
        return x

    @staticmethod
    def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ok = ~torch.isnan(y)
        return nn.functional.binary_cross_entropy_with_logits(logits[ok], y[ok])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self._loss(self.net(self._drop_modalities(x)), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(x))
        return loss

    def _eval_step(self, stage: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        logits = self.net(x)
        self.log(f"{stage}/loss", self._loss(logits, y), on_step=False, on_epoch=True, batch_size=len(x))
        roc = self.val_roc if stage == "val" else self.test_roc
        if roc is None:
            raise ConfigError("MetaLearner: evaluation before setup (the number of targets is set from the data)")
        roc.update(torch.sigmoid(logits), y)

    def log_epoch_metrics(self, stage: str) -> None:
        roc = self.val_roc if stage == "val" else self.test_roc
        if roc is None or roc.update_count == 0:
            return
        per = [float(v) for v in roc.auroc()]  # torchmetrics syncs the epoch's scores across DDP ranks
        roc.reset()
        self.log(f"{stage}/auc", mean_defined(per))
        for name, v in zip(self.targets, per, strict=False):
            if v == v:
                self.log(f"{stage}/auc_{name}", v)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))
