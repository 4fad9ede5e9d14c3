"""OmegaConf resolvers the configs use; registered when `medens` is imported."""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from medens.utils.paths import cache_root


def register_resolvers() -> None:
    """`${medens.cwd:}` is the absolute working directory at resolution time.

    Unlike `${hydra:runtime.cwd}` it also resolves where Hydra resolves the sweep folder (before a job
    starts) and in configs composed by tests.
    """
    if not OmegaConf.has_resolver("medens.cwd"):
        OmegaConf.register_new_resolver("medens.cwd", lambda: os.getcwd())
    if not OmegaConf.has_resolver("medens.cpus"):  # `${medens.cpus:4}`: this process's CPUs, at most 4 (0: no cap)
        OmegaConf.register_new_resolver("medens.cpus", _cpus)
    if not OmegaConf.has_resolver("medens.gpu_precision"):  # bf16-mixed on a bf16 GPU, else 32-true
        OmegaConf.register_new_resolver("medens.gpu_precision", _gpu_precision)
    if not OmegaConf.has_resolver("medens.cache_root"):  # `${medens.cache_root:<default>}`: $MEDENS_CACHE or default
        OmegaConf.register_new_resolver("medens.cache_root", lambda default=None: str(cache_root(default)))
    from medens.training.cluster import register_cluster_resolvers  # torchrun/SLURM topology, rank 0 output

    register_cluster_resolvers()


def _cpus(cap: int = 0) -> int:
    """CPUs this process may use (affinity, so SLURM/cgroup limits count), capped at `cap` when > 0."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, int(cap)) if int(cap) > 0 else n)


def _gpu_precision() -> str:
    import torch

    ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16-mixed" if ok else "32-true"
