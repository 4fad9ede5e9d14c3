"""The main job on the embedded synthetic default: `python scripts/main.py` (see conf/main.yaml)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from medens.pipeline import run_pipeline
from medens.utils.jsonio import write_json_strict


@hydra.main(version_base="1.3", config_path="../conf", config_name="main")
def main(cfg: DictConfig) -> None:
    summary = run_pipeline(cfg)
    out = write_json_strict(Path(cfg.paths.output_dir) / "summary.json", summary)  # strict JSON: NaN -> null
    report = (summary.get("ensemble") or {}).get("report_dir")
    if report:
        print(f"ensemble report: {report}/report.md (and report.html, roc_curves.png)")
    print(f"saved models: {cfg.paths.saved_models_dir}\nsummary: {out}")


if __name__ == "__main__":
    main()
