"""Production exports: TorchScript, ONNX and `torch.export` programs, each verified against eager PyTorch.

`export_module` exports any module (one or several tensor inputs and outputs); `export_checkpoints`
exports medens checkpoints as configured in `conf/export.yaml` and keeps `manifest.json` beside them.
"""

from medens.export.checkpoints import (
    FORMATS,
    describe_output,
    export_checkpoints,
    load_source_network,
    parse_targets,
    read_manifest,
    update_manifest,
)
from medens.export.core import (
    KINDS,
    ExportResult,
    check_onnx_opset,
    compare_outputs,
    export_module,
    load_runner,
    onnx_opset_range,
    onnxruntime_opset_range,
)

__all__ = [
    "FORMATS",
    "KINDS",
    "ExportResult",
    "check_onnx_opset",
    "compare_outputs",
    "describe_output",
    "export_checkpoints",
    "export_module",
    "load_runner",
    "load_source_network",
    "onnx_opset_range",
    "onnxruntime_opset_range",
    "parse_targets",
    "read_manifest",
    "update_manifest",
]
