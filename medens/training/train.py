"""The training stage: compose -> validate -> instantiate -> fit -> test, returning metrics."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from medens.checkpoint.io import MedensCheckpointIO
from medens.logging_setup import console_shows, install_warning_filters
from medens.training import cluster
from medens.training.ddp import MedensDDPStrategy, RunTopology, cleanup_distributed
from medens.training.instantiate import instantiate_callbacks, instantiate_loggers
from medens.training.preflight import Preflight
from medens.training.run_ownership import RunFiles, claim_run_files, signal_received
from medens.training.task import task_wrapper
from medens.training.validation import validate_config
from medens.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)


def _hydra_job_paths(cfg: DictConfig) -> None:
    """Inside a multirun, give each job its own saved_models/ under its sweep folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        with open_dict(cfg):
            cfg.paths.saved_models_dir = str(Path(hc.runtime.output_dir) / "saved_models")


def _ensure_cohort(cfg: DictConfig) -> None:
    """Generate the synthetic multi-modal cohort first when the experiment runs on it (`cohort.generate`)."""
    cohort = cfg.get("cohort")
    if cohort and cohort.get("generate") and cohort.get("synthetic") is not None:
        from medens.data.cohort.synthetic import ensure_synthetic_cohort

        if ensure_synthetic_cohort(cohort.root, **OmegaConf.to_container(cohort.synthetic, resolve=True)):
            log.info("generated the synthetic cohort at %s", cohort.root)


def _best_checkpoint(trainer: pl.Trainer, monitor: str) -> str | None:
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor == monitor and cb.best_model_path:
            return cb.best_model_path
    return None


def _plain_metrics(trainer: pl.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train one modality as configured; returns (metrics, objects).

    `metrics` holds the final logged values, `best/<monitor>` and, when `test: true`, the test metrics of
    the best checkpoint.
    """
    validate_config(cfg)
    install_warning_filters()
    cluster.check_environment(cfg)  # torchrun/SLURM topology vs trainer.num_nodes/devices, trainer=slurm outside SLURM
    cluster.check_resume(cfg, cluster.config_world_size(cfg))  # ckpt_path of another modality/model/world size
    _hydra_job_paths(cfg)
    if not cfg.get("train", True):
        return _train(cfg, None)
    # lock the folder and decide where this run writes (medens/training/run_ownership.py)
    with claim_run_files(cfg) as run_files:
        return _train(cfg, run_files)


def _train(cfg: DictConfig, run_files: RunFiles | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The stage proper, while this run owns its files (`run_files`; None when it does not train)."""
    _ensure_cohort(cfg)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)

    log.info("instantiating datamodule <%s>", cfg.data._target_)
    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    log.info("instantiating model <%s>", cfg.model._target_)
    model = hydra.utils.instantiate(cfg.model)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)

    callbacks = [*instantiate_callbacks(cfg.get("callbacks")), RunTopology()]
    if run_files is not None and cfg.get("preflight", True):
        callbacks.append(Preflight(run_files.write_dir, lambda: hydra.utils.instantiate(cfg.model)))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[MedensCheckpointIO()]
    )
    objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}
    cluster.check_resume(cfg, trainer.world_size)  # again with the built trainer's world size (devices=auto)

    launched_here = False
    if isinstance(trainer.strategy, MedensDDPStrategy) and "LOCAL_RANK" not in os.environ:
        worker_cfg = Path(cfg.paths.output_dir) / ".ddp" / "config.yaml"
        atomic_write_text(worker_cfg, OmegaConf.to_yaml(OmegaConf.create(model.run_config)))
        trainer.strategy.worker_config = str(worker_cfg)
        launched_here = True

    try:
        for lg in trainer.loggers:
            lg.log_hyperparams(model.run_config)
        if cfg.get("train", True):
            trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics = _plain_metrics(trainer)
        if model.best_metric is not None:
            metrics[f"best/{model.monitor}"] = model.best_metric
        best = _best_checkpoint(trainer, model.monitor)
        objects["best_checkpoint"] = best
        if run_files is not None and cfg.get("train", True):
            run_files.finish()
            objects["best_checkpoint"] = str(run_files.publish_best(best) or best) if best else best
        if cfg.get("test", False) and signal_received(trainer):
            log.warning("a termination signal arrived after the last epoch: training is complete; no test")
        elif cfg.get("test", False):
            ckpt = best if cfg.get("train", True) else cfg.get("ckpt_path")
            if ckpt is None:
                log.warning("no best checkpoint was written; testing the current weights")
            # Lightning's table of test metrics is an INFO message: not on the main job's quiet console
            trainer.test(
                model=model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True,
                verbose=console_shows(logging.INFO),
            )  # fmt: skip
            metrics.update({k: v for k, v in _plain_metrics(trainer).items() if k.startswith("test/")})
    finally:
        cleanup_distributed(launched_here)
    if trainer.is_global_zero:
        copy = f" (published copy of {best})" if run_files is not None and run_files.published else ""
        log.info("best checkpoint: %s%s", objects["best_checkpoint"], copy)
    return metrics, objects
