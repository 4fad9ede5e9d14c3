"""The one thing every dataset reader shares: a marker base class.

A reader knows one public dataset's on-disk layout (nnU-Net's ``dataset_conversion``: one small piece
per format) and nothing about caches, splits or loaders; a datamodule takes it from config as
``data.source`` (a Hydra ``_target_``). Subclassing :class:`DatasetReader` is what lets a checkpoint
name a reader class in its recorded config (``medens.checkpoint.safe_build`` allows the classes under
``medens.data`` that derive from it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass
from typing import Any, TypeVar

R = TypeVar("R", bound="DatasetReader")


class DatasetReader:
    """Base of every dataset reader; ``config()`` is the plain ``_target_`` dict that rebuilds it."""

    name: str = ""

    def config(self) -> dict[str, Any]:
        """``{"_target_": <class path>, <init args>}`` with plain values: what a checkpoint records."""
        cls = type(self)
        args = {f.name: getattr(self, f.name) for f in fields(self) if f.init} if is_dataclass(self) else {}
        return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **args}


def plain_config(x: Any) -> Any:
    """OmegaConf containers (or any mapping/sequence) -> plain dict/list, so Hydra configs work as-is."""
    if hasattr(x, "_metadata") and hasattr(x, "keys"):  # an OmegaConf DictConfig: resolve interpolations first
        from omegaconf import OmegaConf

        x = OmegaConf.to_container(x, resolve=True)
    if isinstance(x, Mapping):
        return {k if isinstance(k, int) else str(k): plain_config(v) for k, v in x.items()}
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        return [plain_config(v) for v in x]
    return x


def reader_class(target: Any, base: type[R]) -> type[R] | None:
    """The class a ``_target_`` names when it is a subclass of ``base``, else None (the caller reports it)."""
    try:
        import hydra.utils

        cls = hydra.utils.get_class(str(target))
    except Exception:  # unresolvable name: reported by the caller
        return None
    return cls if isinstance(cls, type) and issubclass(cls, base) else None


def build_reader_of(source: Any, base: type[R], readers: Mapping[str, type[R]], kind: str) -> R:
    """A ``base`` reader from a reader, a short name of ``readers``, or a ``{_target_: ..., ...}`` config (as a
    checkpoint records it; a checkpoint's config is checked by ``medens.checkpoint.safe_build`` before this).
    ``kind`` names the modality in errors ("CT", "BraTS", "X-ray")."""
    from medens.errors import ConfigError

    if isinstance(source, base):
        return source
    if isinstance(source, str):
        if source not in readers:
            raise ConfigError(f"data.source={source!r}: not a{'n' if kind[0] in 'AEIOUX' else ''} {kind} reader; "
                              f"short names are {sorted(readers)} (or give a {{_target_: ...}} reader config)")  # fmt: skip
        return readers[source]()
    if isinstance(source, Mapping) or hasattr(source, "keys"):
        cfg = plain_config(source)
        target = cfg.pop("_target_", None)
        cls = reader_class(target, base)
        if cls is None:
            raise ConfigError(f"data.source._target_={target!r}: not a{'n' if kind[0] in 'AEIOUX' else ''} {kind} "
                              f"reader class (subclass of {base.__module__}.{base.__qualname__}); "
                              f"known: {sorted(readers)}")  # fmt: skip
        try:
            return cls(**cfg)
        except TypeError as exc:
            raise ConfigError(f"data.source ({target}): {exc}") from exc
    raise ConfigError(f"data.source must be a reader, a short name or a _target_ config, got {source!r}")


def upgrade_legacy_data_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """A recorded data config (a checkpoint's ``hyperparameters.data``, a run folder's) in today's reader form:
    the flat keys that older CT and X-ray configs held beside the datamodule's move under ``data.source``.
    A config already in the reader form, or of another datamodule, comes back as a plain dict, unchanged."""
    from medens.data.ct.readers import upgrade_legacy_config as upgrade_ct
    from medens.data.xray_readers import upgrade_legacy_config as upgrade_xray

    return upgrade_xray(upgrade_ct(data))
