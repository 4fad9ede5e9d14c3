"""MLflow tracking-store helpers and the Model Registry side of a promotion.

mlflow is an optional extra: it is imported inside the functions that need it, so `medens` imports
without it. Local stores (SQLite, the default) keep their artifacts in a folder beside the database,
never in `./mlruns` of whatever folder the command ran in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from medens.errors import RegistryError
from medens.utils.hashing import sha256_json

log = logging.getLogger(__name__)

#: MLflow accepts long tag values, older servers 5000 characters; longer values are cut (full JSON is an artifact).
MAX_TAG_VALUE = 5000
TAG_PREFIX = "medens."
_REMOTE_SCHEMES = {"http", "https", "databricks", "databricks-uc", "uc"}


def is_remote_uri(uri: str | None) -> bool:
    """True for a tracking server URI (http(s), Databricks), False for a local store."""
    return bool(uri) and urlparse(str(uri)).scheme.lower() in _REMOTE_SCHEMES


def local_store_dir(uri: str | None) -> Path | None:
    """The folder of a local tracking store: the SQLite file's folder, or a file store's root; else None."""
    if not uri:
        return None
    uri = str(uri)
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///") :].split("?", 1)[0]
        return Path(db).resolve().parent if db and db != ":memory:" else None
    scheme = urlparse(uri).scheme.lower()
    if scheme == "file":
        return Path(urlparse(uri).path).resolve()
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        return Path(uri).resolve()
    return None


def default_artifact_location(tracking_uri: str | None, experiment_name: str) -> str | None:
    """Where a new experiment stores artifacts when config leaves `artifact_location` null.

    Local store: `<store folder>/mlartifacts/<experiment>` (so with the default SQLite store, under
    outputs/). Server: None, i.e. the server's own artifact root.
    """
    root = local_store_dir(tracking_uri)
    if root is None:
        if tracking_uri and not is_remote_uri(tracking_uri):
            log.warning("no default artifact location for %s; set artifact_location explicitly", tracking_uri)
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment_name).strip("._") or "default"
    return str(root / "mlartifacts" / safe)


def prepare_local_store(tracking_uri: str | None) -> None:
    """Create the folder a SQLite store lives in (SQLite creates the file, not its folder)."""
    if tracking_uri and str(tracking_uri).startswith("sqlite:///"):
        folder = local_store_dir(tracking_uri)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def http_settings(timeout_s: float | None, max_retries: int | None, force: bool = False) -> Iterator[None]:
    """Bound MLflow's HTTP timeout and retries (its defaults wait minutes on a dead server).

    Values the user already set in the environment win unless `force` (used for the reachability check).
    """
    wanted = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": None if timeout_s is None else str(max(1, int(timeout_s))),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": None if max_retries is None else str(int(max_retries)),
    }
    saved = {k: os.environ.get(k) for k in wanted}
    try:
        for key, value in wanted.items():
            if value is not None and (force or key not in os.environ):
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _tag_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= MAX_TAG_VALUE else text[: MAX_TAG_VALUE - 15] + " ...[truncated]"


def metadata_tags(metadata: dict[str, Any]) -> dict[str, str]:
    """Model-version tags from version metadata: flat `medens.<key>` strings.

    The hyperparameters become a digest (`medens.hyperparameters_sha256`); the full document is logged
    as a run artifact beside the checkpoint.
    """
    tags: dict[str, str] = {}
    for key, value in metadata.items():
        if key in ("hyperparameters", "registry", "format") or value is None:
            continue
        if key == "performance" and isinstance(value, dict):
            for pk, pv in value.items():
                if isinstance(pv, dict):
                    for sk, sv in pv.items():
                        if sv is not None and not isinstance(sv, dict):
                            tags[f"{TAG_PREFIX}performance.{pk}.{sk}"] = _tag_value(sv)
                elif pv is not None:
                    tags[f"{TAG_PREFIX}performance.{pk}"] = _tag_value(pv)
            continue
        tags[TAG_PREFIX + key] = _tag_value(value)
    tags[f"{TAG_PREFIX}hyperparameters_sha256"] = sha256_json(metadata.get("hyperparameters") or {})
    return tags


def _numeric_metrics(performance: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in performance.items():
        if isinstance(value, dict):
            for sk, sv in value.items():
                if isinstance(sv, (int, float)) and not isinstance(sv, bool):
                    out[f"{key}/{sk}"] = float(sv)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
            out[key] = float(value)
    return out


def _not_found(exc: BaseException) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


@dataclass
class MlflowRegistry:
    """Registers promoted checkpoints in the MLflow Model Registry.

    Each promotion is one run (in `experiment_name`) holding the versioned checkpoint and its metadata
    JSON as artifacts, and one model version of the registered model `model_name` (a template over
    `modality` and `model_name`) whose source is that artifact folder and whose `medens.*` tags carry the
    metadata. MLflow numbers versions 1, 2, ...; the medens semver is the `medens.version` tag.
    """

    tracking_uri: str
    registry_uri: str | None = None
    experiment_name: str = "medens-registry"
    model_name: str = "medens-{modality}-{model_name}"
    artifact_location: str | None = None
    timeout_s: float = 10.0
    max_retries: int = 2

    def registered_name(self, metadata: dict[str, Any]) -> str:
        """The registered model's name for this metadata, e.g. `medens-xray-resnet50`."""
        try:
            return self.model_name.format(
                modality=metadata.get("modality"), model_name=metadata["model_name"]
            )
        except (KeyError, IndexError, ValueError) as exc:
            raise RegistryError(
                f"registry.model_name {self.model_name!r}: only {{modality}} and {{model_name}} may be used ({exc})"
            ) from exc

    def _client(self) -> Any:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise RegistryError(
                "the MLflow registry needs mlflow (pip install 'medens[mlflow]'), or pass registry.enabled=false"
            ) from exc
        prepare_local_store(self.tracking_uri)
        return MlflowClient(
            tracking_uri=self.tracking_uri, registry_uri=self.registry_uri or self.tracking_uri
        )

    def check(self, metadata: dict[str, Any]) -> None:
        """Fail fast, before any file is written: the store answers, and this medens version is not registered."""
        name = self.registered_name(metadata)
        with http_settings(min(self.timeout_s, 5), 0, force=True):
            client = self._client()
            try:
                client.search_experiments(max_results=1)
                versions = client.search_model_versions(f"name = '{name}'")
            except Exception as exc:
                if _not_found(exc):
                    versions = []
                else:
                    where = "tracking server" if is_remote_uri(self.tracking_uri) else "tracking store"
                    raise RegistryError(
                        f"MLflow {where} {self.tracking_uri} is unreachable or unusable "
                        f"({type(exc).__name__}: {_short(exc)}). Start it, pass registry.tracking_uri=<URI>, "
                        "or promote without registering: registry.enabled=false"
                    ) from exc
        for mv in versions:
            if (mv.tags or {}).get(f"{TAG_PREFIX}version") == metadata["version"]:
                raise RegistryError(
                    f"{name} already has medens version {metadata['version']} (MLflow version {mv.version}) "
                    f"in {self.tracking_uri}; versions are never overwritten"
                )

    def register(self, path: Path, metadata: dict[str, Any]) -> dict[str, Any]:
        """Log the versioned file and its metadata to a new run and create the model version.

        On failure everything created here is removed again (run deleted, model version and a newly
        created registered model dropped) and `RegistryError` names the store.
        """
        name = self.registered_name(metadata)
        created: dict[str, Any] = {"registered_model": name}
        with http_settings(self.timeout_s, self.max_retries):
            client = self._client()
            try:
                exp = client.get_experiment_by_name(self.experiment_name)
                if exp is not None and exp.lifecycle_stage != "deleted":
                    exp_id = exp.experiment_id
                else:
                    location = self.artifact_location or default_artifact_location(
                        self.tracking_uri, self.experiment_name
                    )
                    exp_id = client.create_experiment(self.experiment_name, artifact_location=location)
                run = client.create_run(
                    exp_id,
                    run_name=f"promote {name} {metadata['version']}",
                    tags={
                        f"{TAG_PREFIX}version": metadata["version"],
                        f"{TAG_PREFIX}sha256": str(metadata["sha256"]),
                        f"{TAG_PREFIX}model_name": str(metadata["model_name"]),
                    },
                )
                run_id = run.info.run_id
                created["run_id"] = run_id
                client.log_artifact(run_id, str(path), artifact_path="checkpoint")
                with tempfile.TemporaryDirectory(prefix="medens-registry-") as tmp:
                    meta_file = Path(tmp) / Path(path).with_suffix(".json").name
                    meta_file.write_text(json.dumps(metadata, indent=2, default=str))
                    client.log_artifact(run_id, str(meta_file), artifact_path="checkpoint")
                from mlflow.entities import Metric

                now_ms = int(time.time() * 1000)
                perf = _numeric_metrics(metadata.get("performance") or {})
                if perf:
                    client.log_batch(run_id, metrics=[Metric(k, v, now_ms, 0) for k, v in perf.items()])
                try:
                    client.get_registered_model(name)
                except Exception as exc:
                    if not _not_found(exc):
                        raise
                    client.create_registered_model(
                        name,
                        tags={
                            f"{TAG_PREFIX}modality": str(metadata.get("modality")),
                            f"{TAG_PREFIX}model_name": str(metadata["model_name"]),
                        },
                        description=f"medens {metadata.get('modality')} model {metadata['model_name']}",
                    )
                    created["created_registered_model"] = True
                source = f"{run.info.artifact_uri.rstrip('/')}/checkpoint"
                # tags at creation: a version is never visible without its medens.version / sha256 tags
                mv = client.create_model_version(
                    name,
                    source=source,
                    run_id=run_id,
                    tags=metadata_tags(metadata),
                    description=metadata.get("notes") or None,
                )
                created["model_version"] = str(mv.version)
                client.set_terminated(run_id, "FINISHED")
            except Exception as exc:
                self._undo(client, created)
                if isinstance(exc, RegistryError):
                    raise
                raise RegistryError(
                    f"registering {path.name} as {name} in MLflow {self.tracking_uri} failed "
                    f"({type(exc).__name__}: {_short(exc)}); nothing was kept"
                ) from exc
        self._created = created
        return {
            "tracking_uri": self.tracking_uri,
            "registered_model": name,
            "model_version": created["model_version"],
            "run_id": created["run_id"],
            "source": source,
        }

    def rollback(self, info: dict[str, Any]) -> None:
        """Remove a registration made by `register` (used when the local metadata cannot be written)."""
        created = dict(info)
        last = getattr(self, "_created", {})
        if last.get("run_id") == info.get("run_id"):
            created.update(last)
        with http_settings(self.timeout_s, self.max_retries):
            self._undo(self._client(), created)

    @staticmethod
    def _undo(client: Any, created: dict[str, Any]) -> None:
        name = created.get("registered_model")
        steps = []
        if created.get("model_version"):
            steps.append(lambda: client.delete_model_version(name, created["model_version"]))
        if created.get("created_registered_model"):
            steps.append(lambda: client.delete_registered_model(name))
        if created.get("run_id"):
            steps.append(lambda: client.set_terminated(created["run_id"], "FAILED"))
            steps.append(lambda: client.delete_run(created["run_id"]))
        for step in steps:
            try:
                step()
            except Exception as exc:  # best effort: the store may be the thing that failed
                log.warning("MLflow clean-up step failed: %s", _short(exc))
