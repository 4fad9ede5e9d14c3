"""MRI (BraTS) data: case discovery and presets, transforms, the DataModule and a synthetic generator."""

from .brats import (
    CANONICAL_MODALITIES,
    LABEL_NAMES,
    LABEL_PRESETS,
    MODALITY_ALIASES,
    NAMING_PRESETS,
    NUM_CLASSES,
    REGIONS,
    BraTSCase,
    discover_cases,
    map_labels,
    patient_id_from_case,
    resolve_label_map,
)
from .datamodule import BraTSDataModule
from .synthetic import generate_brats_synthetic
from .transforms import inverse_label_map, uncrop, write_prediction_nifti

__all__ = [
    "CANONICAL_MODALITIES",
    "LABEL_NAMES",
    "LABEL_PRESETS",
    "MODALITY_ALIASES",
    "NAMING_PRESETS",
    "NUM_CLASSES",
    "REGIONS",
    "BraTSCase",
    "BraTSDataModule",
    "discover_cases",
    "generate_brats_synthetic",
    "inverse_label_map",
    "map_labels",
    "patient_id_from_case",
    "resolve_label_map",
    "uncrop",
    "write_prediction_nifti",
]
