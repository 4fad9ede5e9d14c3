"""Checkpoints are data, never code: the one safe way to rebuild a module or network from a checkpoint.

A checkpoint's `hyperparameters` hold the resolved training config, including Hydra `_target_`s. Whoever
wrote the file chooses those strings, so passing them to `hydra.utils.instantiate` unchecked would let a
downloaded checkpoint run any Python callable. Every medens path that reads a checkpoint, a versioned
file or an export manifest (evaluate, export, ensemble, promote, resume, serve) goes through
`validate_safe_config` first; it walks the *whole* config and refuses, before anything is imported
beyond medens' own dependencies or instantiated:

- a `_target_` that is not on the allow-list. The check resolves the dotted name to the final object
  and compares *that* (so `medens.checkpoint.io.os.system` is refused although it starts with
  `medens.`), and only after the name itself passed a textual gate (an allowed package prefix such as
  `torch.optim.` or `monai.networks.`, identifier parts, no private `_part`), so resolving imports
  nothing outside those packages;
- Hydra's special keys used to smuggle a callable: `_partial_`/`_recursive_` that are not booleans,
  `_convert_` outside Hydra's modes, `_args_` that is not a list, any of them without a `_target_`, or
  any other `_key_`/`__key` spelling (nested `_target_`s inside `_args_`, lists or `_recursive_: false`
  subtrees are checked like any other node, because a module may instantiate them itself later);
- values that are not plain data (str, int, float, bool, None, list/tuple, dict with str/int keys), and
  strings holding an OmegaConf interpolation `${...}` (a resolver such as `oc.env` would run on them).

Errors are `UnsafeCheckpointError` (a `CheckpointError`) naming the file, the key path (for example
`hyperparameters.model.net._target_`) and the refused value.

The allow-list is an explicit set of builder functions plus families of classes (a family is a package
and a base class: torch optimizers and schedulers, `torch.nn`/MONAI networks and losses, MONAI inferers,
torchvision v2 transforms, Lightning callbacks/loggers/strategies/cluster environments/profilers, and
medens' own modules, datamodules and callbacks). `register_safe_target` adds a name from code (never from a file).

Public API (also for the serving layer): `validate_safe_config`, `validate_checkpoint`,
`safe_instantiate`, `rebuild_module`, `build_network_from_checkpoint`, `load_checkpoint_verified`,
`checkpoint_modality`, `data_modality`, `check_data_modality`.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from medens.errors import CheckpointError, ConfigError, UnsafeCheckpointError

#: Exact callables (functions) a config may name; classes are allowed by family below.
SAFE_FUNCTIONS: set[str] = {
    "medens.models.xray.build_resnet",
    *(f"monai.networks.nets.resnet{d}" for d in (10, 18, 34, 50, 101, 152, 200)),
    *(f"torchvision.models.resnet{d}" for d in (18, 34, 50, 101, 152)),
    "lightning.pytorch.Trainer",
}
#: Dotted prefixes a `_target_` may start with (checked on the text, before anything is imported).
SAFE_PREFIXES = ("medens.", "torch.optim.", "torch.nn.", "monai.networks.", "monai.losses.", "monai.inferers.",
                 "torchvision.transforms.v2.", "torchvision.models.", "lightning.pytorch.callbacks.",
                 "lightning.pytorch.loggers.", "lightning.pytorch.strategies.", "lightning.pytorch.profilers.",
                 "lightning.pytorch.plugins.environments.", "lightning.fabric.plugins.environments.")  # fmt: skip
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")
CONVERT_MODES = ("none", "partial", "object", "all")
_PART = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_extra_targets: set[str] = set()


def register_safe_target(name: str) -> None:
    """Allow one more callable by its dotted name (from code, for a lab's own network; never from a file)."""
    _extra_targets.add(str(name))


@functools.cache
def _families() -> list[tuple[str, tuple[type, ...]]]:
    """(module prefix the class must be defined under, base classes) pairs; imported lazily."""
    import lightning.pytorch as pl
    import torch
    from lightning.fabric.plugins.environments import ClusterEnvironment
    from lightning.pytorch.loggers import Logger
    from lightning.pytorch.profilers import Profiler
    from lightning.pytorch.strategies import Strategy
    from monai.inferers import Inferer

    from medens.data.reader import DatasetReader

    module, sched = torch.nn.Module, torch.optim.lr_scheduler.LRScheduler
    kinds = (pl.LightningModule, pl.LightningDataModule, module, pl.Callback, Logger, Strategy)
    fams: list[tuple[str, tuple[type, ...]]] = [
        ("torch.optim", (torch.optim.Optimizer, sched)),
        ("torch.nn", (module,)),
        ("monai.networks", (module,)),
        ("monai.losses", (module,)),
        ("monai.inferers", (Inferer,)),
        ("torchvision.transforms.v2", (module,)),
        ("torchvision.models", (module,)),
        ("lightning.pytorch.callbacks", (pl.Callback,)),
        ("lightning.pytorch.loggers", (Logger,)),
        ("lightning.pytorch.strategies", (Strategy,)),
        ("lightning.fabric.plugins.environments", (ClusterEnvironment,)),  # trainer=slurm / torchrun
        ("lightning.pytorch.profilers", (Profiler,)),
        ("medens", kinds),  # its LightningModules, datamodules, networks, callbacks, loggers, strategies
        ("medens.data", (DatasetReader,)),  # dataset readers (`data.source`): plain dataclasses, no code run
    ]
    return fams


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _resolve(name: str) -> Any:
    """The object a dotted name reaches: attributes first, importing a submodule only of a module."""
    import importlib

    parts = name.split(".")
    obj: Any = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=2):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif inspect.ismodule(obj):
            obj = importlib.import_module(".".join(parts[:i]))
        else:
            raise ImportError(f"{'.'.join(parts[: i - 1])} has no attribute {part!r}")
    return obj


def target_refusal(target: Any) -> str | None:
    """Why `target` may not be instantiated from a file (None: it is allowed). Never runs the target."""
    if not isinstance(target, str):
        return f"a _target_ must be a dotted name (str), got {type(target).__name__}"
    parts = target.split(".")
    if len(parts) < 2 or not all(_PART.match(p) for p in parts):
        return "not a plain dotted name of public parts (private names, dunders and odd spellings are refused)"
    named = target in SAFE_FUNCTIONS or target in _extra_targets
    if not named and not target.startswith(SAFE_PREFIXES):
        return "outside the packages medens builds from (medens, torch.optim, torch.nn, monai.networks, ...)"
    try:
        obj = _resolve(target)
    except Exception as exc:
        return f"cannot be resolved ({type(exc).__name__}: {exc})"
    if any(obj is _safe_object(n) for n in SAFE_FUNCTIONS | _extra_targets):
        return None
    if inspect.isclass(obj):
        mod = getattr(obj, "__module__", "") or ""
        for prefix, bases in _families():
            if _under(mod, prefix) and issubclass(obj, bases):
                return None
        return f"resolves to class {mod}.{obj.__qualname__}, which is not on medens' allow-list"
    where = getattr(obj, "__module__", None) or type(obj).__name__
    label = getattr(obj, "__qualname__", None) or repr(obj)[:60]
    return f"resolves to {where}.{label}, a callable that is not on medens' allow-list"


_SAFE_CACHE: dict[str, Any] = {}


def _safe_object(name: str) -> Any:
    if name not in _SAFE_CACHE:
        try:
            _SAFE_CACHE[name] = _resolve(name)
        except Exception:  # an optional builder that this install lacks matches nothing
            _SAFE_CACHE[name] = object()
    return _SAFE_CACHE[name]


def _plain(node: Any) -> Any:
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=False)
    return node


def _refuse(source: Any, key: str, value: Any, why: str) -> UnsafeCheckpointError:
    shown = repr(value)
    shown = shown if len(shown) <= 160 else shown[:157] + "..."
    return UnsafeCheckpointError(f"{source}: refused {key}={shown}: {why}. A checkpoint is data, never code")


def _walk(node: Any, key: str, source: Any) -> None:
    if node is None or isinstance(node, bool | int | float):
        return
    if isinstance(node, str):
        if "${" in node:
            raise _refuse(source, key, node, "an interpolation in a stored config (resolvers would run on it)")
        return
    if isinstance(node, list | tuple):
        for i, item in enumerate(node):
            _walk(item, f"{key}[{i}]", source)
        return
    if isinstance(node, Mapping):
        for k in node:
            if not isinstance(k, str | int) or isinstance(k, bool):
                raise _refuse(source, f"{key}.<key>", k, "a config key must be a str or int")
            ks = str(k)
            if ks.startswith("__") or (ks.startswith("_") and ks.endswith("_") and ks not in HYDRA_KEYS):
                raise _refuse(source, f"{key}.{ks}", node[k], "not a config key Hydra or medens knows")
        has_target = "_target_" in node
        for special in ("_partial_", "_recursive_", "_convert_", "_args_"):
            if special in node and not has_target:
                raise _refuse(source, f"{key}.{special}", node[special], "a Hydra key without a _target_")
        if has_target:
            why = target_refusal(node["_target_"])
            if why:
                raise _refuse(source, f"{key}._target_", node["_target_"], why)
            for flag in ("_partial_", "_recursive_"):
                if flag in node and not isinstance(node[flag], bool):
                    raise _refuse(source, f"{key}.{flag}", node[flag], "must be true or false")
            if "_convert_" in node and str(node["_convert_"]).lower() not in CONVERT_MODES:
                raise _refuse(source, f"{key}._convert_", node["_convert_"], f"must be one of {CONVERT_MODES}")
            if "_args_" in node and not isinstance(node["_args_"], list | tuple):
                raise _refuse(source, f"{key}._args_", node["_args_"], "must be a list")
        for k, v in node.items():
            if k != "_target_":
                _walk(v, f"{key}.{k}" if key else str(k), source)
        return
    raise _refuse(source, key, f"<{type(node).__module__}.{type(node).__qualname__}>",
                  "not a plain value (str, int, float, bool, None, list, dict)")  # fmt: skip


def validate_safe_config(cfg: Any, source: str | os.PathLike = "<config>", key: str = "hyperparameters") -> None:
    """Refuse (`UnsafeCheckpointError`) a config read from a file that could make `instantiate` run code.

    `cfg` is a dict/list (or OmegaConf container) as read from a checkpoint, a versioned file's metadata
    or an export manifest; `source` names that file and `key` the path of `cfg` inside it, so the error
    reads e.g. `model.pth: refused hyperparameters.model.net._target_='os.system': ...`. Nothing is
    instantiated; the only imports are of the allowed packages' own modules, to resolve the names.
    """
    _walk(_plain(cfg), key, source)


def safe_instantiate(cfg: Any, source: str | os.PathLike = "<config>", key: str = "hyperparameters",
                     **kwargs: Any) -> Any:  # fmt: skip
    """`hydra.utils.instantiate` of a config that came from a file, after `validate_safe_config`."""
    import hydra.utils

    validate_safe_config(cfg, source, key)
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(_plain(cfg))
    return hydra.utils.instantiate(node, **kwargs)


def checkpoint_modality(hyper: Mapping[str, Any]) -> str | None:
    """The modality a checkpoint was trained for (`hyperparameters.modality` or its io_contract's)."""
    return hyper.get("modality") or (hyper.get("io_contract") or {}).get("modality")


def validate_checkpoint(ckpt: Mapping[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's `hyperparameters` after `validate_safe_config` over all of them."""
    hyper = ckpt.get("hyperparameters")
    if hyper is None:
        return {}
    if not isinstance(hyper, Mapping):
        raise _refuse(path, "hyperparameters", f"<{type(hyper).__name__}>", "must be a plain dict")
    validate_safe_config(hyper, path, "hyperparameters")
    return dict(hyper)


def _check_modality(hyper: Mapping[str, Any], path: Any, modality: str | None, role: str = "model") -> None:
    found = checkpoint_modality(hyper)
    if modality and found and found != modality:
        net = ((hyper.get("model") or {}).get("net") or {}).get("_target_")
        raise CheckpointError(f"{path}: a {found!r} checkpoint was given as the {modality!r} {role} (network "
                              f"{net}); give a {modality} checkpoint")  # fmt: skip


def _no_external_weights(net_cfg: DictConfig) -> None:
    """The weights come from the checkpoint, never from a path or weights name the file names."""
    for k in ("pretrained_path", "weights", "pretrained"):
        if k in net_cfg and net_cfg[k] not in (None, False):
            net_cfg[k] = False if k == "pretrained" else None


def _instantiate_stored(
    ckpt: Mapping[str, Any], label: Any, modality: str | None, net_only: bool
) -> tuple[Any, dict[str, Any]]:
    """(the object built from `hyperparameters.model` or, `net_only`, `hyperparameters.model.net`, the
    validated hyperparameters): the one walk shared by `rebuild_module` and `build_network_from_checkpoint`.
    Validated first; a checkpoint of another `modality` is a `CheckpointError`; weights named by the file
    (pretrained paths, weight names) are never fetched."""
    from omegaconf import open_dict

    hyper = validate_checkpoint(ckpt, label)
    model = hyper.get("model")
    node = (model or {}).get("net") if net_only and isinstance(model, Mapping) else model
    if not isinstance(node, Mapping) or "_target_" not in node:
        if net_only:
            raise CheckpointError(f"{label}: no network config (hyperparameters.model.net with _target_) in checkpoint")
        raise CheckpointError(f"{label}: checkpoint has no model config (hyperparameters.model with _target_)")
    _check_modality(hyper, label, modality)
    cfg = OmegaConf.create(dict(node))
    net_cfg = cfg if net_only else cfg.get("net")
    if isinstance(net_cfg, DictConfig):
        with open_dict(net_cfg):
            _no_external_weights(net_cfg)
    key, what = ("hyperparameters.model.net", "the network ") if net_only else ("hyperparameters.model", "")
    try:
        built = safe_instantiate(cfg, label, key)
    except UnsafeCheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{label}: cannot rebuild {what}{node['_target_']}: {exc}") from exc
    return built, hyper


def rebuild_module(ckpt: Mapping[str, Any], path: str | os.PathLike, modality: str | None = None,
                   strict: bool = True) -> Any:  # fmt: skip
    """The LightningModule of a checkpoint (`hyperparameters.model`), with its weights loaded.

    The one "rebuild the module of modality X from this checkpoint" used by evaluation and the ensemble:
    validated first, a checkpoint of another `modality` is a `CheckpointError`; `io_contract` is attached.
    """
    from medens.checkpoint.io import load_network_weights

    module, hyper = _instantiate_stored(ckpt, path, modality, net_only=False)
    load_network_weights(module.net, dict(ckpt), strict=strict)
    module.io_contract = hyper.get("io_contract", {})
    return module


def build_network_from_checkpoint(source: str | os.PathLike | Mapping[str, Any], modality: str | None = None,
                                  path: str | os.PathLike | None = None, strict: bool = True) -> Any:  # fmt: skip
    """The bare network of a checkpoint (`hyperparameters.model.net`) with its weights, in eval mode.

    The one "load the network of modality X" used by the exports. `source` is a checkpoint file (read with
    `load_checkpoint_verified`) or an already loaded dict (then `path` names it in errors). Validated first;
    a checkpoint of another `modality` is a `CheckpointError`.
    """
    from medens.checkpoint.io import load_network_weights

    if isinstance(source, Mapping):
        ckpt, label = dict(source), path or "<checkpoint>"
    else:
        ckpt, label = load_checkpoint_verified(source), source
    net, _ = _instantiate_stored(ckpt, label, modality, net_only=True)
    try:
        load_network_weights(net, ckpt, strict=strict)
    except CheckpointError as exc:
        raise CheckpointError(f"{label}: {str(exc).removeprefix('<state dict>: ')}") from exc
    return net.eval()


def load_checkpoint_verified(path: str | os.PathLike, map_location: Any = "cpu", modality: str | None = None,
                             role: str = "model") -> dict[str, Any]:  # fmt: skip
    """The one load of a checkpoint that something is built from (resume, evaluation, the ensemble, the
    exports): a versioned file (`<name>_v<semver>...`) only after its SHA-256 matched the one its metadata
    recorded at promotion (`RegistryError` naming the file otherwise); its config validated (checkpoints are
    data, never code); one trained for another `modality` than the `role` it is given for refused."""
    from medens.checkpoint.io import load_checkpoint
    from medens.registry.versioning import load_versioned, split_checkpoint_name

    if split_checkpoint_name(path)[2] is not None:
        ckpt = load_versioned(path, map_location=map_location)  # SHA-256 first, then validate_checkpoint
    else:
        ckpt = load_checkpoint(path, map_location=map_location)
        validate_checkpoint(ckpt, path)
    _check_modality(ckpt.get("hyperparameters") or {}, path, modality, role)
    return ckpt


#: datamodule class name -> modality of the networks it feeds (a class attribute `modality` wins).
DATAMODULE_MODALITY = {"XRayDataModule": "xray", "MedMNISTDataModule": "xray", "CTDataModule": "ct",
                       "BraTSDataModule": "mri", "EnsembleDataModule": "ensemble"}  # fmt: skip


def data_modality(data_cfg: Any) -> str | None:
    """The modality of a `data` config group, from its datamodule `_target_` (None when unknown)."""
    target = _plain(data_cfg).get("_target_") if isinstance(_plain(data_cfg), Mapping) else None
    if not isinstance(target, str):
        return None
    try:
        obj = _resolve(target)
    except Exception:
        obj = None
    found = getattr(obj, "modality", None)
    if isinstance(found, str):
        return found
    return DATAMODULE_MODALITY.get(getattr(obj, "__name__", target.rpartition(".")[2]))


def check_data_modality(hyper: Mapping[str, Any], data_cfg: Any, path: str | os.PathLike) -> None:
    """Refuse (`ConfigError`, before any data is read) a `data=` group of another modality than the model's."""
    model, data = checkpoint_modality(hyper), data_modality(data_cfg) if data_cfg is not None else None
    if model and data and model != data:
        target = _plain(data_cfg).get("_target_")
        raise ConfigError(
            f"{path}: this is a {model!r} checkpoint, but the data group is {data!r} (data._target_={target}); "
            f"evaluate a {model} checkpoint with a {model} data group (or none: its own training data)"
        )


__all__ = ["SAFE_FUNCTIONS", "build_network_from_checkpoint", "check_data_modality", "checkpoint_modality",
           "data_modality", "load_checkpoint_verified", "rebuild_module", "register_safe_target",
           "safe_instantiate", "target_refusal", "validate_checkpoint", "validate_safe_config"]  # fmt: skip
