"""Evaluation metrics shared by medens models."""

from .segmentation import (
    CLASS_NAMES,
    DICE_KEYS,
    HD95_KEYS,
    REGIONS,
    BraTSSegmentationMetrics,
    dice,
    hd95,
    mean_metrics,
    segmentation_dice,
    segmentation_hd95,
    segmentation_metrics,
)

__all__ = [
    "CLASS_NAMES",
    "DICE_KEYS",
    "HD95_KEYS",
    "REGIONS",
    "BraTSSegmentationMetrics",
    "dice",
    "hd95",
    "mean_metrics",
    "segmentation_dice",
    "segmentation_hd95",
    "segmentation_metrics",
]
