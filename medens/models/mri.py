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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer, SlidingWindowInferer
from monai.losses import DiceCELoss
from torch import nn
from torchmetrics import MeanMetric, Metric

from medens.checkpoint.io import MEDENS_KEY
from medens.data.mri.brats import LABEL_NAMES
from medens.errors import ConfigError
from medens.metrics.segmentation import BraTSSegmentationMetrics, region_dice
from medens.models.base import MedensModule
from medens.models.mri_postprocess import (
    best_candidate,
    brain_of,
    check_choice,
    postprocess,
)
from medens.models.tta import flip_averaged_logits


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


class CandidateDice(Metric):
    """Sum of the wt/tc/et Dice of each postprocessing candidate over validation cases (summed over ranks)."""

    full_state_update = False

    def __init__(self, n_candidates: int) -> None:
        super().__init__()
        self.add_state("sums", default=torch.zeros(n_candidates, 3, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, dice: torch.Tensor) -> None:  # [n_candidates, 3] of one case
        self.sums += dice.to(self.sums)
        self.count += 1

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean Dice [n_candidates, 3], number of cases)."""
        return self.sums / self.count.clamp_min(1), self.count


class UNetSegmenter(MedensModule):
    """BraTS segmentation LightningModule around a bare 3D network (`self.net`).

    `loss` and `inferer` come from Hydra (`monai.losses.DiceCELoss`, `monai.inferers.SlidingWindowInferer`)
    so that ROI, overlap and window batch are config. HD95 is costly on whole volumes, so it is off for
    validation (every epoch) and on for test by default. Only `self.net` holds persistent state: the
    metric accumulators are non-persistent and the Dice+CE loss has no parameters.

    The nnU-Net inference recipe is config: `tta_flips` averages the softmax over the 8 mirrorings of the
    volume (test, predict and evaluation; validation too with `tta_in_validation`), and `postprocess`
    (`none`, one fixed candidate of `medens.models.mri_postprocess`, or `choose`) restricts the label map to
    the brain and removes small tumour components. With `choose`, every validation epoch scores each of
    `postprocess_candidates` on the validation cases and keeps the best (mean whole-tumour Dice); the choice
    of a checkpoint's epoch is saved in it (`postprocess`, and `io_contract.postprocess` for exports and the
    server) and applied to test and prediction label maps. `val/dice` stays the network's own figure.
    """

    monitor = "val/dice"
    monitor_mode = "max"
    metric_key = "val_dice"

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        loss: nn.Module | None = None,
        inferer: Inferer | None = None,
        val_hd95: bool = False,
        test_hd95: bool = True,
        hd95_empty_penalty: float | None = None,
        name: str = "unet",
        tta_flips: bool = False,
        tta_in_validation: bool = False,
        postprocess: str | Mapping[str, Any] | None = "none",
        postprocess_candidates: Sequence[Mapping[str, Any]] | None = None,
        **base: Any,
    ) -> None:
        super().__init__(net, optimizer, name=name, **base)  # scheduler, compile, monitor, ...: MedensModule's
        self.tta_flips = bool(tta_flips)
        self.tta_in_validation = bool(tta_in_validation)
        self.postprocess_mode, fixed, self.postprocess_candidates = check_choice(postprocess, postprocess_candidates)
        self.postprocess_spec: dict[str, Any] | None = fixed  # `choose`: set by each validation epoch
        self.candidate_dice = (
            CandidateDice(len(self.postprocess_candidates)) if self.postprocess_mode == "choose" else None
        )
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
    def predict_logits(self, image: torch.Tensor, tta: bool | None = None) -> torch.Tensor:
        """Whole-volume logits [B, classes, H, W, D] by sliding-window inference; with test-time mirroring
        (`tta`, default `tta_flips`) the log of the flip-averaged softmax."""
        if not (self.tta_flips if tta is None else tta):
            return self.inferer(image, self.net)
        return flip_averaged_logits(lambda x: self.inferer(x, self.net), image)

    def active_postprocess(self) -> dict[str, Any] | None:
        """The postprocessing applied to test and prediction label maps: the fixed one, or the one chosen on
        validation (this run's, or the checkpoint's `io_contract.postprocess` for a rebuilt module)."""
        if self.postprocess_mode == "none":
            return None
        return self.postprocess_spec or (self.io_contract or {}).get("postprocess")

    def postprocessed(self, pred: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Label maps [B, H, W, D] after `active_postprocess` (brain = non-zero voxels of the z-scored image)."""
        spec = self.active_postprocess()
        if not spec:
            return pred
        out = [postprocess(p.cpu().numpy(), brain_of(x.cpu().numpy()), spec) for p, x in zip(pred, image, strict=True)]
        return torch.as_tensor(np.stack(out), device=pred.device, dtype=pred.dtype)

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
        image = batch["image"]
        logits = self.predict_logits(image, tta=self.tta_flips and (stage != "val" or self.tta_in_validation))
        loss_mean.update(self.loss_fn(logits, batch["label"]).detach(), weight=image.shape[0])
        pred = logits.argmax(dim=1)
        if stage == "val" and self.candidate_dice is not None:
            self._score_candidates(pred, batch["label"], image)
        if stage != "val":
            pred = self.postprocessed(pred, image)
        metrics.update(pred, batch["label"], spacing=batch.get("spacing"))

    def _score_candidates(self, pred: torch.Tensor, label: torch.Tensor, image: torch.Tensor) -> None:
        assert self.candidate_dice is not None
        for p, t, x in zip(pred.cpu().numpy(), label[:, 0].cpu().numpy(), image.cpu().numpy(), strict=True):
            brain = brain_of(x)
            rows = [region_dice(postprocess(p, brain, c), t) for c in self.postprocess_candidates]
            self.candidate_dice.update(torch.tensor([[r["wt"], r["tc"], r["et"]] for r in rows]))

    def _choose_postprocess(self) -> None:
        """End of a validation epoch with `postprocess=choose`: keep the best candidate, log its Dice."""
        assert self.candidate_dice is not None
        with warnings.catch_warnings():  # collective under DDP: every rank calls it, also one that saw no case
            warnings.filterwarnings("ignore", message=".*compute.*before the ..update", category=UserWarning)
            means, n = self.candidate_dice.compute()
        self.candidate_dice.reset()
        if float(n) == 0:
            return
        table = [{"wt": float(m[0]), "tc": float(m[1]), "et": float(m[2])} for m in means]
        best = best_candidate(table)
        self.postprocess_spec = dict(self.postprocess_candidates[best])
        self.log("val/postprocess_candidate", float(best), sync_dist=False, rank_zero_only=False)
        self.log("val/dice_postprocessed", float(np.mean(list(table[best].values()))), sync_dist=False,
                 rank_zero_only=False)  # fmt: skip

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
            if self.candidate_dice is not None:
                self._choose_postprocess()
        else:
            self._log_epoch("test", self.test_metrics, self.test_loss)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        logits = self.predict_logits(batch["image"])
        out = {k: v for k, v in batch.items() if k not in ("image",)}
        out["logits"] = logits  # evaluation samples voxels of them for calibration
        out["pred"] = self.postprocessed(logits.argmax(dim=1), batch["image"])[:, None].to(torch.uint8)
        return out

    # ------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The base keys, plus the postprocessing this checkpoint's predictions get (chosen or fixed)."""
        super().on_save_checkpoint(checkpoint)
        spec = self.active_postprocess()
        medens = checkpoint[MEDENS_KEY]
        medens["postprocess"] = spec
        hyper = medens["hyperparameters"]
        hyper["io_contract"] = {**hyper.get("io_contract", {}), "postprocess": spec}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        spec = checkpoint.get(MEDENS_KEY, {}).get("postprocess")
        if self.postprocess_mode == "choose" and spec:
            self.postprocess_spec = dict(spec)
