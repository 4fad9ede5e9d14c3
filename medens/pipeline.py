"""The main job: every configured stage, end to end, on the embedded synthetic default.

Each stage composes `conf/train.yaml` with `experiment=<stage>`, trains, then evaluates its best
checkpoint; one progress line per stage.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from hydra import compose
from omegaconf import DictConfig, OmegaConf

from medens.evaluation.evaluate import evaluate
from medens.training.train import train

log = logging.getLogger(__name__)


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """Run `cfg.stages` in order; returns {stage: summary}. Needs Hydra initialised (a Hydra app or
    `initialize_config_dir`) for `compose`."""
    out_root = Path(cfg.paths.output_dir)
    summary: dict[str, Any] = {}
    for i, stage in enumerate(cfg.stages, start=1):
        t0 = time.perf_counter()
        print(f"[{i}/{len(cfg.stages)}] {stage}: training ...", flush=True)
        overrides = [f"experiment={stage}", f"paths.output_dir={out_root / stage}"]
        overrides += list(cfg.get("overrides", {}).get(stage, []) or []) + list(cfg.get("common_overrides") or [])
        stage_cfg = compose(config_name="train", overrides=overrides)
        metrics, objects = train(stage_cfg)
        best = objects.get("best_checkpoint")
        report = None
        if best:
            eval_cfg = OmegaConf.create(
                {"ckpt_path": best, "split": "test", "device": "cpu", "paths": {"output_dir": str(out_root / stage / "evaluation")}}
            )
            report = evaluate(eval_cfg)
        seconds = time.perf_counter() - t0
        summary[stage] = {
            "best_checkpoint": best,
            "best_val": metrics.get(f"best/{stage_cfg.monitor}"),
            "test_mean_auc": (report or {}).get("mean_auc"),
            "report_dir": str(out_root / stage / "evaluation"),
            "seconds": round(seconds, 1),
        }
        print(
            f"[{i}/{len(cfg.stages)}] {stage}: done in {seconds:.0f}s; best {stage_cfg.monitor} "
            f"{summary[stage]['best_val']}; report {summary[stage]['report_dir']}",
            flush=True,
        )
    return summary
