"""Inference endpoint over medens exports (SageMaker container contract: GET /ping, POST /invocations).

Only exports and the pure preprocessing functions of `medens.data` are used on the request path: no
training code, no Lightning, no `hydra.utils.instantiate`. See `medens.serving.app`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def rename_cli_key(argv: Sequence[str], key: str, to: str) -> list[str]:
    """`key=value` -> `to=value` in a Hydra command line.

    `model=...` cannot be a plain key of a medens Hydra app, because `conf/model/` is a config group (the
    training networks); the serving and store commands take `model=` as users expect and rename it here.
    """
    prefix = f"{key}="
    return [f"{to}={a[len(prefix) :]}" if a.startswith(prefix) else a for a in argv]


def main_argv(key: str = "model", to: str = "model_ref") -> None:
    """Rewrite `sys.argv` in place (see `rename_cli_key`); call before `@hydra.main` parses it."""
    sys.argv[:] = rename_cli_key(sys.argv, key, to)
