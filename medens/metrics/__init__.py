"""Evaluation metrics shared by medens models and reports (conventions in each module's docstring)."""

from .classification import LabelROC, mean_defined, operating_point, per_label_auroc
from .segmentation import (
    CLASS_NAMES,
    DICE_KEYS,
    HD95_KEYS,
    REGIONS,
    BraTSSegmentationMetrics,
    counted_dice,
    dice,
    hd95,
    mean_metrics,
    region_dice,
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
    "LabelROC",
    "counted_dice",
    "dice",
    "hd95",
    "mean_defined",
    "mean_metrics",
    "operating_point",
    "per_label_auroc",
    "region_dice",
    "segmentation_dice",
    "segmentation_hd95",
    "segmentation_metrics",
]
