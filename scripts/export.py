"""Export checkpoints for deployment: `python scripts/export.py [targets=[xray_torchscript,ct_onnx]]`.

Writes `saved_models/exports/` (TorchScript, ONNX, torch.export programs and `manifest.json`); see
`conf/export.yaml` and `medens.export`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from medens.export import export_checkpoints


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    manifest = export_checkpoints(cfg)
    for name in cfg.targets:
        entry = manifest["exports"][name]
        diff = entry["verification"]["max_abs_diff"]
        print(f"{name}: {cfg.out_dir}/{entry['file']} (verified, max abs diff from eager {diff:.2e})")


if __name__ == "__main__":
    main()
