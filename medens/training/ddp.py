"""DDP that works inside Hydra runs and multirun sweeps.

Lightning's script launcher re-runs `sys.argv` for each extra rank. Under Hydra that re-runs a whole
`-m` sweep in every child, and writes stray output folders. Here the extra ranks instead run
`python -m medens.training.ddp_worker <config.yaml>` on the already-composed, fully resolved config of
the current job, so a sweep job's ranks train exactly that job, with its paths.

On a cluster the ranks come from the engine instead (torchrun, srun): the cluster environment then
creates the processes externally and this launcher starts none (see `medens.training.cluster`).
The callbacks below record the run's topology in its checkpoints and, on request, the sample ids
each rank draws.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from medens.utils.jsonio import write_json_strict

DDP_ENV_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


class _ConfigScriptLauncher(_SubprocessScriptLauncher):
    """Launch ranks 1..N-1 on the resolved config file named by the strategy."""

    def __init__(self, strategy: MedensDDPStrategy, *args: Any) -> None:
        super().__init__(*args)
        self.strategy = strategy

    def _call_children_scripts(self) -> None:
        config_path = self.strategy.worker_config
        if config_path is None:
            super()._call_children_scripts()
            return
        self._check_can_spawn_children()
        self.procs = []
        os.environ["MASTER_ADDR"] = self.cluster_environment.main_address
        os.environ["MASTER_PORT"] = str(self.cluster_environment.main_port)
        os.environ["NODE_RANK"] = str(self.cluster_environment.node_rank())
        os.environ["LOCAL_RANK"] = str(self.cluster_environment.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        for local_rank in range(1, self.num_processes):
            env = os.environ.copy()
            env["LOCAL_RANK"] = str(local_rank)
            command = [sys.executable, "-m", "medens.training.ddp_worker", str(config_path)]
            self.procs.append(subprocess.Popen(command, env=env, cwd=os.getcwd()))


class MedensDDPStrategy(DDPStrategy):
    """`DDPStrategy` whose extra ranks run the current job's resolved config (see module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.worker_config: str | None = None

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            self._launcher = _ConfigScriptLauncher(self, self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            super()._configure_launcher()


def cleanup_distributed(launched_here: bool) -> None:
    """After a DDP job: destroy the process group and, in the launching process, clear the rank
    variables, so the next job of a sweep in this same process launches its own ranks again."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if launched_here:
        for var in DDP_ENV_VARS:
            os.environ.pop(var, None)


class RunTopology(Callback):
    """Records world size, nodes, devices per node and the cluster environment in every checkpoint
    (`lightning.callbacks.RunTopology`), so that `medens.training.cluster.check_resume` can refuse a
    resume on another world size."""

    def __init__(self) -> None:
        self.topology: dict[str, Any] = {}
        self.resumed_from: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        env = getattr(trainer.strategy, "cluster_environment", None)
        self.topology = {
            "world_size": int(trainer.world_size),
            "num_nodes": int(trainer.num_nodes),
            "devices_per_node": int(trainer.num_devices),
            "environment": type(env).__name__ if env is not None else None,
        }

    def state_dict(self) -> dict[str, Any]:
        return dict(self.topology)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resumed_from = dict(state_dict)


class SampleIdLog(Callback):
    """Records which dataset indices this rank draws in each training epoch.

    Writes `<folder>/sample_ids_rank<R>.json` (`{"rank", "world_size", "epochs": {epoch: [indices]}}`),
    read from the very sampler that feeds the training loader, to check the sharding of a multi-node run
    (ranks disjoint, their union the whole epoch). Add it with
    `+callbacks.sample_ids._target_=medens.training.ddp.SampleIdLog +callbacks.sample_ids.folder=<dir>`.
    """

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.epochs: dict[int, list[int]] = {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sampler = getattr(trainer.train_dataloader, "sampler", None)
        if sampler is None:
            return
        self.epochs[int(trainer.current_epoch)] = [
            int(k[0]) if isinstance(k, (tuple, list)) else int(k) for k in iter(sampler)
        ]
        self.folder.mkdir(parents=True, exist_ok=True)
        out = self.folder / f"sample_ids_rank{trainer.global_rank}.json"
        doc = {"rank": trainer.global_rank, "world_size": trainer.world_size, "epochs": self.epochs}
        write_json_strict(out, doc, indent=None)
