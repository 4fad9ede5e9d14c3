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

Both come from MONAI: Dice is ``DiceMetric(include_background=True, ignore_empty=False)`` (whose empty-mask
behaviour is exactly the convention above) and HD95 is ``HausdorffDistanceMetric(percentile=95)``, the
symmetric 95th percentile of surface-to-surface distances in mm with the voxel spacing. The thin layer
here only maps BraTS label maps to class/region masks and applies the HD95 empty-mask convention, which
MONAI leaves as nan/inf. `BraTSSegmentationMetrics` accumulates the per-case values as torchmetrics states.
`counted_dice`/`region_dice` give the same Dice by counting voxels (tested equal), 5-20x faster on CPU
volumes, for loops that score many candidates (postprocessing choices, FLAIR thresholds).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from torchmetrics import Metric

from medens.data.mri.brats import LABEL_NAMES, REGIONS

CLASS_NAMES: tuple[str, ...] = LABEL_NAMES[1:]  # classes 1, 2, 3
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


def _channels(masks: Sequence[np.ndarray]) -> torch.Tensor:
    """Binary masks [H,W,D] -> one MONAI batch item [1, len(masks), H, W, D]."""
    return torch.from_numpy(np.stack([np.asarray(m, dtype=bool) for m in masks]).astype(np.float32))[None]


@contextmanager
def _monai_quiet() -> Iterator[None]:
    """MONAI's own deprecation note (get_mask_edges) and its empty-mask warnings are this module's
    business: the empty-mask cases are decided here, by the documented convention."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        warnings.filterwarnings("ignore", message=".*(ground truth|prediction) of class .* is all 0.*")
        yield


def _dice_channels(p: list[np.ndarray], g: list[np.ndarray]) -> list[float]:
    """MONAI `DiceMetric` per channel; ``ignore_empty=False`` is the convention (both empty 1, one 0)."""
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    with _monai_quiet():
        values = metric(_channels(p), _channels(g))
    return [float(v) for v in values[0]]


def _hd95_channels(p: list[np.ndarray], g: list[np.ndarray], spacing: Sequence[float] | None) -> list[float]:
    """MONAI `HausdorffDistanceMetric(percentile=95)` per channel, with the empty-mask convention
    (both empty 0.0, exactly one empty NaN) decided here rather than by MONAI's nan/inf."""
    out = [math.nan] * len(p)
    both = [i for i in range(len(p)) if p[i].any() and g[i].any()]
    for i in range(len(p)):
        if not p[i].any() and not g[i].any():
            out[i] = 0.0
    if both:
        ndim = p[0].ndim
        sp = None if spacing is None else [float(v) for v in np.asarray(spacing, dtype=np.float64)[:ndim]]
        metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
        with _monai_quiet():
            values = metric(_channels([p[i] for i in both]), _channels([g[i] for i in both]), spacing=sp)
        for j, i in enumerate(both):
            out[i] = float(values[0, j])
    return out


def dice(pred_mask: ArrayLike, gt_mask: ArrayLike) -> float:
    """Dice of two binary masks; 1.0 when both are empty (see module docstring)."""
    return _dice_channels([_np(pred_mask).astype(bool)], [_np(gt_mask).astype(bool)])[0]


def counted_dice(pred_mask: ArrayLike, gt_mask: ArrayLike) -> float:
    """`dice` by counting voxels (no float copies of the volumes): the same value and empty-mask convention."""
    p, t = _np(pred_mask).astype(bool, copy=False), _np(gt_mask).astype(bool, copy=False)
    denom = int(np.count_nonzero(p)) + int(np.count_nonzero(t))
    return 1.0 if denom == 0 else 2.0 * int(np.count_nonzero(p & t)) / denom


def region_dice(pred: ArrayLike, truth: ArrayLike) -> dict[str, float]:
    """``{wt, tc, et}`` Dice of two label maps by `counted_dice` (``dice_<region>`` of `segmentation_dice`)."""
    p, t = _np(pred), _np(truth)
    return {r: counted_dice(np.isin(p, c), np.isin(t, c)) for r, c in REGIONS.items()}


def hd95(pred_mask: ArrayLike, gt_mask: ArrayLike, spacing: Sequence[float] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm; 0.0 if both empty, NaN if exactly one is."""
    p, g = _np(pred_mask).astype(bool), _np(gt_mask).astype(bool)
    if p.shape != g.shape:
        raise ValueError(f"shape mismatch: prediction {p.shape} vs ground truth {g.shape}")
    return _hd95_channels([p], [g], spacing)[0]


def segmentation_dice(pred: ArrayLike, target: ArrayLike) -> dict[str, float]:
    """Dice per class (``dice_necrotic_core``, ``dice_edema``, ``dice_enhancing``), per region
    (``dice_wt``, ``dice_tc``, ``dice_et``), ``dice_mean_class`` and ``dice_mean`` (mean of the three
    regions, the BraTS headline number).
    """
    p, g = _as_label_map(pred, "pred"), _as_label_map(target, "target")
    if p.shape != g.shape:
        raise ValueError(f"shape mismatch: prediction {p.shape} vs ground truth {g.shape}")
    names = [f"dice_{n}" for n in CLASS_NAMES] + [f"dice_{r}" for r in REGIONS]
    pm = [p == c for c in range(1, len(CLASS_NAMES) + 1)] + [np.isin(p, c) for c in REGIONS.values()]
    gm = [g == c for c in range(1, len(CLASS_NAMES) + 1)] + [np.isin(g, c) for c in REGIONS.values()]
    out = dict(zip(names, _dice_channels(pm, gm), strict=True))
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
    values = _hd95_channels([np.isin(p, c) for c in REGIONS.values()], [np.isin(g, c) for c in REGIONS.values()],
                            spacing)  # fmt: skip
    out: dict[str, float] = {}
    for r, v in zip(REGIONS, values, strict=True):
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
