"""Lightning callbacks that write the saved_models/ layout and keep runs reproducible."""

from medens.callbacks.checkpoint import MedensModelCheckpoint
from medens.callbacks.history import TrainingHistory
from medens.callbacks.mlflow_artifacts import MLflowArtifacts
from medens.callbacks.preemption import Preempted, Preemption
from medens.callbacks.reseed import BatchReseed

__all__ = ["BatchReseed", "MLflowArtifacts", "MedensModelCheckpoint", "Preempted", "Preemption", "TrainingHistory"]
