"""The served model: which export (local or pulled from the S3 store), verified, loaded, and run.

`resolve_bundle` finds the export folder of a model and version; `load_served_model` checks every file's
SHA-256 against the manifest (a mismatch refuses start-up) and loads it with `medens.export.load_runner`
(TorchScript / ONNX Runtime / torch.export), never a checkpoint and never `hydra.utils.instantiate`.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medens.errors import MedensError
from medens.models.tta import flip_averaged_logits, spatial_flips
from medens.utils.hashing import sha256_file

log = logging.getLogger(__name__)

MODELS = ("xray", "ct", "mri", "ensemble")
FOLDERS = {"xray": "xray", "ct": "ct", "mri": "mri", "ensemble": "ensemble"}


class ServeError(MedensError):
    """The server cannot start: unknown model or version, missing export, or a file failing its SHA-256."""


@dataclass
class Bundle:
    """An export folder (`manifest.json` + files) and the version it holds."""

    folder: Path
    version: str
    source: str  # "local exports", "local version", "store"
    metadata: dict[str, Any] = field(default_factory=dict)


def _manifest(folder: Path) -> dict[str, Any]:
    from medens.export import read_manifest  # refuses a manifest that names code to build

    return read_manifest(folder / "manifest.json")


def _target_names(model: str, formats: Sequence[str]) -> list[str]:
    if model == "ensemble":
        return ["ensemble_traced"]
    return [f"{model}_{f}" for f in formats]


def resolve_bundle(
    model: str,
    version: str | None,
    saved_models_dir: Path,
    exports_dir: Path,
    store: Any = None,
) -> Bundle:
    """The export folder for `model` at `version` (None: the current exports in `exports_dir`).

    A version is looked up in `saved_models/<modality>/<name>_v<version>_exports/` (what `store pull`
    writes), then in the store when one is given (pulled into that folder, every SHA-256 verified).
    """
    if model not in MODELS:
        raise ServeError(f"model={model!r}: choose one of {', '.join(MODELS)}")
    if version is None:
        if not (exports_dir / "manifest.json").is_file():
            raise ServeError(
                f"{exports_dir}/manifest.json not found: export the model first (scripts/export.py) or give version="
            )
        return Bundle(exports_dir, "unversioned", "local exports")
    from medens.registry.semver import SemVer

    try:
        wanted = SemVer.parse(str(version))
    except Exception as exc:
        raise ServeError(f"version={version!r} is not a semantic version ({exc})") from exc
    folder = saved_models_dir / FOLDERS[model]
    local = sorted(folder.glob(f"*_v{wanted}_exports/manifest.json")) if folder.is_dir() else []
    if local:
        return Bundle(local[0].parent, str(wanted), "local version", _version_metadata(local[0].parent))
    have_local = (
        sorted(p.parent.name for p in folder.glob("*_v*_exports/manifest.json")) if folder.is_dir() else []
    )
    if store is None:
        raise ServeError(
            f"version {wanted} of the {model} model does not exist locally ({folder}: "
            f"{', '.join(have_local) or 'no pulled versions'}) and the store is not enabled (store.enabled=true)"
        )
    stored = [v for v in store.list_versions(FOLDERS[model]) if v.version == wanted]
    if not stored:
        have = [f"{v.model_name} {v.version}" for v in store.list_versions(FOLDERS[model])]
        raise ServeError(
            f"version {wanted} of the {model} model does not exist in the store "
            f"s3://{store.settings.bucket}/{store.prefix}/{FOLDERS[model]}/ (published: {', '.join(have) or 'none'})"
        )
    sv = stored[0]
    if not sv.marker.get("exports"):
        raise ServeError(f"{store.uri(sv.prefix)}: version {wanted} was published without exports")
    files = store.pull(sv.modality, sv.model_name, str(sv.version), folder)  # raises on any SHA-256 mismatch
    exports = next(p for n, p in files.items() if n.endswith("manifest.json")).parent
    return Bundle(exports, str(wanted), "store", _version_metadata(exports))


def _version_metadata(exports: Path) -> dict[str, Any]:
    """The versioned checkpoint's metadata beside a pulled exports folder (model name, performance)."""
    from medens.utils.jsonio import read_json_or_none

    stem = exports.name.removesuffix("_exports")
    for meta in sorted(exports.parent.glob(f"{stem}*.json")):
        if isinstance(doc := read_json_or_none(meta), dict):
            return doc
    return {}


class ServedModel:
    """One loaded export with its contract; `predict(key, inputs)` runs a batch (see `run_batch`)."""

    def __init__(
        self, model: str, bundle: Bundle, formats: Sequence[str], optimize: bool | None = None
    ) -> None:
        from medens.export.core import load_runner

        self.model = model
        self.bundle = bundle
        manifest = _manifest(bundle.folder)
        exports = manifest.get("exports") or {}
        names = _target_names(model, formats)
        target = next((n for n in names if n in exports), None)
        if target is None:
            raise ServeError(
                f"{bundle.folder}/manifest.json has no {' or '.join(names)} export (it has "
                f"{', '.join(exports) or 'none'}); run scripts/export.py targets=[{names[0]}]"
            )
        self.target = target
        self.entry: dict[str, Any] = exports[target]
        self.path = bundle.folder / str(self.entry["file"])
        if not self.path.is_file():
            raise ServeError(f"{self.path}: export file listed in the manifest is missing")
        actual = sha256_file(self.path)
        if actual != self.entry.get("sha256"):
            raise ServeError(
                f"{self.path}: SHA-256 mismatch: manifest records {self.entry.get('sha256')}, the file has "
                f"{actual}; refusing to serve a file that changed after it was exported"
            )
        self.sha256 = actual
        kind = str(self.entry["kind"])
        # a frozen, inference-optimised TorchScript graph (conv+BN folded, oneDNN layouts) for the 2-D
        # classifier: a batch of 8 then costs far less per image than 8 batches of 1 (dynamic batching pays)
        self.optimized = bool(model == "xray" if optimize is None else optimize) and kind.startswith(
            "torchscript"
        )
        self.run = _optimized_torchscript(self.path) if self.optimized else load_runner(kind, self.path)
        self.io_contract: dict[str, Any] = dict(self.entry.get("io_contract") or {})
        self.inference: dict[str, Any] = dict(self.entry.get("inference") or {})
        # a segmenter's calibration is a softmax temperature: refuse a wrong one at start-up
        if model == "mri":
            from medens.evaluation.voxel_calibration import temperature_of

            try:
                temperature_of(self.entry.get("calibration"))
            except MedensError as exc:
                raise ServeError(f"{bundle.folder}/manifest.json: {target}: {exc}") from exc
        out = (self.entry.get("outputs") or [{}])[0]
        self.label_names = list(out.get("label_names") or out.get("labels") or [])
        src = self.entry.get("source_checkpoint") or {}
        self.source_sha256 = src.get("sha256")
        self.name = str(bundle.metadata.get("model_name") or _model_name(src) or target)
        self.lock_free = True

    # ----------------------------------------------------------------------------------------- run
    def _forward(self, *inputs: torch.Tensor) -> list[np.ndarray]:
        return self.run(tuple(t.contiguous() for t in inputs))

    def run_batch(self, key: Hashable, items: Sequence[Any]) -> list[Any]:
        """Stack `items` (same key = same shapes) and run them in one forward pass."""
        with torch.inference_mode():
            if self.model == "xray":
                logits = self._forward(torch.stack(items))[0]
                probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
                return list(self._calibrated(probs))
            if self.model == "ct":
                x = torch.stack(items)
                flips = spatial_flips(x.ndim) if self.inference.get("tta_flips") else [()]
                probs = np.mean([self._ct_prob(torch.flip(x, dims=f) if f else x) for f in flips], axis=0)
                return list(self._calibrated(probs))
            if self.model == "mri":
                return [self._segment(x) for x in items]
            xray, ct, mri, present = (torch.stack([it[i] for it in items]) for i in range(4))
            return list(self._forward(xray, ct, mri, present)[0].astype(np.float64))

    def _calibrated(self, probs: np.ndarray) -> np.ndarray:
        """The post-hoc calibration the manifest records for this export (evaluation applies the same)."""
        from medens.evaluation.calibration import apply_calibration

        return apply_calibration(probs, self.entry.get("calibration"), self.label_names)

    def _ct_prob(self, x: torch.Tensor) -> np.ndarray:
        logits = torch.from_numpy(self._forward(x)[0]).float()
        if logits.shape[1] == 1:
            return torch.sigmoid(logits).double().numpy()
        return torch.softmax(logits, dim=1)[:, 1:2].double().numpy()

    def _segment(self, image: torch.Tensor) -> np.ndarray:
        """Whole-volume logits [classes, ...] by the checkpoint's sliding-window settings around the export."""
        from monai.inferers import SlidingWindowInferer

        sw = dict(self.inference.get("sliding_window") or {})
        roi = sw.pop("roi_size", None) or self.io_contract.get("patch_size")
        inferer = SlidingWindowInferer(roi_size=list(roi), **{k: v for k, v in sw.items() if v is not None})

        def net(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(self._forward(x.float())[0])

        if self.inference.get("tta_flips"):  # evaluation's test-time mirroring, same function
            return flip_averaged_logits(lambda v: inferer(v, net), image[None].float())[0].numpy()
        return inferer(image[None].float(), net)[0].numpy()

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_name": self.name,
            "version": self.bundle.version,
            "source": self.bundle.source,
            "export": self.target,
            "file": self.path.name,
            "sha256": self.sha256,
            "source_checkpoint_sha256": self.source_sha256,
            "label_names": self.label_names,
            "calibration": (self.entry.get("calibration") or {}).get("method"),
            "optimized": self.optimized,
        }


def _optimized_torchscript(path: Path) -> Any:
    """`load_runner` for a TorchScript export, frozen and passed through `torch.jit.optimize_for_inference`.

    The graph is the same network (outputs agree with the export to float rounding: BN folded into the
    convolutions); freezing also drops the Python-side attribute lookups of every call.
    """
    import warnings

    from medens.export.core import flatten_outputs

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # TorchScript's deprecation notice
        loaded = torch.jit.load(str(path), map_location="cpu").eval()
        try:
            loaded = torch.jit.optimize_for_inference(torch.jit.freeze(loaded))
        except Exception as exc:  # noqa: BLE001  (an export the optimiser cannot take is served as it is)
            log.warning("%s: served without TorchScript freezing/optimisation (%s)", path, exc)

    def run_torch(inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
        with torch.inference_mode():
            return [t.detach().cpu().numpy() for t in flatten_outputs(loaded(*inputs))]

    return run_torch


def _model_name(src: Mapping[str, Any]) -> str | None:
    path = src.get("path")
    if not path:
        return None
    from medens.registry.versioning import split_checkpoint_name

    try:
        return split_checkpoint_name(path)[0]
    except MedensError:
        return Path(str(path)).stem
