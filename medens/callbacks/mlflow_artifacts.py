"""Upload a run's files (history, best checkpoint, full config, reports) to its MLflow run."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

log = logging.getLogger(__name__)

#: Evaluation outputs that `scripts/evaluate.py` and the pipeline write (relative to `report_dir`).
DEFAULT_REPORTS = ("**/metrics.json", "**/operating_points.csv", "**/roc_curves.png", "**/per_case.csv")


def find_mlflow_logger(trainer: pl.Trainer) -> Any | None:
    """The trainer's MLFlowLogger, or None (also when mlflow is not installed)."""
    from lightning.pytorch.loggers import MLFlowLogger

    return next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)


class MLflowArtifacts(Callback):
    """At the end of fit, log to the MLFlowLogger's run: `training_history.json`, the best checkpoint
    (`checkpoints/`), the resolved config (`config/config.yaml`, since MLflow params are truncated) and any
    evaluation report found under `report_dir` (`reports/`); at the end of test, reports again if new.

    Does nothing without an MLFlowLogger. An upload failure is logged, not raised, unless `strict`:
    the checkpoints are safe on disk and a finished training should not fail over its bookkeeping.
    """

    def __init__(
        self,
        checkpoint: bool = True,
        history: bool = True,
        config: bool = True,
        report_dir: str | None = None,
        reports: Sequence[str] = DEFAULT_REPORTS,
        strict: bool = False,
    ) -> None:
        self.checkpoint = checkpoint
        self.history = history
        self.config = config
        self.report_dir = Path(report_dir) if report_dir else None
        self.reports = list(reports or [])
        self.strict = strict
        self._logged: set[tuple[str, int]] = set()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._upload(trainer, pl_module, fit=True)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._upload(trainer, pl_module, fit=False)

    def _best_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        monitor = getattr(pl_module, "monitor", None)
        cbs = [
            cb
            for cb in trainer.checkpoint_callbacks
            if isinstance(cb, ModelCheckpoint) and cb.best_model_path
        ]
        chosen = next((cb for cb in cbs if monitor and cb.monitor == monitor), None)
        chosen = chosen or next((cb for cb in cbs if cb.monitor not in (None, "step")), None)
        path = Path(chosen.best_model_path) if chosen else None
        return path if path and path.is_file() else None

    def _files(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, fit: bool, tmp: Path
    ) -> list[tuple[Path, str | None]]:
        from medens.callbacks.history import TrainingHistory

        files: list[tuple[Path, str | None]] = []
        if fit and self.history:
            for cb in trainer.callbacks:
                if isinstance(cb, TrainingHistory) and cb.path.is_file():
                    files.append((cb.path, None))
        if fit and self.checkpoint:
            best = self._best_checkpoint(trainer, pl_module)
            if best is not None:
                files.append((best, "checkpoints"))
        run_config = getattr(pl_module, "run_config", None)
        if fit and self.config and run_config:
            from omegaconf import OmegaConf

            cfg_file = tmp / "config.yaml"
            cfg_file.write_text(OmegaConf.to_yaml(OmegaConf.create(run_config)))
            files.append((cfg_file, "config"))
        if self.report_dir is not None and self.report_dir.is_dir():
            for pattern in self.reports:
                for p in sorted(self.report_dir.glob(pattern)):
                    if p.is_file():
                        rel = p.parent.relative_to(self.report_dir)
                        files.append((p, str(Path("reports") / rel) if str(rel) != "." else "reports"))
        return files

    def _upload(self, trainer: pl.Trainer, pl_module: pl.LightningModule, fit: bool) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        mlf = find_mlflow_logger(trainer)
        if mlf is None:
            return
        with tempfile.TemporaryDirectory(prefix="medens-mlflow-") as tmp:
            try:
                client, run_id = mlf.experiment, mlf.run_id
                for path, artifact_path in self._files(trainer, pl_module, fit, Path(tmp)):
                    key = (str(path.resolve()), path.stat().st_mtime_ns)
                    if key in self._logged:
                        continue
                    client.log_artifact(run_id, str(path), artifact_path=artifact_path)
                    self._logged.add(key)
                    log.info("MLflow run %s: logged %s", run_id, path.name)
            except Exception as exc:
                msg = f"MLflow artifact upload to {getattr(mlf, '_tracking_uri', '?')} failed: {exc}"
                if self.strict:
                    raise RuntimeError(msg) from exc
                log.error(msg)
