"""OmegaConf resolvers the configs use; registered when `medens` is imported."""

from __future__ import annotations

import os

from omegaconf import OmegaConf


def register_resolvers() -> None:
    """`${medens.cwd:}` is the absolute working directory at resolution time.

    Unlike `${hydra:runtime.cwd}` it also resolves where Hydra resolves the sweep folder (before a job
    starts) and in configs composed by tests.
    """
    if not OmegaConf.has_resolver("medens.cwd"):
        OmegaConf.register_new_resolver("medens.cwd", lambda: os.getcwd())
