"""Brain-tumour segmentation (BraTS): MONAI 3D U-Net, Dice+CE loss, sliding-window validation.

The network is a plain `monai.networks.nets.UNet` built by Hydra from `model.net`, so a checkpoint's
`model_state_dict` loads into `UNet(**hyperparameters["model"]["net"])` without medens. Training
sees random patches; validation and test run sliding-window inference over whole (brain-cropped)
volumes and log Dice per class (necrotic core, oedema, enhancing) and per region (whole tumour,
tumour core, enhancing tumour); `val/dice` (mean of the three regions, the BraTS headline) decides
the best checkpoint.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer, SlidingWindowInferer
from monai.losses import DiceCELoss
from torch import nn
from torchmetrics import MeanMetric

from medens.data.mri.brats import LABEL_NAMES
from medens.errors import ConfigError
from medens.metrics.segmentation import BraTSSegmentationMetrics
from medens.models.base import MedensModule


def default_loss() -> nn.Module:
    """Dice (foreground classes, batch-wise) + cross-entropy over softmax outputs."""
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)


def default_inferer(roi_size: Sequence[int] = (128, 128, 128)) -> SlidingWindowInferer:
    """Gaussian-blended sliding windows of the training patch size, half overlapping."""
    return SlidingWindowInferer(roi_size=list(roi_size), sw_batch_size=1, overlap=0.5, mode="gaussian")


def without_padding(batch: dict[str, Any]) -> dict[str, Any] | None:
    """The items of a batch not flagged ``is_padding`` (DDP evaluation repeats); None if there are none."""
    flags = batch.get("is_padding")
    if flags is None:
        return batch
    keep = ~torch.as_tensor(flags, dtype=torch.bool).reshape(-1).cpu()
    if bool(keep.all()):
        return batch
    if not bool(keep.any()):
        return None
    n, idx = keep.numel(), keep.nonzero().flatten()
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n:
            out[key] = value[idx.to(value.device)]
        elif isinstance(value, (list, tuple)) and len(value) == n:
            out[key] = [value[i] for i in idx.tolist()]
        else:
            out[key] = value
    return out


class UNetSegmenter(MedensModule):
    """BraTS segmentation LightningModule around a bare 3D network (`self.net`).

    `loss` and `inferer` come from Hydra (`monai.losses.DiceCELoss`, `monai.inferers.SlidingWindowInferer`)
    so that ROI, overlap and window batch are config. HD95 is costly on whole volumes, so it is off for
    validation (every epoch) and on for test by default. Only `self.net` holds persistent state: the
    metric accumulators are non-persistent and the Dice+CE loss has no parameters.
    """

    monitor = "val/dice"
    monitor_mode = "max"
    metric_key = "val_dice"

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        loss: nn.Module | None = None,
        inferer: Inferer | None = None,
        val_hd95: bool = False,
        test_hd95: bool = True,
        hd95_empty_penalty: float | None = None,
        compile: bool = False,
        channels_last: bool = False,
        name: str = "unet",
        monitor: str | None = None,
        monitor_mode: str | None = None,
    ) -> None:
        super().__init__(net, optimizer, scheduler, scheduler_interval, compile, channels_last, name,
                         monitor=monitor, monitor_mode=monitor_mode)  # fmt: skip
        self.loss_fn = loss if loss is not None else default_loss()
        self.inferer = inferer if inferer is not None else default_inferer()
        self.hd95_empty_penalty = hd95_empty_penalty
        num_classes = int(getattr(net, "out_channels", len(LABEL_NAMES)))
        self.val_metrics = BraTSSegmentationMetrics(
            include_hd95=val_hd95, empty_penalty=hd95_empty_penalty, num_classes=num_classes
        )
        self.test_metrics = BraTSSegmentationMetrics(
            include_hd95=test_hd95, empty_penalty=hd95_empty_penalty, num_classes=num_classes
        )
        # Whole-volume loss, reduced across ranks at epoch end like the Dice: under DDP each rank takes
        # every world-th case, padded with flagged repeats (`is_padding`) that are skipped here.
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        in_ch = getattr(self.net, "in_channels", None)
        if in_ch is not None and hasattr(dm, "num_channels") and int(in_ch) != dm.num_channels:
            raise ConfigError(
                f"model.net.in_channels={in_ch} but the data has {dm.num_channels} modalities "
                f"({', '.join(dm.modalities)}); set model.net.in_channels={dm.num_channels}"
            )
        out_ch = getattr(self.net, "out_channels", None)
        if out_ch is not None and hasattr(dm, "num_classes") and int(out_ch) != dm.num_classes:
            raise ConfigError(
                f"model.net.out_channels={out_ch} but the data has {dm.num_classes} classes "
                f"({', '.join(dm.label_names)})"
            )

    # ------------------------------------------------------------------ steps
    def predict_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Whole-volume logits [B, classes, H, W, D] by sliding-window inference."""
        return self.inferer(image, self.net)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self.net(batch["image"])
        loss = self.loss_fn(logits, batch["label"])
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=batch["image"].shape[0])  # fmt: skip
        return loss

    def _eval_step(self, stage: str, batch: dict[str, Any]) -> None:
        metrics, loss_mean = (self.val_metrics, self.val_loss) if stage == "val" else (self.test_metrics, self.test_loss)
        batch = without_padding(batch)
        if batch is None or "label" not in batch:
            return
        logits = self.predict_logits(batch["image"])
        loss_mean.update(self.loss_fn(logits, batch["label"]).detach(), weight=batch["image"].shape[0])
        metrics.update(logits.argmax(dim=1), batch["label"], spacing=batch.get("spacing"))

    def _log_epoch(self, stage: str, metrics: BraTSSegmentationMetrics, loss_mean: MeanMetric) -> None:
        # compute() is collective under DDP: every rank calls it, also one that saw no case
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*before the ..update", category=UserWarning)
            values = {k: float(v) for k, v in metrics.compute().items()}
            loss = float(loss_mean.compute())
        metrics.reset()
        loss_mean.reset()
        if values.pop("n_cases") == 0:
            return
        mean = values.pop("dice_mean")
        # `val/dice` is the mean of the three regions; the rest per class and per region
        self.log(f"{stage}/loss", loss, sync_dist=False, rank_zero_only=False)
        self.log(f"{stage}/dice", mean, prog_bar=True, sync_dist=False, rank_zero_only=False)
        for key, value in values.items():
            self.log(f"{stage}/{key}", value, sync_dist=False, rank_zero_only=False)

    def log_epoch_metrics(self, stage: str) -> None:
        if stage == "val":
            self._log_epoch("val", self.val_metrics, self.val_loss)
        else:
            self._log_epoch("test", self.test_metrics, self.test_loss)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        logits = self.predict_logits(batch["image"])
        out = {k: v for k, v in batch.items() if k not in ("image",)}
        out["logits"] = logits  # evaluation samples voxels of them for calibration
        out["pred"] = logits.argmax(dim=1, keepdim=True).to(torch.uint8)
        return out
