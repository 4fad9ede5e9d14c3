"""MRI (BraTS) data: presets, one reader per naming scheme, MONAI transforms, the DataModule, a synthetic set."""

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
from .readers import (
    READERS,
    BraTS2015MhaReader,
    BraTS2015Reader,
    BraTS2021Reader,
    BraTS2023Reader,
    BraTSReader,
    SyntheticBraTSReader,
    build_reader,
)
from .synthetic import generate_brats_synthetic
from .transforms import inverse_label_map, uncrop, write_prediction_nifti

__all__ = [
    "CANONICAL_MODALITIES",
    "LABEL_NAMES",
    "LABEL_PRESETS",
    "MODALITY_ALIASES",
    "NAMING_PRESETS",
    "NUM_CLASSES",
    "READERS",
    "REGIONS",
    "BraTS2015MhaReader",
    "BraTS2015Reader",
    "BraTS2021Reader",
    "BraTS2023Reader",
    "BraTSCase",
    "BraTSDataModule",
    "BraTSReader",
    "SyntheticBraTSReader",
    "build_reader",
    "discover_cases",
    "generate_brats_synthetic",
    "inverse_label_map",
    "map_labels",
    "patient_id_from_case",
    "resolve_label_map",
    "uncrop",
    "write_prediction_nifti",
]
