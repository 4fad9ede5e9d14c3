"""Export any `nn.Module` to TorchScript, ONNX or a `torch.export` program, verified before it lands.

`export_module` is the one entry point: it writes the export to a temporary file beside the target,
reloads that file the way a deployment would (`torch.jit.load`, `torch.export.load(...).module()`,
an `onnxruntime` CPU session), compares its outputs with the eager module on fresh seeded random
inputs at several batch sizes, and only then renames it over the target. A failed export or check
raises `ExportError`, removes its own temporary file and touches nothing else, so an earlier good
export at the same path survives.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medens.errors import ExportError
from medens.utils.atomic import TEMP_SUFFIX, atomic_path
from medens.utils.hashing import sha256_file

KINDS = ("torchscript_trace", "torchscript_script", "onnx", "torch_export")
ONNX_EXPORTERS = ("dynamo", "legacy")
#: How a deployment loads each kind (recorded in manifests).
LOADERS = {
    "torchscript_trace": "torch.jit.load(path)",
    "torchscript_script": "torch.jit.load(path)",
    "torch_export": "torch.export.load(path).module()",
    "onnx": "onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])",
}
Inputs = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass
class ExportResult:
    """What `export_module` wrote and how well the written file reproduced the eager module."""

    path: str
    kind: str
    input_names: list[str]
    output_names: list[str]
    input_shapes: list[list[int | str]]  # "batch" marks the dynamic first axis
    output_shapes: list[list[int | str]]
    input_dtypes: list[str]
    output_dtypes: list[str]
    atol: float
    rtol: float
    seed: int
    checks: list[dict[str, Any]] = field(default_factory=list)
    opset: int | None = None
    onnx_exporter: str | None = None
    sha256: str = ""
    size_bytes: int = 0
    seconds: float = 0.0

    @property
    def max_abs_diff(self) -> float:
        return max((c["max_abs_diff"] for c in self.checks), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["max_abs_diff"] = self.max_abs_diff
        out["load_with"] = LOADERS[self.kind]
        return out


# ----------------------------------------------------------------------------------------- ONNX opsets
@functools.lru_cache(maxsize=1)
def onnxruntime_opset_range() -> tuple[int, int]:
    """(lowest, highest) default-domain opset the installed onnxruntime loads, found by probing.

    onnxruntime has no API for its opset range, so a one-node model is stamped with each opset and a CPU
    session is created for it; the lowest is the 7 onnxruntime guarantees.
    """
    ort, onnx = _import_onnx()
    from onnx import TensorProto, helper

    def loads(opset: int) -> bool:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        try:
            ort.InferenceSession(model.SerializeToString(), _session_options(ort), ["CPUExecutionProvider"])
        except Exception:
            return False
        return True

    hi = 7
    for opset in range(7, onnx.defs.onnx_opset_version() + 8):
        if not loads(opset):
            break
        hi = opset
    return 7, hi


def onnx_opset_range(exporter: str = "dynamo") -> tuple[int, int]:
    """Opsets that both the torch exporter writes natively and the installed onnxruntime runs."""
    from torch.onnx import _constants

    if exporter == "dynamo":  # torch.export-based: implementations from opset 18 up
        lo, hi = 18, int(getattr(_constants, "ONNX_MAX_OPSET", 23))
    elif exporter == "legacy":  # TorchScript-based, deprecated
        lo = int(getattr(_constants, "ONNX_MIN_OPSET", 7))
        hi = int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))
    else:
        raise ExportError(f"unknown ONNX exporter {exporter!r}; choose one of {', '.join(ONNX_EXPORTERS)}")
    ort_lo, ort_hi = onnxruntime_opset_range()
    return max(lo, ort_lo), min(hi, ort_hi)


def check_onnx_opset(opset: int, exporter: str = "dynamo") -> None:
    """Raise `ExportError` naming the supported range when `opset` cannot be both written and run here."""
    lo, hi = onnx_opset_range(exporter)
    if not isinstance(opset, int) or not lo <= opset <= hi:
        import onnxruntime

        _, ort_hi = onnxruntime_opset_range()
        raise ExportError(
            f"ONNX opset {opset!r} is not supported: torch {torch.__version__}'s {exporter} exporter and "
            f"onnxruntime {onnxruntime.__version__} (which runs opsets 7-{ort_hi}) together support "
            f"opsets {lo}-{hi}"
        )


def _import_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ExportError(
            f"ONNX export needs onnx and onnxruntime: pip install 'medens[export]' ({exc})"
        ) from exc
    return onnxruntime, onnx


def _session_options(ort: Any) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()  # the same CPU share as the eager reference
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only; opset notices would drown the log
    return opts


def onnx_session(path: str | os.PathLike) -> Any:
    """An onnxruntime CPU session for `path`, using as many threads as torch does."""
    ort, _ = _import_onnx()
    return ort.InferenceSession(str(path), _session_options(ort), providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------------- helpers
def _as_tuple(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    items = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise ExportError("example_inputs must be a tensor or a non-empty tuple of tensors")
    return items


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """A module's output as a flat list of tensors (a tensor, or a tuple/list of tensors)."""
    items = [out] if isinstance(out, torch.Tensor) else list(out) if isinstance(out, tuple | list) else None
    if items is None or not all(isinstance(t, torch.Tensor) for t in items):
        raise ExportError(f"the module must return a tensor or a tuple of tensors, got {type(out).__name__}")
    return items


def random_inputs(example: tuple[torch.Tensor, ...], batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Fresh inputs shaped like `example` but with `batch` rows: seeded normal noise for floating tensors,
    the example's rows repeated for integer or boolean ones (ids, masks)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in example:
        if t.is_floating_point():
            out.append(torch.randn((batch, *t.shape[1:]), generator=gen, dtype=t.dtype))
        else:
            out.append(t[torch.arange(batch) % t.shape[0]].clone())
    return tuple(out)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _default_names(prefix: str, n: int) -> list[str]:
    return [prefix] if n == 1 else [f"{prefix}_{i}" for i in range(n)]


@contextlib.contextmanager
def _quiet_loggers(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.level))
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, before, strict=True):
            lg.setLevel(lvl)


def _short(exc: BaseException, limit: int = 1500) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + " ..."


# ----------------------------------------------------------------------------------------- write / load
def _write(
    kind: str,
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_batch: bool,
    opset: int,
    onnx_exporter: str,
) -> None:
    batch = torch.export.Dim("batch", min=1)
    shapes = tuple({0: batch} for _ in example) if dynamic_batch else None
    with warnings.catch_warnings():
        # TorchScript and the legacy ONNX exporter announce their deprecation on every call; choosing
        # them is the caller's decision, and the manifest records which was used.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        # inputs sharing the one batch Dim: the ONNX exporter notes that it names the axis only once
        warnings.filterwarnings(
            "ignore", message=".*The axis name: .* will not be used", category=UserWarning
        )
        if kind == "torchscript_trace":
            with torch.no_grad():
                scripted = torch.jit.trace(module, example, check_trace=False)
            torch.jit.save(scripted, str(path))
        elif kind == "torchscript_script":
            torch.jit.save(torch.jit.script(module), str(path))
        elif kind == "torch_export":
            program = torch.export.export(module, example, dynamic_shapes=shapes)
            torch.export.save(program, str(path))
        elif onnx_exporter == "dynamo":
            with _quiet_loggers("onnxscript", "onnx_ir"):  # one INFO line per optimisation pass otherwise
                torch.onnx.export(
                    module, example, str(path), input_names=input_names, output_names=output_names,
                    opset_version=opset, dynamo=True, dynamic_shapes=shapes, external_data=False,
                    verbose=False,
                )  # fmt: skip
        else:
            axes = {name: {0: "batch"} for name in [*input_names, *output_names]} if dynamic_batch else None
            torch.onnx.export(
                module, example, str(path), input_names=input_names, output_names=output_names,
                opset_version=opset, dynamo=False, dynamic_axes=axes, do_constant_folding=True,
            )  # fmt: skip
    if kind == "onnx":
        _, onnx = _import_onnx()
        model = onnx.load(str(path), load_external_data=False)
        written = {o.domain or "ai.onnx": o.version for o in model.opset_import}.get("ai.onnx")
        if written != opset:
            raise ExportError(
                f"asked for ONNX opset {opset} but the {onnx_exporter} exporter wrote opset {written}"
            )


def load_runner(kind: str, path: str | os.PathLike) -> Callable[[tuple[torch.Tensor, ...]], list[np.ndarray]]:
    """Load an export the way a deployment would; the returned function maps inputs to numpy outputs."""
    if kind in ("torchscript_trace", "torchscript_script"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # TorchScript's deprecation notice
            loaded = torch.jit.load(str(path), map_location="cpu").eval()
    elif kind == "torch_export":
        loaded = torch.export.load(str(path)).module()
    elif kind == "onnx":
        session = onnx_session(path)
        names = [i.name for i in session.get_inputs()]

        def run_onnx(inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
            feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs, strict=True)}
            return [np.asarray(o) for o in session.run(None, feeds)]

        return run_onnx
    else:
        raise ExportError(f"unknown export kind {kind!r}; choose one of {', '.join(KINDS)}")

    def run_torch(inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
        with torch.no_grad():
            return [t.detach().cpu().numpy() for t in flatten_outputs(loaded(*inputs))]

    return run_torch


def compare_outputs(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], atol: float, rtol: float
) -> dict[str, Any]:
    """Elementwise `|candidate - reference| <= atol + rtol * |reference|` over all outputs (as
    `torch.testing.assert_close`); NaN must match NaN. `worst_fraction` > 1 means it failed."""
    if len(reference) != len(candidate):
        return {"passed": False, "reason": f"{len(candidate)} outputs instead of {len(reference)}"}
    stats: dict[str, Any] = {"max_abs_diff": 0.0, "max_ref_abs": 0.0, "worst_fraction": 0.0}
    for i, (ref, got) in enumerate(zip(reference, candidate, strict=True)):
        ref, got = np.asarray(ref), np.asarray(got)
        if ref.shape != got.shape:
            return {"passed": False, "reason": f"output {i} has shape {got.shape}, expected {ref.shape}"}
        if not ref.size:
            continue
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        if not (np.isnan(ref64) == np.isnan(got64)).all():
            return {
                "passed": False,
                "reason": f"output {i}: NaN where the eager module has none (or vice versa)",
            }
        diff = np.where(np.isnan(ref64), 0.0, np.abs(got64 - ref64))
        with np.errstate(divide="ignore", invalid="ignore"):
            fraction = np.where(diff == 0, 0.0, diff / (atol + rtol * np.abs(np.nan_to_num(ref64))))
        stats["max_abs_diff"] = max(stats["max_abs_diff"], float(np.nanmax(diff)))
        stats["max_ref_abs"] = max(stats["max_ref_abs"], float(np.nanmax(np.abs(ref64))))
        stats["worst_fraction"] = max(stats["worst_fraction"], float(np.nanmax(fraction)))
        if stats["worst_fraction"] > 1.0 and "reason" not in stats:
            j = np.unravel_index(np.nanargmax(fraction), fraction.shape)
            stats["reason"] = (
                f"output {i} differs by {float(diff[j]):.3g} at index {tuple(int(k) for k in j)} "
                f"(eager {float(ref64[j]):.6g}, export {float(got64[j]):.6g}; allowed "
                f"{atol + rtol * abs(float(ref64[j])):.3g})"
            )
    stats["passed"] = stats["worst_fraction"] <= 1.0
    return stats


# ----------------------------------------------------------------------------------------- the API
def export_module(
    module: nn.Module,
    example_inputs: Inputs,
    kind: str,
    path: str | os.PathLike,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    verify_batches: Sequence[int] = (1, 3),
    atol: float = 1e-4,
    rtol: float = 1e-3,
    seed: int = 0,
    opset: int = 18,
    onnx_exporter: str = "dynamo",
) -> ExportResult:
    """Export `module`, verify the written file against eager PyTorch, then atomically put it at `path`.

    - `module`: any `nn.Module` on the CPU whose `forward` takes one tensor or several tensors (positional)
      and returns a tensor or a tuple of tensors; it is in eval mode while exporting (its mode is restored).
      Whatever it returns is what the export returns: wrap it (e.g. add a sigmoid) before calling if needed.
    - `example_inputs`: a tensor or a tuple of tensors, one per `forward` argument, first axis = batch.
      With `dynamic_batch`, all inputs share one dynamic batch axis; an example batch of 1 is repeated
      to 2 so that the exporters do not specialise the axis to 1.
    - `kind`: `torchscript_trace` (`torch.jit.trace`), `torchscript_script` (`torch.jit.script`), `onnx`
      (`torch.onnx.export`, opset `opset`, `onnx_exporter` `dynamo` (torch.export-based, needs onnxscript)
      or `legacy` (TorchScript-based)) or `torch_export` (`torch.export.export` + `torch.export.save`;
      name the file `.pt2`, as `torch.export.load` expects).
    - `input_names`/`output_names`: the ONNX graph's names (default `input`/`output`, or `input_0`, ...
      for several); recorded for the other kinds too.
    - verification: for each batch size in `verify_batches` (only the example's batch when not
      `dynamic_batch`), seeded random inputs (`seed + batch size`) go through the eager module and the
      reloaded export (onnxruntime, CPU provider, for ONNX); every output element must satisfy
      `|export - eager| <= atol + rtol * |eager|`.

    Returns an `ExportResult` (shapes, dtypes, per-batch differences, SHA-256 of the file). Raises
    `ExportError` when exporting fails, the opset is unsupported or verification fails; then the
    temporary file is removed and nothing else is touched (an existing file at `path` stays as it was).
    """
    if kind not in KINDS:
        raise ExportError(f"unknown export kind {kind!r}; choose one of {', '.join(KINDS)}")
    path = Path(path)
    if kind == "onnx":
        if onnx_exporter not in ONNX_EXPORTERS:
            raise ExportError(
                f"unknown ONNX exporter {onnx_exporter!r}; choose one of {', '.join(ONNX_EXPORTERS)}"
            )
        check_onnx_opset(opset, onnx_exporter)
    example = _as_tuple(example_inputs)
    if dynamic_batch and example[0].shape[0] == 1:
        example = tuple(torch.cat([t, t]) for t in example)
    if dynamic_batch and len({t.shape[0] for t in example}) != 1:
        raise ExportError(f"example inputs disagree on the batch size: {[tuple(t.shape) for t in example]}")
    batches = [int(b) for b in verify_batches] if dynamic_batch else [int(example[0].shape[0])]
    if not batches or min(batches) < 1:
        raise ExportError(
            f"verify_batches must name at least one batch size >= 1, got {list(verify_batches)}"
        )

    was_training = module.training
    module.eval()
    start = time.perf_counter()
    try:
        with atomic_path(path, suffix=TEMP_SUFFIX + path.suffix) as tmp:  # exporters want the extension
            try:
                with torch.no_grad():
                    example_out = flatten_outputs(module(*example))
            except ExportError:
                raise
            except Exception as exc:
                shapes = [tuple(t.shape) for t in example]
                raise ExportError(
                    f"{path}: {type(module).__name__} fails on the example inputs {shapes}: {_short(exc)}"
                ) from exc
            in_names = list(input_names) if input_names else _default_names("input", len(example))
            out_names = list(output_names) if output_names else _default_names("output", len(example_out))
            if len(in_names) != len(example) or len(out_names) != len(example_out):
                raise ExportError(
                    f"{len(in_names)} input names for {len(example)} inputs / {len(out_names)} output names for "
                    f"{len(example_out)} outputs"
                )
            try:
                _write(kind, module, example, tmp, in_names, out_names, dynamic_batch, opset, onnx_exporter)
                run = load_runner(kind, tmp)
            except ExportError as exc:
                raise ExportError(f"{path}: {exc}") from exc
            except Exception as exc:
                raise ExportError(
                    f"{path}: {kind} export of {type(module).__name__} failed: {_short(exc)}"
                ) from exc
            checks = []
            for batch in batches:
                inputs = random_inputs(example, batch, seed + batch)
                with torch.no_grad():
                    reference = [t.detach().cpu().numpy() for t in flatten_outputs(module(*inputs))]
                try:
                    candidate = run(inputs)
                except Exception as exc:
                    raise ExportError(
                        f"{path}: the {kind} export fails at batch size {batch}: {_short(exc)}"
                    ) from exc
                check = {"batch_size": batch, **compare_outputs(reference, candidate, atol, rtol)}
                checks.append(check)
                if not check["passed"]:
                    raise ExportError(
                        f"{path}: {kind} export does not reproduce the eager {type(module).__name__} "
                        f"at batch size {batch} within atol={atol:g}, rtol={rtol:g}: {check['reason']}. "
                        "Nothing was written; any earlier file at this path is unchanged"
                    )
            del run
    finally:
        module.train(was_training)

    def spec(tensors: Sequence[torch.Tensor]) -> list[list[int | str]]:
        return [
            [("batch" if dynamic_batch and d == 0 else int(n)) for d, n in enumerate(t.shape)]
            for t in tensors
        ]

    return ExportResult(
        path=str(path),
        kind=kind,
        input_names=in_names,
        output_names=out_names,
        input_shapes=spec(example),
        output_shapes=spec(example_out),
        input_dtypes=[_dtype_name(t.dtype) for t in example],
        output_dtypes=[_dtype_name(t.dtype) for t in example_out],
        atol=float(atol),
        rtol=float(rtol),
        seed=int(seed),
        checks=checks,
        opset=int(opset) if kind == "onnx" else None,
        onnx_exporter=onnx_exporter if kind == "onnx" else None,
        sha256=sha256_file(path),
        size_bytes=path.stat().st_size,
        seconds=round(time.perf_counter() - start, 3),
    )
