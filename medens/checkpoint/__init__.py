"""The medens checkpoint file: one format for plain PyTorch, exact resume, and medens' own loader."""

from medens.checkpoint.io import (
    CHECKPOINT_FORMAT,
    LoadReport,
    MedensCheckpointIO,
    atomic_torch_save,
    load_checkpoint,
    load_network_weights,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "LoadReport",
    "MedensCheckpointIO",
    "atomic_torch_save",
    "load_checkpoint",
    "load_network_weights",
]
