"""Test-time mirroring, one enumeration of the flips for every modality: the CT classifier averages its
malignancy probability over them, the segmenter (and the MRI cross-validation) its softmax, and the server
does the same around an export, so a served prediction equals evaluation's."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch


def spatial_flips(ndim: int) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes of a [B, C, *spatial] tensor of `ndim` dims, the identity first
    (3D: (), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4))."""
    axes = range(2, ndim)
    return [f for r in range(len(axes) + 1) for f in itertools.combinations(axes, r)]


def flip_averaged_logits(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Test-time mirroring: log of the softmax averaged over every flip of the spatial axes of `x`
    ([B, C, *spatial]), each prediction flipped back. Softmax of the result is the averaged probability,
    so it stands in for logits wherever those are used (argmax, loss, temperature)."""
    flips = spatial_flips(x.ndim)
    total: torch.Tensor | None = None
    for f in flips:
        prob = torch.softmax(fn(torch.flip(x, dims=f) if f else x).float(), dim=1)
        prob = torch.flip(prob, dims=f) if f else prob
        total = prob if total is None else total + prob
    assert total is not None
    return torch.log((total / len(flips)).clamp_min(1e-8))
