"""The main job: generate the cohort, train the three base models, stack them, evaluate, report.

Each model stage composes `conf/train.yaml` with `experiment=<experiments[stage]>` plus the cohort
choice and any overrides, trains, then (base models) evaluates its best checkpoint on its test split.
A stage is skipped when its outputs exist and a digest of its resolved config and of its inputs
(the cohort's parameters, the base checkpoints' SHA-256 for the ensemble) matches the previous run;
`force=true` or `force=[stage, ...]` reruns. One progress line per stage.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose
from omegaconf import DictConfig, OmegaConf, open_dict

from medens.callbacks.preemption import Preempted
from medens.errors import ConfigError
from medens.logging_setup import install_warning_filters, log_file, quiet_console
from medens.utils.hashing import sha256_file, sha256_text
from medens.utils.jsonio import read_json_object, read_json_or_none, write_json_strict

log = logging.getLogger(__name__)

STAGES = ("cohort", "xray", "ct", "mri", "ensemble")


def stage_digest(stage_cfg: DictConfig, run_dir: Path) -> str:
    """Digest of what decides a stage's result: its resolved config (the run folder's timestamped path
    masked) and the content of its inputs."""
    resolved = OmegaConf.to_container(stage_cfg, resolve=True)
    text = json.dumps(resolved, sort_keys=True, default=str).replace(str(run_dir), "<run>")
    inputs: dict[str, Any] = {}
    data = resolved.get("data") or {}
    for m, spec in (data.get("base_models") or {}).items():
        inputs[f"base.{m}"] = _file_digest(spec.get("ckpt_path", ""))
    cohort = resolved.get("cohort") or {}
    if cohort.get("manifest"):
        inputs["manifest"] = _file_digest(cohort["manifest"])
    return sha256_text(text + json.dumps(inputs, sort_keys=True))


def _file_digest(path: str | Path) -> str | None:
    return sha256_file(path) if Path(path).is_file() else None


class StageStamps:
    """`<log_dir>/main/stages/<stage>.json`: digest, outputs and summary of a stage's last success."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self, stage: str) -> dict[str, Any] | None:
        return read_json_or_none(self.root / f"{stage}.json")

    def write(self, stage: str, digest: str, outputs: Sequence[str], summary: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        doc = {"digest": digest, "outputs": list(outputs), "summary": summary}
        write_json_strict(self.root / f"{stage}.json", doc)

    def start(self, stage: str, digest: str) -> None:
        """Record that `stage` started with `digest`: if it is interrupted, the next run with the same digest
        resumes it from its `<name>_last.pth` (see `resume_point`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        doc = {"digest": digest, "pid": os.getpid(), "started": time.time()}
        write_json_strict(self.root / f"{stage}.running.json", doc)

    def done(self, stage: str) -> None:
        (self.root / f"{stage}.running.json").unlink(missing_ok=True)

    def resume_point(self, stage: str, digest: str, stage_cfg: DictConfig) -> Path | None:
        """The interrupted run's `<name>_last.pth` when `stage` last started with this same digest."""
        from medens.training.run_ownership import find_resume_point

        running = read_json_or_none(self.root / f"{stage}.running.json")
        if not running or running.get("digest") != digest:
            return None
        folder = Path(str(stage_cfg.paths.saved_models_dir)) / str(stage_cfg.modality)
        return find_resume_point(folder, str(stage_cfg.model.name))

    def fresh(self, stage: str, digest: str) -> dict[str, Any] | None:
        s = self.read(stage)
        if (
            s
            and s.get("digest") == digest
            and s.get("outputs")
            and all(Path(o).exists() for o in s["outputs"])
        ):
            return s
        return None


def _forced(cfg: DictConfig, stage: str) -> bool:
    force = cfg.get("force", False)
    if isinstance(force, bool):
        return force
    return stage in list(force or [])


def _compose_stage(cfg: DictConfig, stage: str, out_dir: Path) -> DictConfig:
    experiments = cfg.get("experiments") or {}
    if stage not in experiments:
        raise ConfigError(f"stage {stage!r} has no entry in `experiments` ({sorted(experiments)})")
    overrides = [f"experiment={experiments[stage]}", f"cohort={cfg.cohort}", f"paths.output_dir={out_dir}"]
    overrides += list(cfg.get("common_overrides") or []) + list((cfg.get("overrides") or {}).get(stage) or [])
    return compose(config_name="train", overrides=overrides)


def _run_cohort(cfg: DictConfig, out_root: Path) -> tuple[DictConfig, dict[str, Any], list[str]]:
    from medens.data.cohort.synthetic import ensure_synthetic_cohort

    stage_cfg = compose(
        config_name="train", overrides=[f"+cohort={cfg.cohort}", f"paths.output_dir={out_root / 'cohort'}"]
    )
    cohort = stage_cfg.cohort
    if cohort.get("generate") and cohort.get("synthetic") is not None:
        ensure_synthetic_cohort(cohort.root, **OmegaConf.to_container(cohort.synthetic, resolve=True))
    if not Path(cohort.manifest).is_file():
        raise ConfigError(f"cohort manifest {cohort.manifest} not found (cohort.generate is false)")
    return stage_cfg, {"manifest": str(cohort.manifest), "root": str(cohort.root)}, [str(cohort.manifest)]


def _run_model_stage(
    cfg: DictConfig, stage: str, stage_cfg: DictConfig, out_dir: Path
) -> tuple[dict[str, Any], list[str]]:
    from medens.evaluation.evaluate import evaluate
    from medens.training.train import train

    metrics, objects = train(stage_cfg)
    best = objects.get("best_checkpoint")
    if not best:
        raise RuntimeError(f"stage {stage}: training wrote no best checkpoint")
    summary: dict[str, Any] = {"best_checkpoint": best, "best_val": metrics.get(f"best/{stage_cfg.monitor}")}
    summary.update(data_wait_fraction=metrics.get("perf/data_wait_fraction"), images_per_s=metrics.get("perf/images_per_s"))
    outputs = [best]
    if stage == "ensemble":
        report = out_dir / "report"
        data = read_json_object(report / "report.json", "ensemble report", ConfigError)
        summary.update(
            report_dir=str(report),
            weighted_average=str(
                Path(stage_cfg.paths.saved_models_dir) / "ensemble" / "weighted_average.json"
            ),
            mean_auc=data["mean_auc"],
            best_single=data["best_single"],
            gain_over_best_single=data["gain_over_best_single"],
        )
        outputs += [summary["weighted_average"], str(report / "report.json")]
    elif cfg.get("evaluate", True):
        eval_dir = out_dir / "evaluation"
        eval_cfg = OmegaConf.create(
            {"ckpt_path": best, "split": "test", "device": "cpu", "paths": {"output_dir": str(eval_dir)}}
        )
        rep = evaluate(eval_cfg) or {}
        summary.update(
            report_dir=str(eval_dir), test_mean_auc=rep.get("mean_auc"), test_mean_dice=rep.get("mean_dice")
        )
    return summary, outputs


def _rounded(value: Any) -> Any:
    """A metric as the progress line shows it (three decimals); the stage files keep full precision."""
    return f"{value:.3f}" if isinstance(value, float) else value


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """Run `cfg.stages` in order; returns {stage: summary}. Needs Hydra initialised (a Hydra app or
    `initialize_config_dir`) for `compose`."""
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
    out_root = Path(cfg.paths.output_dir)
    from medens.training.validation import validate_config

    for stage in [s for s in cfg.stages if s != "cohort"]:  # every stage's keys and values, before any work
        validate_config(_compose_stage(cfg, stage, out_root / stage))
    stamps = StageStamps(Path(cfg.paths.log_dir) / "main" / "stages")
    summary: dict[str, Any] = {}
    install_warning_filters()
    where = log_file()
    if where is not None:
        print(f"main job: {len(cfg.stages)} stages; full log: {where}", flush=True)
    current: dict[str, Any] = {}
    # INFO lines go to the log file only; the console gets one line per stage. That line carries the data
    # wait, so the data-wait callback's advice goes to the log file too: on the CPU the default stages'
    # loaders share the cores with training, and more workers is not advice the default run should print.
    with quiet_console(log_only=("medens.callbacks.data_wait",)):
        try:
            _run_stages(cfg, out_root, stamps, summary, current)
        except Preempted:
            raise
        except Exception as exc:
            log.error("stage %s failed", current.get("stage"), exc_info=True)  # the traceback, in the log file
            seconds = time.perf_counter() - current.get("t0", time.perf_counter())
            print(
                f"[{current.get('i')}/{len(cfg.stages)}] {current.get('stage')}: FAILED after {seconds:.0f}s: "
                f"{type(exc).__name__}: {exc}" + (f"\n  full log: {where}" if where is not None else ""),
                flush=True,
            )
            raise
    return summary


def _run_stages(
    cfg: DictConfig, out_root: Path, stamps: StageStamps, summary: dict[str, Any], current: dict[str, Any]
) -> None:
    """Run the stages in order, filling `summary`; `current` names the stage running (for the failure line)."""
    n = len(cfg.stages)
    for i, stage in enumerate(cfg.stages, start=1):
        t0 = time.perf_counter()
        current.update(i=i, stage=stage, t0=t0)
        out_dir = out_root / stage
        if stage == "cohort":
            print(f"[{i}/{n}] cohort: generating / checking the cohort ...", flush=True)
            stage_cfg, info, outputs = _run_cohort(cfg, out_root)
            summary[stage] = {**info, "seconds": round(time.perf_counter() - t0, 1)}
            print(
                f"[{i}/{n}] cohort: ready in {time.perf_counter() - t0:.0f}s; manifest {info['manifest']}",
                flush=True,
            )
            continue
        stage_cfg = _compose_stage(cfg, stage, out_dir)
        digest = stage_digest(stage_cfg, out_dir)
        prior = None if _forced(cfg, stage) else stamps.fresh(stage, digest)
        if prior is not None:
            summary[stage] = {**prior["summary"], "skipped": True, "seconds": 0.0}
            print(
                f"[{i}/{n}] {stage}: up to date, skipped (force=[{stage}] reruns); {prior['summary'].get('best_checkpoint')}",
                flush=True,
            )
            continue
        resume = stamps.resume_point(stage, digest, stage_cfg)
        with open_dict(stage_cfg):
            # the main job decided this stage reruns: its result replaces the canonical best (run_ownership.py)
            stage_cfg.publish = "always"
            if resume is not None:
                stage_cfg.ckpt_path = str(resume)
        how = f"resuming the interrupted stage from {resume}" if resume is not None else "training"
        print(f"[{i}/{n}] {stage}: {how} ({stage_cfg.task_name}) ...", flush=True)
        stamps.start(stage, digest)
        try:
            result, outputs = _run_model_stage(cfg, stage, stage_cfg, out_dir)
        except Preempted as exc:
            print(f"[{i}/{n}] {stage}: preempted; the next run resumes it from {exc.path}", flush=True)
            raise
        stamps.done(stage)
        seconds = time.perf_counter() - t0
        result["seconds"] = round(seconds, 1)
        stamps.write(stage, digest, outputs, result)
        summary[stage] = result
        extra = ""
        if stage == "ensemble":
            extra = (
                f"; meta-learner mean AUC {result['mean_auc']['meta_learner']:.3f} vs best single "
                f"{result['best_single']['method']} {result['best_single']['mean_auc']:.3f}; report {result['report_dir']}"
            )
        elif result.get("report_dir"):
            tests = [
                f"; test mean {name} {_rounded(result[key])}"
                for key, name in (("test_mean_auc", "AUC"), ("test_mean_dice", "Dice"))
                if result.get(key) is not None
            ]
            extra = f"{''.join(tests)}; report {result['report_dir']}"
        if result.get("data_wait_fraction") is not None:  # last training epoch (medens.callbacks.data_wait)
            extra = f"; data wait {100 * result['data_wait_fraction']:.0f}% ({result['images_per_s']:.0f} img/s){extra}"
        print(
            f"[{i}/{n}] {stage}: done in {seconds:.0f}s; best {stage_cfg.monitor} {_rounded(result['best_val'])}{extra}",
            flush=True,
        )
