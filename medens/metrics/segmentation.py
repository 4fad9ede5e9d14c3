"""BraTS segmentation metrics over integer label maps (0 background, 1 necrotic core, 2 oedema, 3 enhancing).

Per case: Dice per class (1..3) and per region (WT = {1,2,3}, TC = {1,3}, ET = {3}), their means,
and the 95th-percentile Hausdorff distance (HD95, mm) per region.

Empty structures (documented convention, as in the BraTS challenge where it is defined):
- Dice: both prediction and ground truth empty -> 1.0 (correctly found nothing); exactly one
  empty -> 0.0.
- HD95: both empty -> 0.0. Exactly one empty -> undefined: NaN by default, and
  ``hd95_<region>_undefined`` = 1 in the per-case dict; pass ``empty_penalty`` (BraTS uses 373.13,
  the image diagonal) to use that value instead. The accumulator averages HD95 over the cases where
  it is defined and reports how many were undefined.

HD95 is the symmetric 95th percentile: max of the two directed 95th percentiles of
surface-to-surface distances (surface = mask voxels with a 6-neighbour outside the mask),
measured in mm with the voxel spacing; this matches MONAI's ``compute_hausdorff_distance``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage
from torchmetrics import Metric

CLASS_NAMES: tuple[str, ...] = ("necrotic_core", "edema", "enhancing")  # classes 1, 2, 3
REGIONS: dict[str, tuple[int, ...]] = {"wt": (1, 2, 3), "tc": (1, 3), "et": (3,)}
DICE_KEYS: tuple[str, ...] = (
    *(f"dice_{n}" for n in CLASS_NAMES),
    *(f"dice_{r}" for r in REGIONS),
    "dice_mean_class",
    "dice_mean",
)
HD95_KEYS: tuple[str, ...] = tuple(f"hd95_{r}" for r in REGIONS)

ArrayLike = np.ndarray | torch.Tensor


def _np(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _as_label_map(x: ArrayLike, name: str) -> np.ndarray:
    arr = _np(x)
    while arr.ndim > 3 and arr.shape[0] == 1:  # [1, H, W, D] -> [H, W, D]
        arr = arr[0]
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"{name}: expected a 2-D/3-D label map (optionally with a leading 1), got {arr.shape}"
        )
    return arr


def dice(pred_mask: ArrayLike, gt_mask: ArrayLike) -> float:
    """Dice of two binary masks; 1.0 when both are empty (see module docstring)."""
    p, g = _np(pred_mask).astype(bool), _np(gt_mask).astype(bool)
    denom = int(p.sum()) + int(g.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, g).sum()) / denom


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred_mask: ArrayLike, gt_mask: ArrayLike, spacing: Sequence[float] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm; 0.0 if both empty, NaN if exactly one is."""
    p, g = _np(pred_mask).astype(bool), _np(gt_mask).astype(bool)
    if p.shape != g.shape:
        raise ValueError(f"shape mismatch: prediction {p.shape} vs ground truth {g.shape}")
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p and not has_g:
        return 0.0
    if not has_p or not has_g:
        return float("nan")
    sp = np.ones(p.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)[: p.ndim]
    # restrict to the box around both masks (+1 voxel of background): exact, and much faster
    union = p | g
    lo = [
        int(np.flatnonzero(union.any(axis=tuple(a for a in range(p.ndim) if a != ax)))[0])
        for ax in range(p.ndim)
    ]
    hi = [
        int(np.flatnonzero(union.any(axis=tuple(a for a in range(p.ndim) if a != ax)))[-1]) + 1
        for ax in range(p.ndim)
    ]
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    p = np.pad(p[box], 1)
    g = np.pad(g[box], 1)
    sp_p, sp_g = _surface(p), _surface(g)
    dist_to_g = ndimage.distance_transform_edt(~sp_g, sampling=sp)
    dist_to_p = ndimage.distance_transform_edt(~sp_p, sampling=sp)
    return float(max(np.percentile(dist_to_g[sp_p], 95), np.percentile(dist_to_p[sp_g], 95)))


def segmentation_dice(pred: ArrayLike, target: ArrayLike) -> dict[str, float]:
    """Dice per class (``dice_necrotic_core``, ``dice_edema``, ``dice_enhancing``), per region
    (``dice_wt``, ``dice_tc``, ``dice_et``), ``dice_mean_class`` and ``dice_mean`` (mean of the three
    regions, the BraTS headline number).
    """
    p, g = _as_label_map(pred, "pred"), _as_label_map(target, "target")
    if p.shape != g.shape:
        raise ValueError(f"shape mismatch: prediction {p.shape} vs ground truth {g.shape}")
    out: dict[str, float] = {}
    for c, name in enumerate(CLASS_NAMES, start=1):
        out[f"dice_{name}"] = dice(p == c, g == c)
    for r, classes in REGIONS.items():
        out[f"dice_{r}"] = dice(np.isin(p, classes), np.isin(g, classes))
    out["dice_mean_class"] = float(np.mean([out[f"dice_{n}"] for n in CLASS_NAMES]))
    out["dice_mean"] = float(np.mean([out[f"dice_{r}"] for r in REGIONS]))
    return out


def segmentation_hd95(
    pred: ArrayLike,
    target: ArrayLike,
    spacing: Sequence[float] | None = None,
    empty_penalty: float | None = None,
) -> dict[str, float]:
    """HD95 per region (``hd95_wt``, ``hd95_tc``, ``hd95_et``) plus ``hd95_<r>_undefined`` flags (0/1)."""
    p, g = _as_label_map(pred, "pred"), _as_label_map(target, "target")
    if p.shape != g.shape:
        raise ValueError(f"shape mismatch: prediction {p.shape} vs ground truth {g.shape}")
    out: dict[str, float] = {}
    for r, classes in REGIONS.items():
        v = hd95(np.isin(p, classes), np.isin(g, classes), spacing)
        undefined = bool(np.isnan(v))
        out[f"hd95_{r}"] = float(empty_penalty) if undefined and empty_penalty is not None else v
        out[f"hd95_{r}_undefined"] = float(undefined)
    return out


def segmentation_metrics(
    pred: ArrayLike,
    target: ArrayLike,
    spacing: Sequence[float] | None = None,
    include_hd95: bool = True,
    empty_penalty: float | None = None,
) -> dict[str, float]:
    """All per-case metrics of one prediction/ground-truth pair of label maps."""
    out = segmentation_dice(pred, target)
    if include_hd95:
        out.update(segmentation_hd95(pred, target, spacing, empty_penalty))
    return out


def _to_label_batch(x: torch.Tensor, num_classes: int, name: str) -> torch.Tensor:
    """[B,C,...] logits/probabilities -> argmax; [B,1,...] or [B,...] label maps -> [B,...]."""
    if x.is_floating_point() and x.ndim >= 4 and x.shape[1] == num_classes and num_classes > 1:
        return x.argmax(dim=1)
    if x.ndim >= 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim not in (3, 4):
        raise ValueError(
            f"{name}: expected [B,H,W,D], [B,1,H,W,D] or [B,{num_classes},H,W,D], got {tuple(x.shape)}"
        )
    return x.long()


class BraTSSegmentationMetrics(Metric):
    """Accumulates per-case BraTS metrics over batches; ``compute()`` returns the mean over cases.

    Use in a LightningModule: ``self.val_metrics.update(logits_or_labels, batch["label"],
    spacing=batch["spacing"])`` per validation batch, then ``self.log_dict(self.val_metrics.compute())``
    and ``reset()`` at epoch end. States are sums and counts reduced with ``sum`` across DDP processes,
    so the result is the mean over all cases of all processes. HD95 means skip undefined cases; their
    number is reported as ``hd95_<r>_undefined``. ``n_cases`` is the number of cases seen.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self,
        include_hd95: bool = True,
        empty_penalty: float | None = None,
        num_classes: int = 4,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        self.include_hd95 = include_hd95
        self.empty_penalty = empty_penalty
        self.num_classes = num_classes
        self.keys: tuple[str, ...] = DICE_KEYS + (HD95_KEYS if include_hd95 else ())
        k = len(self.keys)
        self.add_state("sums", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(
            "undefined", default=torch.zeros(len(REGIONS), dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("n_cases", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        preds: torch.Tensor,
        target: torch.Tensor,
        spacing: torch.Tensor | Sequence[float] | Sequence[Sequence[float]] | None = None,
    ) -> None:
        """Add one batch of cases; ``spacing`` is one (3,) spacing for all or a [B,3] batch of spacings."""
        p = _to_label_batch(torch.as_tensor(preds), self.num_classes, "preds").cpu().numpy()
        g = _to_label_batch(torch.as_tensor(target), self.num_classes, "target").cpu().numpy()
        if p.shape != g.shape:
            raise ValueError(f"shape mismatch: preds {p.shape} vs target {g.shape}")
        sp = None if spacing is None else _np(torch.as_tensor(spacing)).astype(np.float64)
        sums = np.zeros(len(self.keys))
        counts = np.zeros(len(self.keys))
        undefined = np.zeros(len(REGIONS))
        for b in range(p.shape[0]):
            case_sp = None if sp is None else (sp[b] if sp.ndim == 2 else sp)
            m = segmentation_metrics(p[b], g[b], case_sp, self.include_hd95, self.empty_penalty)
            for i, key in enumerate(self.keys):
                if not np.isnan(m[key]):
                    sums[i] += m[key]
                    counts[i] += 1
            if self.include_hd95:
                undefined += [m[f"hd95_{r}_undefined"] for r in REGIONS]
        self.sums += torch.as_tensor(sums, dtype=torch.float64, device=self.sums.device)
        self.counts += torch.as_tensor(counts, dtype=torch.float64, device=self.counts.device)
        self.undefined += torch.as_tensor(undefined, dtype=torch.float64, device=self.undefined.device)
        self.n_cases += p.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        """Mean of each metric over cases (NaN where no case defined it), plus counts."""
        means = torch.where(
            self.counts > 0, self.sums / self.counts.clamp(min=1), torch.full_like(self.sums, float("nan"))
        )
        out = {k: means[i].float() for i, k in enumerate(self.keys)}
        if self.include_hd95:
            for j, r in enumerate(REGIONS):
                out[f"hd95_{r}_undefined"] = self.undefined[j].float()
        out["n_cases"] = self.n_cases.float()
        return out


def mean_metrics(per_case: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Plain accumulator: mean of per-case metric dicts, NaNs skipped (NaN if a key is never defined)."""
    keys = sorted({k for m in per_case for k in m})
    out = {}
    for k in keys:
        vals = np.asarray([m[k] for m in per_case if k in m], dtype=np.float64)
        if k.endswith("_undefined"):
            out[k] = float(vals.sum())
        else:
            vals = vals[~np.isnan(vals)]
            out[k] = float(vals.mean()) if vals.size else float("nan")
    return out
