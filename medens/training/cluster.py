"""Cluster engines that start the ranks (torchrun, SLURM/srun, submitit): what their environment says.

medens never launches ranks on a cluster itself. This module reads the variables the engine sets, so
that configs can take nodes and devices from the allocation (`${medens.num_nodes:}`,
`${medens.devices_per_node:}`), so that only global rank 0 writes Hydra output (`${medens.rank_zero:...}`,
`${medens.run_dir:...}`), and so that a config which disagrees with the environment, or a checkpoint
that cannot resume here, is refused with a `ConfigError` before any training starts.

Only the standard library is imported at module level: the resolvers are registered whenever `medens`
is imported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from medens.errors import ConfigError

TORCHRUN_VARS = ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE")
SLURM_ENV_TARGET = "lightning.pytorch.plugins.environments.SLURMEnvironment"
_NO_RUN_ID = {"", "none"}


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    try:
        return int(value.split("(")[0])  # SLURM writes repeated counts as "2(x3)"
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from exc


def torchrun_env() -> dict[str, int | str] | None:
    """The torchelastic (torchrun) topology of this process, or None when torchrun did not start it."""
    if not all(v in os.environ for v in TORCHRUN_VARS):
        return None
    world, local_world = _int_env("WORLD_SIZE") or 1, _int_env("LOCAL_WORLD_SIZE") or 1
    return {
        "world_size": world,
        "local_world_size": local_world,
        "num_nodes": _int_env("GROUP_WORLD_SIZE") or max(1, world // local_world),
        "rank": _int_env("RANK") or 0,
        "node_rank": _int_env("GROUP_RANK") or 0,
        "run_id": os.environ.get("TORCHELASTIC_RUN_ID", "none"),
    }


def slurm_env() -> dict[str, int | str | None] | None:
    """The SLURM allocation of this process (nodes, tasks per node, GPUs), or None outside SLURM."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    nodes = _int_env("SLURM_NNODES") or _int_env("SLURM_JOB_NUM_NODES") or 1
    ntasks = _int_env("SLURM_NTASKS")
    per_node = _int_env("SLURM_NTASKS_PER_NODE")
    if per_node is None and ntasks is not None:
        per_node = max(1, ntasks // nodes)
    return {
        "job_id": job_id,
        "step_id": os.environ.get("SLURM_STEP_ID"),
        "num_nodes": nodes,
        "ntasks": ntasks,
        "tasks_per_node": per_node,
        "gpus_on_node": _int_env("SLURM_GPUS_ON_NODE"),
        "procid": _int_env("SLURM_PROCID"),
    }


def global_rank() -> int:
    """This process' global rank as its launcher set it (torchrun, Lightning's or medens' own single-node
    launcher, srun, submitit), 0 otherwise. ``LOCAL_RANK`` comes before ``SLURM_PROCID`` (Lightning's rule):
    ranks that one srun task launches itself all inherit that task's SLURM_PROCID."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        value = _int_env(var)
        if value is not None:
            return value
    return 0


def num_nodes() -> int:
    """Nodes of the job: torchrun's WORLD_SIZE / LOCAL_WORLD_SIZE, else SLURM_NNODES, else 1."""
    tr = torchrun_env()
    if tr is not None:
        return int(tr["num_nodes"])
    sl = slurm_env()
    return int(sl["num_nodes"]) if sl is not None else 1


def devices_per_node() -> int:
    """Ranks per node: torchrun's LOCAL_WORLD_SIZE, else SLURM tasks per node (one task per GPU), else 1."""
    tr = torchrun_env()
    if tr is not None:
        return int(tr["local_world_size"])
    sl = slurm_env()
    if sl is not None:
        return int(sl["tasks_per_node"] or sl["gpus_on_node"] or 1)
    return 1


def rank_zero(value: Any, other: Any = None) -> Any:
    """`value` on global rank 0, `other` on every other rank (e.g. no `.hydra/` folder there)."""
    return value if global_rank() == 0 else other


def rank_zero_file(path: str) -> str:
    """`path` on rank 0, the null device elsewhere: one log file per run, not one per rank."""
    return path if global_rank() == 0 else os.devnull


def run_dir(base: str, stamp: str, cluster_environment: str | None = None) -> str:
    """The Hydra run folder `base/<name>`, the same on every rank of one job.

    torchrun with a rendezvous id (`--rdzv-id`): `base/torchrun-<id>`; a trainer with Lightning's
    `SLURMEnvironment` (`trainer=slurm`, the target is passed as `cluster_environment`) inside a SLURM
    job: `base/slurm-<job id>[.<step>]`, stable across a requeue, so that Lightning finds its requeue
    checkpoint in it; otherwise rank 0 uses the time stamp and every other rank gets `base` itself,
    which creates no folder (other ranks write nothing: checkpoints, history and logs come from rank 0).
    """
    tr = torchrun_env()
    if tr is not None and str(tr["run_id"]).lower() not in _NO_RUN_ID:
        return f"{base}/torchrun-{tr['run_id']}"
    sl = slurm_env()
    if sl is not None and str(cluster_environment or "").endswith("SLURMEnvironment"):
        step = sl["step_id"]
        suffix = f".{step}" if step and step.isdigit() and int(step) > 0 else ""
        return f"{base}/slurm-{sl['job_id']}{suffix}"
    return f"{base}/{stamp}" if global_rank() == 0 else base


def register_cluster_resolvers() -> None:
    """Register `medens.num_nodes`, `medens.devices_per_node`, `medens.rank_zero`, `medens.rank_zero_file`
    and `medens.run_dir` (not cached: each rank resolves its own environment)."""
    for name, fn in (
        ("medens.num_nodes", num_nodes),
        ("medens.devices_per_node", devices_per_node),
        ("medens.rank_zero", rank_zero),
        ("medens.rank_zero_file", rank_zero_file),
        ("medens.run_dir", run_dir),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


# ---------------------------------------------------------------------------------------- checks


def _uses_slurm_environment(trainer_cfg: DictConfig) -> bool:
    strategy = trainer_cfg.get("strategy")
    env = strategy.get("cluster_environment") if isinstance(strategy, DictConfig) else None
    return isinstance(env, DictConfig) and str(env.get("_target_", "")).endswith("SLURMEnvironment")


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def check_environment(cfg: DictConfig) -> None:
    """Refuse a trainer config that disagrees with the engine that started this process.

    - torchrun: `trainer.num_nodes` x `trainer.devices` must be torchrun's topology (WORLD_SIZE,
      LOCAL_WORLD_SIZE);
    - a trainer with Lightning's `SLURMEnvironment` (`trainer=slurm`) needs a SLURM job (SLURM_JOB_ID)
      and, under srun, `trainer.num_nodes` = SLURM_NNODES and `trainer.devices` = tasks per node.
    """
    tcfg = cfg.get("trainer")
    if not isinstance(tcfg, DictConfig):
        return
    nodes = _int_or_none(tcfg.get("num_nodes", 1))
    devices = _int_or_none(tcfg.get("devices", 1))
    tr = torchrun_env()
    if tr is not None:
        if nodes is not None and nodes != tr["num_nodes"]:
            raise ConfigError(
                f"trainer.num_nodes={nodes} disagrees with torchrun: WORLD_SIZE={tr['world_size']} and "
                f"LOCAL_WORLD_SIZE={tr['local_world_size']} mean {tr['num_nodes']} node(s). Use "
                "trainer=torchrun (nodes and devices from the environment) or set trainer.num_nodes to match."
            )
        if devices is not None and devices != tr["local_world_size"]:
            raise ConfigError(
                f"trainer.devices={devices} disagrees with torchrun: LOCAL_WORLD_SIZE={tr['local_world_size']} "
                "(--nproc-per-node) ranks per node. Use trainer=torchrun or set trainer.devices to match."
            )
    if _uses_slurm_environment(tcfg):
        sl = slurm_env()
        if sl is None:
            raise ConfigError(
                "trainer=slurm (strategy.cluster_environment=SLURMEnvironment) is used outside SLURM: "
                "SLURM_JOB_ID is not set. Run it under sbatch/srun (see scripts/slurm/train.sbatch) or pick "
                "another trainer (trainer=ddp for one node, trainer=torchrun under torchrun)."
            )
        if tr is None and "SLURM_NTASKS" in os.environ:
            if nodes is not None and nodes != sl["num_nodes"]:
                raise ConfigError(
                    f"trainer.num_nodes={nodes} disagrees with the SLURM allocation: SLURM_NNODES={sl['num_nodes']}"
                )
            if devices is not None and sl["tasks_per_node"] is not None and devices != sl["tasks_per_node"]:
                raise ConfigError(
                    f"trainer.devices={devices} disagrees with the SLURM allocation: {sl['tasks_per_node']} "
                    "task(s) per node (SLURM_NTASKS_PER_NODE; medens runs one task per GPU)"
                )


def checkpoint_topology(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The world size a checkpoint was written under: `lightning.callbacks[RunTopology]`, else its config."""
    callbacks = (ckpt.get("lightning") or {}).get("callbacks") or {}
    for key, state in callbacks.items():
        if str(key).startswith("RunTopology") and isinstance(state, dict) and "world_size" in state:
            return dict(state)
    trainer = (ckpt.get("hyperparameters") or {}).get("trainer") or {}
    devices, nodes = _int_or_none(trainer.get("devices", 1)), _int_or_none(trainer.get("num_nodes", 1))
    if devices is None or nodes is None:
        return None
    return {"world_size": devices * nodes, "num_nodes": nodes, "devices_per_node": devices}


def config_world_size(cfg: DictConfig) -> int | None:
    """nodes x devices as the trainer config states them (None for `devices: auto`/-1: known once built)."""
    tcfg = cfg.get("trainer")
    if not isinstance(tcfg, DictConfig):
        return None
    nodes = _int_or_none(tcfg.get("num_nodes", 1))
    devices = tcfg.get("devices", 1)
    devices = len(devices) if OmegaConf.is_list(devices) or isinstance(devices, list) else _int_or_none(devices)
    if nodes is None or devices is None or devices < 1:
        return None
    return nodes * devices


def check_resume(cfg: DictConfig, world_size: int | None) -> None:
    """Refuse `ckpt_path=` from another modality or model, or written under another world size.

    An exact resume needs the same world size: each rank's shard of an epoch and the global batch
    (`data.batch_size` per rank x ranks) depend on it. `resume_any_world_size=true` accepts the change
    (weights, optimizer, epoch counter come back; the data order of later epochs differs).
    `world_size=None` (not known yet) checks modality and model only.
    """
    path = cfg.get("ckpt_path")
    if not path or not cfg.get("train", True):
        return
    from medens.checkpoint.io import load_checkpoint

    p = Path(str(path))
    if not p.is_file():
        raise ConfigError(f"ckpt_path={path}: no such checkpoint file")
    ckpt = load_checkpoint(p, mmap=True)  # a foreign or truncated file: CheckpointError naming it
    hyper = ckpt.get("hyperparameters") or {}
    modality = hyper.get("modality")
    if modality is not None and cfg.get("modality") is not None and modality != cfg.modality:
        raise ConfigError(
            f"ckpt_path={path} is a {modality!r} checkpoint, but this run trains modality={cfg.modality!r} "
            f"(experiment={cfg.get('task_name')}); pick the matching experiment or checkpoint"
        )
    name = (hyper.get("model") or {}).get("name")
    want = cfg.get("model", {}).get("name") if isinstance(cfg.get("model"), DictConfig) else None
    if name is not None and want is not None and name != want:
        raise ConfigError(f"ckpt_path={path} holds model {name!r}, but this run trains model.name={want!r}")
    topo = checkpoint_topology(ckpt)
    if world_size is None or topo is None or cfg.get("resume_any_world_size"):
        return
    if int(topo["world_size"]) != int(world_size):
        raise ConfigError(
            f"ckpt_path={path} was written by a run of world size {topo['world_size']} "
            f"({json.dumps({k: topo[k] for k in sorted(topo)})}), this run has world size {world_size}: "
            "an exact resume needs the same number of ranks (data shards and global batch depend on it). "
            "Resume with the same nodes x devices, or pass resume_any_world_size=true to accept the change."
        )
