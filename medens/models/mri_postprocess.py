"""Postprocessing of BraTS label maps, chosen on validation cases (the nnU-Net way).

Candidates: restrict every tumour label to the brain mask; remove connected components of the whole
tumour smaller than ``min_size`` voxels; keep only the largest whole-tumour component. `choose_postprocess`
scores each candidate on validation cases and keeps the one with the best mean whole-tumour Dice
(ties go to the simpler one, listed first). The module, cross-validation and the server share these, so a
served label map equals evaluation's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from medens.errors import ConfigError
from medens.metrics.segmentation import region_dice

KEYS = {"brain_only", "min_size", "largest_only"}


def check_postprocess(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validated candidate: ``{brain_only: bool, min_size: int >= 0, largest_only: bool}``."""
    unknown = set(spec) - KEYS
    if unknown:
        raise ConfigError(f"postprocess candidate: unknown key(s) {sorted(unknown)}; known: {sorted(KEYS)}")
    out = {
        "brain_only": bool(spec.get("brain_only", False)),
        "min_size": int(spec.get("min_size", 0) or 0),
        "largest_only": bool(spec.get("largest_only", False)),
    }
    if out["min_size"] < 0:
        raise ConfigError(f"postprocess candidate: min_size must be >= 0, got {out['min_size']}")
    return out


def postprocess(labels: np.ndarray, brain: np.ndarray | None, spec: Mapping[str, Any]) -> np.ndarray:
    """Apply one candidate to a label map; components are those of the whole tumour (26-connected)."""
    s = check_postprocess(spec)
    out = np.array(labels, copy=True)
    if s["brain_only"] and brain is not None:
        out[~np.asarray(brain, bool)] = 0
    if s["min_size"] > 0 or s["largest_only"]:
        comp, n = ndimage.label(out > 0, structure=np.ones((3,) * out.ndim, bool))
        if n:
            sizes = np.bincount(comp.ravel())[1:]
            keep = sizes >= s["min_size"]
            if s["largest_only"]:
                keep = np.zeros_like(keep)
                keep[int(np.argmax(sizes))] = True
            out[~np.concatenate([[False], keep])[comp]] = 0
    return out


DEFAULT_CANDIDATES: tuple[dict[str, Any], ...] = (
    {},
    {"brain_only": True},
    {"brain_only": True, "min_size": 500},
    {"brain_only": True, "min_size": 2000},
    {"brain_only": True, "largest_only": True},
)


def brain_of(image: np.ndarray) -> np.ndarray:
    """Brain mask [H, W, D] of a preprocessed case [C, H, W, D]: z-scored channels are exactly 0 outside it."""
    return np.any(np.asarray(image) != 0, axis=0)


def check_choice(value: Any, candidates: Sequence[Mapping[str, Any]] | None) -> tuple[str, dict[str, Any] | None, list[dict[str, Any]]]:
    """``(mode, fixed spec, candidates)`` of a ``postprocess`` setting: ``none``, ``choose`` (on validation,
    among `candidates` or `DEFAULT_CANDIDATES`) or one fixed candidate mapping."""
    cands = [check_postprocess(c) for c in (candidates if candidates is not None else DEFAULT_CANDIDATES)]
    if value is None or value == "none":
        return "none", None, cands
    if value == "choose":
        if not cands:
            raise ConfigError("postprocess=choose: the candidate list is empty")
        return "choose", None, cands
    if isinstance(value, Mapping):
        return "fixed", check_postprocess(value), cands
    raise ConfigError(f"postprocess must be none, choose or a candidate mapping {sorted(KEYS)}, got {value!r}")


def best_candidate(table: Sequence[Mapping[str, Any]]) -> int:
    """Index of the row with the best mean whole-tumour Dice; ties go to the simpler one, listed first."""
    return max(range(len(table)), key=lambda i: (table[i]["wt"], -i))


def choose_postprocess(
    preds: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    brains: Sequence[np.ndarray | None],
    candidates: Sequence[Mapping[str, Any]] = DEFAULT_CANDIDATES,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The candidate with the best mean whole-tumour Dice on the given (validation) cases, and the table."""
    if not candidates:
        raise ConfigError("postprocess: the candidate list is empty")
    table = []
    for spec in candidates:
        d = [region_dice(postprocess(p, b, spec), t) for p, t, b in zip(preds, truths, brains, strict=True)]
        table.append({"spec": check_postprocess(spec), "wt": float(np.mean([x["wt"] for x in d])),
                      "tc": float(np.mean([x["tc"] for x in d])), "et": float(np.mean([x["et"] for x in d]))})  # fmt: skip
    return table[best_candidate(table)]["spec"], table
