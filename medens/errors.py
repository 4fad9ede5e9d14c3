"""Exceptions medens raises for bad input; each message names the file or key and the problem."""

from __future__ import annotations


class MedensError(Exception):
    """Base class of every error medens raises on purpose."""


class DataError(MedensError, ValueError):
    """A dataset file is missing, corrupt, or does not match its documented format."""


class ConfigError(MedensError, ValueError):
    """A configuration key is unknown, missing or has an invalid value."""


class CheckpointError(MedensError, ValueError):
    """A checkpoint is unreadable, of the wrong format, or does not fit the network it is loaded into."""


class UnsafeCheckpointError(CheckpointError):
    """A config read from a file names a callable or value that rebuilding it must never run or accept."""


class ExportError(MedensError, RuntimeError):
    """An export could not be written or did not reproduce the eager network within tolerance."""


class RegistryError(MedensError):
    """A checkpoint version is invalid, taken or tampered with, or the MLflow store cannot be used."""
