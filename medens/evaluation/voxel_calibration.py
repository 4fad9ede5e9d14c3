"""Voxel-level calibration of the MRI segmenter: reliability, ECE and Brier per region, temperature scaling.

Each region (whole tumour WT, tumour core TC, enhancing tumour ET) is a one-vs-rest probability read
from the network's softmax: ``p(region) = sum of softmax(logits / T) over the region's classes``, and
its outcome is "the ground-truth voxel is in the region". A volume holds millions of voxels, so the
metrics are computed on a sample:

- Sampling: in every labelled case, voxels inside the brain (any input channel non-zero: the background
  is exactly 0 after z-scoring), at most `voxels_per_case` (default 20,000) drawn uniformly without
  replacement, with a generator seeded by `seed` and the case id (the same voxels whatever the case
  order); a case with fewer brain voxels gives all of them. Uniform sampling keeps the voxels' natural
  class balance (most brain voxels are healthy), so ECE is the calibration a voxel-wise user sees.
- Temperature scaling (`calibration=temperature`): one temperature `T` for the whole softmax, fitted by
  minimising the multi-class log-loss of the sampled voxels of the checkpoint's own validation split.
  Dividing logits by `T` never changes their argmax, so the label map and every Dice/HD95 stay exactly
  as they are; only the probabilities (and ECE/Brier) change. Stored like the classifiers' calibration,
  beside the checkpoint as `<stem>.calibration.json` (bound to its SHA-256), copied into the export
  manifest's MRI entries, applied by evaluation (`calibration=auto`) and by serving.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize

from medens.errors import ConfigError
from medens.models.mri_postprocess import brain_of

KIND = "softmax_temperature"
FORMULA = "p(class) = softmax(logits / temperature); p(region) = sum of p(class) over the region's classes"
DEFAULT_VOXELS = 20_000


class VoxelSample:
    """A seeded sample of brain voxels of every labelled case: logits [N, C], labels [N], case of each voxel."""

    def __init__(self, voxels_per_case: int = DEFAULT_VOXELS, seed: int = 0) -> None:
        if int(voxels_per_case) < 1:
            raise ConfigError(f"calibration_voxels_per_case={voxels_per_case!r}: must be an integer >= 1")
        self.voxels_per_case = int(voxels_per_case)
        self.seed = int(seed)
        self._logits: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._cases: list[str] = []
        self.n_cases = 0

    def add(self, case_id: str, logits: Any, label: Any, image: Any) -> None:
        """Sample one case: `logits` [C, H, W, D], `label` [H, W, D] medens classes (None: skipped),
        `image` [channels, H, W, D] (its non-zero voxels are the brain)."""
        if label is None:
            return
        logits = _numpy(logits)
        label = _numpy(label).reshape(logits.shape[1:])
        brain = np.flatnonzero(brain_of(_numpy(image)))
        if brain.size == 0:
            return
        rng = np.random.default_rng([self.seed, zlib.crc32(str(case_id).encode())])
        if brain.size > self.voxels_per_case:
            brain = np.sort(rng.choice(brain, self.voxels_per_case, replace=False))
        flat = logits.reshape(logits.shape[0], -1)
        self._logits.append(flat[:, brain].T.astype(np.float32))
        self._labels.append(label.reshape(-1)[brain].astype(np.int64))
        self._cases += [str(case_id)] * len(brain)
        self.n_cases += 1

    @property
    def logits(self) -> np.ndarray:
        return np.concatenate(self._logits) if self._logits else np.zeros((0, 0), np.float32)

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate(self._labels) if self._labels else np.zeros(0, np.int64)

    @property
    def case_ids(self) -> list[str]:
        return list(self._cases)

    def __len__(self) -> int:
        return len(self._cases)

    def describe(self) -> dict[str, Any]:
        return {"voxels": len(self), "cases": self.n_cases, "voxels_per_case": self.voxels_per_case,
                "seed": self.seed, "where": "brain (any input channel non-zero), uniform without replacement"}  # fmt: skip


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def region_probabilities(
    logits: np.ndarray, regions: Mapping[str, Sequence[int]], temperature: float = 1.0
) -> np.ndarray:
    """[N, R]: one-vs-rest probability of each region (sum of its classes' softmax probabilities)."""
    p = softmax(logits, temperature)
    return np.stack([p[:, list(c)].sum(axis=1) for c in regions.values()], axis=1).clip(0.0, 1.0)


def region_targets(labels: np.ndarray, regions: Mapping[str, Sequence[int]]) -> np.ndarray:
    """[N, R]: 1 where the voxel's ground-truth class is in the region."""
    return np.stack([np.isin(labels, list(c)) for c in regions.values()], axis=1).astype(np.float64)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = np.asarray(logits, np.float64) / temperature
    m = z.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The softmax temperature minimising the voxels' multi-class log-loss (bounded to [e^-4, e^4])."""
    if len(labels) < 2 or len(np.unique(labels)) < 2:
        raise ConfigError(
            f"calibration=temperature: the validation sample has {len(labels)} voxel(s) of "
            f"{len(np.unique(labels))} class(es); fitting a temperature needs voxels of at least two classes"
        )
    res = minimize(lambda t: _nll(logits, labels, float(np.exp(t[0]))), x0=[0.0], method="L-BFGS-B",
                   bounds=[(-4.0, 4.0)])  # fmt: skip
    t = float(np.exp(res.x[0]))
    return {"temperature": t, "nll_before": _nll(logits, labels, 1.0), "nll_after": _nll(logits, labels, t)}


def temperature_of(calibration: Mapping[str, Any] | None) -> float:
    """The softmax temperature a stored calibration (file or manifest entry) holds; 1.0 for none."""
    if not calibration:
        return 1.0
    if calibration.get("kind") != KIND or calibration.get("temperature") is None:
        raise ConfigError(
            f"calibration {calibration.get('method')!r} of kind {calibration.get('kind')!r} is not a segmenter's "
            f"softmax temperature ({KIND}); refit it with calibration=temperature"
        )
    t = float(calibration["temperature"])
    if not np.isfinite(t) or t <= 0:
        raise ConfigError(f"calibration temperature {t!r} must be a finite number > 0")
    return t


def calibration_document(fitted: Mapping[str, Any], regions: Sequence[str]) -> dict[str, Any]:
    """What `save_calibration` stores for a segmenter (`outputs` keeps the classifiers' shape: empty
    scale/bias maps, so code that reads only `outputs` applies the identity)."""
    return {"method": "temperature", "kind": KIND, "formula": FORMULA, "temperature": fitted["temperature"],
            "nll_before": fitted["nll_before"], "nll_after": fitted["nll_after"], "regions": list(regions),
            "outputs": {}}  # fmt: skip


def reliability_report(
    sample: VoxelSample, regions: Mapping[str, Sequence[int]], temperature: float = 1.0, n_bins: int = 10
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(probabilities [N, R], targets [N, R], per-region ECE/Brier/bins) of the sampled voxels."""
    from medens.evaluation.calibration import calibration_summary

    probs = region_probabilities(sample.logits, regions, temperature)
    targets = region_targets(sample.labels, regions)
    names = [r.upper() for r in regions]
    return probs, targets, calibration_summary(probs, targets, names, n_bins)
