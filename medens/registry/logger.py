"""Lightning's MLFlowLogger with medens' defaults for where artifacts go."""

from __future__ import annotations

import os
from typing import Any, Literal

from lightning.pytorch.loggers import MLFlowLogger

from medens.errors import ConfigError
from medens.registry.tracking import default_artifact_location, prepare_local_store


class MedensMLFlowLogger(MLFlowLogger):
    """`MLFlowLogger` whose artifacts stay beside a local store instead of `./mlruns` in the working folder.

    `artifact_location=None` means: `<store folder>/mlartifacts/<experiment>` for a local (SQLite or file)
    store, the server's own artifact root for an http(s) tracking URI. It only applies when the
    experiment is created; an existing experiment keeps its location.
    """

    def __init__(
        self,
        experiment_name: str = "medens",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        log_model: Literal[True, False, "all"] = False,
        prefix: str = "",
        artifact_location: str | None = None,
        run_id: str | None = None,
        synchronous: bool | None = None,
    ) -> None:
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not tracking_uri:
            raise ConfigError("logger.mlflow.tracking_uri is empty and MLFLOW_TRACKING_URI is unset")
        prepare_local_store(tracking_uri)
        if artifact_location is None:
            artifact_location = default_artifact_location(tracking_uri, experiment_name)
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=tracking_uri,
            tags=dict(tags) if tags else None,
            log_model=log_model,
            prefix=prefix,
            artifact_location=artifact_location,
            run_id=run_id,
            synchronous=synchronous,
        )
