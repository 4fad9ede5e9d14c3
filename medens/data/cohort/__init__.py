"""The multi-modal cohort (one manifest row per patient) that the stacking ensemble trains on."""

from medens.data.cohort.manifest import MODALITY_COLUMNS, load_manifest
from medens.data.cohort.synthetic import ensure_synthetic_cohort, generate_synthetic_cohort

__all__ = ["MODALITY_COLUMNS", "ensure_synthetic_cohort", "generate_synthetic_cohort", "load_manifest"]
