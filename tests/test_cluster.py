"""Clusters: two torchrun "nodes" on localhost (gloo, CPU), a submitit sweep, bad topology input, GPU check."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
from pathlib import Path

import pytest
import torch
import torchvision

from medens.checkpoint import load_checkpoint
from medens.errors import CheckpointError, ConfigError
from tests.helpers import PYTHON, ROOT, TINY_XRAY, cli_ok, compose, run_cli
from tests.servers import free_port

BASE = ["experiment=xray", *TINY_XRAY, "test=false", "logger=csv"]


def _torchrun_two_nodes(root: Path, *overrides: str, timeout: int = 400) -> list[str]:
    """Start `torchrun --nnodes=2 --node-rank=0/1 --nproc-per-node=1` as two processes, like two nodes."""
    port = free_port()
    env = {**os.environ, "MEDENS_ROOT": str(root), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [PYTHON, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
             "--master-addr=127.0.0.1", f"--master-port={port}", str(ROOT / "scripts" / "train.py"), *overrides],
            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    return outs


def _written_by(out: str) -> set[str]:
    return set(re.findall(r"medens checkpoint written by rank (\d+)", out))


@pytest.mark.slow
def test_torchrun_two_nodes_shards_writes_once_and_resumes(tmp_path):
    ids = tmp_path / "ids"
    common = [*BASE, "trainer=torchrun", "trainer.accelerator=cpu", "callbacks.model_checkpoint_periodic.every_n_epochs=1",
              "+callbacks.sample_ids._target_=medens.training.ddp.SampleIdLog"]  # fmt: skip
    node0, node1 = _torchrun_two_nodes(tmp_path, *common, f"+callbacks.sample_ids.folder={ids}", "trainer.max_epochs=2")
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in node0 + node1
    assert "TorchElasticEnvironment" in node0 or "distributed_backend=gloo" in node0
    assert _written_by(node0) == {"0"} and not _written_by(node1), "rank 0 alone writes checkpoints"

    # every epoch: the two ranks draw disjoint shards that together cover the training set
    r0 = json.loads((ids / "sample_ids_rank0.json").read_text())
    r1 = json.loads((ids / "sample_ids_rank1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2
    assert set(r0["epochs"]) == set(r1["epochs"]) == {"0", "1"}
    for epoch in ("0", "1"):
        a, b = r0["epochs"][epoch], r1["epochs"][epoch]
        assert len(a) == len(b) > 0 and not set(a) & set(b)
        assert sorted(a + b) == list(range(len(a) + len(b))), "the shards must cover the epoch"
    assert r0["epochs"]["0"] != r0["epochs"]["1"], "a new permutation every epoch"

    # one Hydra run folder (rank 0's), one saved_models set
    runs = list((tmp_path / "outputs" / "xray" / "runs").iterdir())
    assert len(runs) == 1 and runs[0].is_dir(), f"expected one run folder, found {runs}"
    assert (runs[0] / ".hydra" / "config.yaml").is_file() and (runs[0] / "train.log").is_file()
    assert list(tmp_path.glob("**/.hydra")) == [runs[0] / ".hydra"]
    folder = tmp_path / "saved_models" / "xray"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "resnet18_best.pth", "resnet18_epoch_1.pth", "resnet18_epoch_2.pth", "training_history.json"]  # fmt: skip
    assert [h["epoch"] for h in json.loads((folder / "training_history.json").read_text())["epochs"]] == [1, 2]

    # the result loads in plain PyTorch and records the topology it ran under
    raw = torch.load(folder / "resnet18_best.pth", map_location="cpu", weights_only=True)
    torchvision.models.resnet18(num_classes=14).load_state_dict(raw["model_state_dict"])
    assert raw["hyperparameters"]["trainer"]["num_nodes"] == 2 and raw["hyperparameters"]["trainer"]["devices"] == 1
    topo = raw["lightning"]["callbacks"]["RunTopology"]
    assert topo["world_size"] == 2 and topo["environment"] == "TorchElasticEnvironment"

    # ckpt_path= resume under torchrun continues at epoch 3 into a fresh saved_models/
    epoch2 = folder / "resnet18_epoch_2.pth"
    node0, node1 = _torchrun_two_nodes(tmp_path, *common, f"+callbacks.sample_ids.folder={tmp_path / 'ids2'}",
                                       "trainer.max_epochs=3", f"ckpt_path={epoch2}",
                                       f"paths.saved_models_dir={tmp_path}/resumed")  # fmt: skip
    assert "Restored all states from the checkpoint" in node0
    resumed = tmp_path / "resumed" / "xray"
    assert [h["epoch"] for h in json.loads((resumed / "training_history.json").read_text())["epochs"]] == [1, 2, 3]
    assert sorted(p.name for p in resumed.glob("*_epoch_*.pth")) == ["resnet18_epoch_3.pth"]
    assert load_checkpoint(resumed / "resnet18_epoch_3.pth")["epoch"] == 3
    r0 = json.loads((tmp_path / "ids2" / "sample_ids_rank0.json").read_text())
    assert set(r0["epochs"]) == {"2"}, "the resumed run trains epoch 3 only"
    assert len(list((tmp_path / "outputs" / "xray" / "runs").iterdir())) == 2


@pytest.mark.slow
def test_submitit_local_sweep_jobs_have_own_files_and_return_metric(tmp_path):
    out = cli_ok(run_cli("train.py", "-m", "hydra/launcher=submitit_local", *BASE, "logger=none", "trainer=cpu",
                         "trainer.max_epochs=1", "seed=1,2", root=tmp_path, env={"OMP_NUM_THREADS": "1"}))  # fmt: skip
    (sweep,) = list((tmp_path / "outputs" / "xray" / "multiruns").iterdir())
    results = sorted((sweep / ".submitit").glob("*/*_result.pkl"))
    assert len(results) == 2, out[-3000:]
    returned = {}
    for job in ("0", "1"):
        ckpt = load_checkpoint(sweep / job / "saved_models" / "xray" / "resnet18_best.pth")
        returned[job] = ckpt["best_metric"]
        assert ckpt["hyperparameters"]["seed"] == int(job) + 1
        assert (sweep / job / ".hydra" / "config.yaml").is_file()
    values = []
    for res in results:
        status, value = pickle.loads(res.read_bytes())
        assert status == "success", value
        values.append(value.return_value)
    assert sorted(values) == pytest.approx(sorted(returned.values())), "each job returns its best/val/auc"
    assert not (tmp_path / "saved_models").exists(), "sweep jobs must not write the top-level saved_models/"


# ---------------------------------------------------------------------------------------------- bad input

TORCHRUN_2x1 = {"RANK": "0", "GROUP_RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "2",
                "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "none"}  # fmt: skip
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_NNODES", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_PROCID", "SLURM_STEP_ID",
              "SLURM_JOB_NUM_NODES", "SLURM_GPUS_ON_NODE")  # fmt: skip


@pytest.fixture
def clean_env(monkeypatch):
    for var in (*TORCHRUN_2x1, *SLURM_VARS, "SUBMITIT_LOCAL_GLOBALID", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def _train_refuses(cfg, match: str, tmp_path: Path) -> None:
    from medens.training.train import train

    with pytest.raises(ConfigError, match=match):
        train(cfg)
    assert not (tmp_path / "saved_models").exists(), "refused before any training or file"


def test_torchrun_trainer_takes_topology_from_environment(compose_train, clean_env):
    for k, v in {**TORCHRUN_2x1, "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8", "GROUP_WORLD_SIZE": "2"}.items():
        clean_env.setenv(k, v)
    cfg = compose_train("experiment=xray", "trainer=torchrun")
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (2, 4)


def test_num_nodes_disagreeing_with_torchrun_is_refused(compose_train, clean_env, tmp_path):
    for k, v in TORCHRUN_2x1.items():
        clean_env.setenv(k, v)
    cfg = compose_train(*BASE, "trainer=torchrun", "trainer.num_nodes=3")
    _train_refuses(cfg, r"trainer.num_nodes=3 disagrees with torchrun: WORLD_SIZE=2", tmp_path)
    cfg = compose_train(*BASE, "trainer=ddp_sim", "trainer.num_nodes=2")  # 2 per node; torchrun started 1
    _train_refuses(cfg, r"trainer.devices=2 disagrees with torchrun: LOCAL_WORLD_SIZE=1", tmp_path)


def test_slurm_trainer_outside_slurm_is_refused(compose_train, clean_env, tmp_path):
    cfg = compose_train(*BASE, "trainer=slurm")
    _train_refuses(cfg, r"trainer=slurm .* outside SLURM: SLURM_JOB_ID is not set", tmp_path)


def test_slurm_trainer_reads_allocation_and_refuses_disagreement(compose_train, clean_env, tmp_path):
    for k, v in {"SLURM_JOB_ID": "77", "SLURM_NNODES": "2", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4",
                 "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}.items():  # fmt: skip
        clean_env.setenv(k, v)
    cfg = compose_train("experiment=xray", "trainer=slurm")
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (2, 4)
    cfg = compose_train(*BASE, "trainer=slurm", "trainer.num_nodes=1")
    _train_refuses(cfg, r"trainer.num_nodes=1 disagrees with the SLURM allocation: SLURM_NNODES=2", tmp_path)
    from medens.training.cluster import run_dir

    slurm_env_target = "lightning.pytorch.plugins.environments.SLURMEnvironment"
    assert run_dir("/o/runs", "stamp", slurm_env_target) == "/o/runs/slurm-77", "one folder for all ranks"
    assert run_dir("/o/runs", "stamp") == "/o/runs/stamp", "other trainers inside SLURM keep the time stamp"


def test_rank_zero_resolvers(clean_env):
    from medens.training.cluster import rank_zero, rank_zero_file, run_dir

    assert run_dir("/o/runs", "t") == "/o/runs/t" and rank_zero(".hydra") == ".hydra"
    for k, v in {**TORCHRUN_2x1, "RANK": "1", "GROUP_RANK": "1"}.items():
        clean_env.setenv(k, v)
    assert run_dir("/o/runs", "t") == "/o/runs", "ranks > 0 create no run folder of their own"
    assert rank_zero(".hydra") is None and rank_zero_file("/o/train.log") == os.devnull
    clean_env.setenv("TORCHELASTIC_RUN_ID", "job42")
    assert run_dir("/o/runs", "t") == "/o/runs/torchrun-job42"


def test_global_rank_follows_each_launcher(clean_env):
    """One rank function for the Hydra resolvers and run ownership: torchrun's RANK, the LOCAL_RANK that
    Lightning's and medens' own single-node launchers give ranks 1..N-1 (before an inherited SLURM_PROCID:
    ranks launched by one srun task all carry that task's 0), srun's SLURM_PROCID, submitit's local id."""
    from medens.training.cluster import global_rank
    from medens.training.run_ownership import global_rank as ownership_rank

    assert global_rank() == 0 and ownership_rank is global_rank
    clean_env.setenv("SUBMITIT_LOCAL_GLOBALID", "3")
    assert global_rank() == 3
    clean_env.setenv("SLURM_PROCID", "0")
    assert global_rank() == 0, "srun's rank comes before submitit's local id"
    clean_env.setenv("LOCAL_RANK", "2")
    assert global_rank() == 2, "a rank that the srun task launched itself, not the task's own rank"
    clean_env.setenv("RANK", "6")
    assert global_rank() == 6


def _fake_checkpoint(path: Path, modality: str = "xray", name: str = "resnet18", world: int | None = 1) -> Path:
    ckpt = {"format": "medens-checkpoint/1", "epoch": 2, "model_state_dict": {"fc.weight": torch.zeros(1)},
            "hyperparameters": {"modality": modality, "model": {"name": name}, "trainer": {"devices": 1}},
            "lightning": {"callbacks": {}}}  # fmt: skip
    if world is not None:
        ckpt["lightning"]["callbacks"]["RunTopology"] = {"world_size": world, "num_nodes": world, "devices_per_node": 1}
    torch.save(ckpt, path)
    return path


def test_ckpt_from_another_modality_or_world_size_is_refused(compose_train, clean_env, tmp_path):
    ct = _fake_checkpoint(tmp_path / "3dcnn_epoch_2.pth", modality="ct", name="3dcnn")
    _train_refuses(compose_train(*BASE, f"ckpt_path={ct}"), r"is a 'ct' checkpoint, but this run trains modality='xray'",
                   tmp_path)  # fmt: skip
    two = _fake_checkpoint(tmp_path / "resnet18_epoch_2.pth", world=2)
    _train_refuses(compose_train(*BASE, f"ckpt_path={two}"), r"world size 2 .* this run has world size 1", tmp_path)
    from medens.training.cluster import check_resume

    check_resume(compose_train(*BASE, f"ckpt_path={two}", "resume_any_world_size=true"), 1)  # accepted on request
    check_resume(compose_train(*BASE, f"ckpt_path={two}"), 2)  # same world size: fine
    legacy = _fake_checkpoint(tmp_path / "old.pth", world=None)  # no RunTopology: world size from its trainer config
    check_resume(compose_train(*BASE, f"ckpt_path={legacy}"), 1)
    with pytest.raises(ConfigError, match="world size 1"):
        check_resume(compose_train(*BASE, f"ckpt_path={legacy}"), 4)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(two.read_bytes()[:300])  # a copy cut short
    with pytest.raises(CheckpointError, match=r"cut\.pth: cannot read checkpoint"):
        check_resume(compose_train(*BASE, f"ckpt_path={cut}"), 1)
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pth: not a medens checkpoint"):
        check_resume(compose_train(*BASE, f"ckpt_path={foreign}"), 1)
    with pytest.raises(ConfigError, match=r"ckpt_path=.*missing\.pth: no such checkpoint file"):
        check_resume(compose_train(*BASE, f"ckpt_path={tmp_path}/missing.pth"), 1)


# ---------------------------------------------------------------------------------------------- GPU check


@pytest.mark.slow
def test_gpu_check_without_gpu_exits_cleanly(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": PYTHON})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["gpu"] is False and "no CUDA GPU" in doc["reason"]
    assert "no CUDA GPU" in proc.stderr


@pytest.mark.slow
def test_gpu_check_code_path_on_cpu_tiny(tmp_path):
    proc = subprocess.run([PYTHON, "scripts/benchmark.py", "gpu-check", "--device", "cpu", "--tiny",
                           "--compile-backend", "eager"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["gpu"] is False and doc["device"] == "cpu" and doc["tiny"] is True
    xr = doc["resnet50_training"]
    for key in ("medens_module", "plain_loop", "plain_loop_compiled"):
        assert xr[key]["images_per_s"] > 0 and "peak_memory_bytes" in xr[key], key
    for key in ("ct_resnet18_3d", "mri_unet"):
        assert doc[key]["step_seconds"] > 0, key
    assert doc["mri_sliding_window_inference"]["seconds"] > 0
    assert doc["mri_sliding_window_inference"]["output_shape"][1] == 4


def test_submitit_slurm_launcher_config_makes_a_multi_node_sbatch(tmp_path, monkeypatch):
    """The `submitit_slurm` config through the launcher's own parameter mapping into submitit's sbatch text
    (nothing is submitted: a stand-in `srun` only satisfies submitit's cluster check)."""
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf
    from submitit import AutoExecutor

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    cfg = compose("train", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "trainer=slurm",
                  f"paths.root_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep", "hydra.job.name=train",
                  hydra_node=True)  # fmt: skip
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_").endswith("SlurmLauncher")
    executor = AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                            slurm_max_num_timeout=params.pop("max_num_timeout"))  # fmt: skip
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    text = executor._executor._make_submission_file_text("python -u -m submitit.core._submit", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=240",
                 "--signal=USR2@120", "--cpus-per-task=8"):  # fmt: skip
        assert f"#SBATCH {line}" in text, text


def test_sbatch_example_matches_the_slurm_trainer(compose_train, clean_env):
    """scripts/slurm/train.sbatch parses, and its allocation gives trainer=slurm a consistent topology."""
    script = ROOT / "scripts" / "slurm" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    opts = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, flags=re.M))
    assert opts["signal"].startswith("SIGUSR1@") and "#SBATCH --requeue" in text
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert "scripts/train.py" in srun and "trainer=slurm" in srun
    nodes, per_node = opts["nodes"], opts["ntasks-per-node"]
    assert per_node == opts["gpus-per-node"], "one task per GPU"
    for k, v in {"SLURM_JOB_ID": "5", "SLURM_NNODES": nodes, "SLURM_NTASKS_PER_NODE": per_node, "SLURM_PROCID": "0",
                 "SLURM_NTASKS": str(int(nodes) * int(per_node))}.items():  # fmt: skip
        clean_env.setenv(k, v)
    overrides = [a for a in srun.split() if "=" in a and not a.startswith("$")]
    cfg = compose_train(*overrides)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (int(nodes), int(per_node))
    from medens.training.cluster import check_environment

    check_environment(cfg)  # agrees with the allocation: no error


def test_hydra_run_folder_is_shared_by_ranks_and_written_by_rank_zero(tmp_path, clean_env):
    """conf/hydra/default.yaml through Hydra's own composition: the run folder each rank resolves."""
    from omegaconf import OmegaConf

    def hydra_node(*overrides: str):
        return compose("train", f"paths.root_dir={tmp_path}", *overrides, hydra_node=True).hydra

    h = hydra_node("trainer=cpu")
    assert re.fullmatch(rf"{tmp_path}/outputs/xray/runs/\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d", h.run.dir)
    assert h.output_subdir == ".hydra"
    for k, v in {"SLURM_JOB_ID": "77", "SLURM_NNODES": "2", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4",
                 "SLURM_PROCID": "5"}.items():  # fmt: skip
        clean_env.setenv(k, v)
    h = hydra_node("trainer=slurm")
    assert h.run.dir == f"{tmp_path}/outputs/xray/runs/slurm-77"
    assert h.output_subdir is None, "ranks > 0 write no .hydra/"
    assert "medens.rank_zero_file:" in OmegaConf.to_yaml(h.job_logging, resolve=False), "nor a log file"
    for k, v in {**TORCHRUN_2x1, "RANK": "1", "GROUP_RANK": "1"}.items():
        clean_env.setenv(k, v)
    h = hydra_node("trainer=torchrun")
    assert h.run.dir == f"{tmp_path}/outputs/xray/runs", "rank 1 without a rendezvous id: no folder of its own"
