"""CT data layer: one reader per source, world/voxel geometry, patch cache, datasets and the datamodule.

Entry point for configs: ``medens.data.ct.CTDataModule`` with ``source`` a reader of
``medens.data.ct.readers``; synthetic data: ``medens.data.ct.synthetic.generate_luna16_synthetic``.
"""

from medens.data.ct.datamodule import CTDataModule
from medens.data.ct.datasets import CTPatchDataset
from medens.data.ct.geometry import hu_window, resample_scan, sample_patch, voxel_to_world, world_to_voxel
from medens.data.ct.io import Scan, read_dicom_series, read_scan
from medens.data.ct.readers import (
    READERS,
    CTReader,
    DicomReader,
    Luna16Reader,
    NoduleMNIST3DReader,
    SyntheticLuna16Reader,
    VOIReader,
)
from medens.data.ct.synthetic import generate_luna16_synthetic
from medens.data.ct.transforms import CTAugment

__all__ = [
    "CTAugment",
    "CTDataModule",
    "CTPatchDataset",
    "CTReader",
    "DicomReader",
    "Luna16Reader",
    "NoduleMNIST3DReader",
    "READERS",
    "SyntheticLuna16Reader",
    "VOIReader",
    "Scan",
    "generate_luna16_synthetic",
    "hu_window",
    "read_dicom_series",
    "read_scan",
    "resample_scan",
    "sample_patch",
    "voxel_to_world",
    "world_to_voxel",
]
