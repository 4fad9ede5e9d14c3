"""Config values checked by type and range before any work starts (used by `medens.training.validation`).

Two sources of truth, so that the rules stay generic rather than a list of every key:

1. the type annotations of the `_target_` a key is passed to (`Trainer.max_epochs: Optional[int]`,
   `Trainer.precision: Literal[...]`, `XRayDataModule.batch_size: int`, ...), read from its signature;
2. a small table of range rules for common keys, by full path (`trainer.devices`) or by key name
   anywhere (`batch_size`, `*_fraction`, `lr`, ...), which also fixes the type where no annotation says.

A rule, where one exists, decides; otherwise the annotation does; a value neither can judge passes.
Errors are `ConfigError` naming the key, the value and what is allowed, e.g.
`trainer.max_epochs='abc': expected an integer >= -1 (Trainer.max_epochs)`.
"""

from __future__ import annotations

import collections.abc as cabc
import fnmatch
import inspect
import itertools
import os
import pathlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from medens.errors import ConfigError


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_list(v: Any) -> bool:
    return isinstance(v, list | tuple | ListConfig)


@dataclass(frozen=True)
class Rule:
    """A predicate over one value and the words that say what it allows."""

    check: Callable[[Any], bool]
    text: str
    none: bool = False  # null allowed

    def ok(self, value: Any) -> bool:
        return (self.none and value is None) or (value is not None and self.check(value))

    def describe(self) -> str:
        return self.text + (" (or null)" if self.none else "")


def _bounds(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> tuple[Callable[[Any], bool], str]:
    def inside(v: Any) -> bool:
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return not (hi is not None and (v >= hi if hi_open else v > hi))

    def fmt(v: float) -> str:
        return str(v) if isinstance(v, int) else f"{v:g}"

    if lo is not None and hi is not None:
        text = f"in {'(' if lo_open else '['}{fmt(lo)}, {fmt(hi)}{')' if hi_open else ']'}"
    elif lo is not None:
        text = f"{'>' if lo_open else '>='} {fmt(lo)}"
    elif hi is not None:
        text = f"{'<' if hi_open else '<='} {fmt(hi)}"
    else:
        text = ""
    return inside, text


def int_rule(lo: int | None = None, hi: int | None = None, none: bool = False) -> Rule:
    inside, text = _bounds(lo, hi, False, False)
    return Rule(lambda v: _is_int(v) and inside(v), f"an integer {text}".strip(), none)


def num_rule(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
             none: bool = False) -> Rule:  # fmt: skip
    inside, text = _bounds(lo, hi, lo_open, hi_open)
    return Rule(lambda v: _is_num(v) and inside(v), f"a number {text}".strip(), none)


def each(rule: Rule, scalar_too: bool = True) -> Rule:
    """A list (non-empty) whose every item passes `rule`, or (scalar_too) one such value."""

    def check(v: Any) -> bool:
        if _is_list(v):
            return len(v) > 0 and all(rule.ok(x) for x in v)
        return scalar_too and rule.ok(v)

    return Rule(check, f"{rule.text} or a list of them" if scalar_too else f"a list of {rule.text}", rule.none)


def choice(values: Any, none: bool = False) -> Rule:
    vals = list(values)
    return Rule(lambda v: v in vals, f"one of {vals}", none)


def _count_or_fraction(v: Any) -> bool:
    return (_is_int(v) and v >= 0) or (isinstance(v, float) and 0.0 <= v <= 1.0)


def _devices(v: Any) -> bool:
    if _is_int(v):
        return v >= 1 or v == -1
    if isinstance(v, str):
        s = v.strip()
        if s in ("auto", "-1"):
            return True
        parts = [p for p in s.split(",") if p.strip()]
        if "," in s:
            return bool(parts) and all(p.strip().isdigit() for p in parts)
        return s.isdigit() and int(s) >= 1
    if _is_list(v):
        return len(v) > 0 and all(_is_int(x) and x >= 0 for x in v)
    return False


def _accelerators() -> list[str]:
    try:
        from lightning.pytorch.accelerators import AcceleratorRegistry

        names = set(AcceleratorRegistry.available_accelerators())
    except Exception:  # an old Lightning: the names it has always had
        names = {"cpu", "cuda", "mps", "tpu"}
    return sorted(names | {"auto", "gpu"})


def _accelerator(v: Any) -> bool:
    return isinstance(v, str) and v.lower() in _accelerators()


FRACTION = num_rule(0.0, 1.0)
#: Rules by the full dotted path of a key in the composed config.
PATH_RULES: dict[str, Rule] = {
    "trainer.max_epochs": int_rule(lo=-1, none=True),
    "trainer.min_epochs": int_rule(lo=0, none=True),
    "trainer.max_steps": int_rule(lo=-1),
    "trainer.min_steps": int_rule(lo=0, none=True),
    "trainer.devices": Rule(_devices, "an integer >= 1, -1 (all), 'auto', a list of device indices, or '0,1,...'"),
    "trainer.num_nodes": int_rule(lo=1),
    "trainer.accelerator": Rule(_accelerator, f"one of {_accelerators()}"),
    "trainer.check_val_every_n_epoch": int_rule(lo=1, none=True),
    "trainer.log_every_n_steps": int_rule(lo=0, none=True),
    "trainer.accumulate_grad_batches": int_rule(lo=1),
    "trainer.gradient_clip_val": num_rule(lo=0, none=True),
    "trainer.num_sanity_val_steps": int_rule(lo=-1, none=True),
    "trainer.val_check_interval": Rule(lambda v: _count_or_fraction(v) and v != 0,
                                       "an integer >= 1 (batches) or a fraction in (0, 1]", none=True),
    "seed": int_rule(0, 2**32 - 1, none=True),
}
for _k in ("train", "val", "test", "predict"):
    PATH_RULES[f"trainer.limit_{_k}_batches"] = Rule(
        _count_or_fraction, "an integer >= 0 (batches) or a fraction in [0, 1]", none=True
    )
PATH_RULES["trainer.overfit_batches"] = Rule(_count_or_fraction, "an integer >= 0 (batches) or a fraction in [0, 1]")

#: Rules by key name (fnmatch pattern), wherever the key sits; first match wins.
NAME_RULES: list[tuple[str, Rule]] = [
    ("batch_size", int_rule(lo=1)),
    ("*_batch_size", int_rule(lo=1, none=True)),
    ("batch_sizes", each(int_rule(lo=1), scalar_too=False)),
    ("example_batch", int_rule(lo=1)),
    ("num_workers", int_rule(lo=0)),
    ("*_fraction", FRACTION),
    ("fraction", FRACTION),
    ("prob", FRACTION),
    ("*_prob", FRACTION),
    ("modality_dropout", num_rule(0.0, 1.0, hi_open=True, none=True)),
    ("dropout", num_rule(0.0, 1.0, hi_open=True, none=True)),
    ("overlap", num_rule(0.0, 1.0, hi_open=True)),
    ("threshold", FRACTION),
    ("target_sensitivity", num_rule(0.0, 1.0, lo_open=True)),
    ("lr", num_rule(lo=0, lo_open=True)),
    ("weight_decay", num_rule(lo=0)),
    ("momentum", FRACTION),
    ("eps", num_rule(lo=0)),
    ("atol", num_rule(lo=0)),
    ("rtol", num_rule(lo=0)),
    ("opset", int_rule(lo=7)),
    ("image_size", int_rule(lo=1)),
    ("patch_size", each(int_rule(lo=1))),
    ("spacing_mm", each(num_rule(lo=0, lo_open=True))),
    ("max_epochs", int_rule(lo=-1, none=True)),
    ("patience", int_rule(lo=0)),
    ("save_top_k", int_rule(lo=-1)),
    ("every_n_epochs", int_rule(lo=0, none=True)),
    ("num_classes", int_rule(lo=1)),
    ("out_channels", int_rule(lo=1)),
    ("n_input_channels", int_rule(lo=1)),
    ("samples_per_volume", int_rule(lo=1)),
    ("n_patients", int_rule(lo=1)),
    ("n_cases", int_rule(lo=1)),
    ("images_per_patient", int_rule(lo=1)),
    ("nodules_per_patient", int_rule(lo=1)),
    ("n_folds", int_rule(lo=2, none=True)),
    ("fold", int_rule(lo=0)),
    ("max_pos_weight", num_rule(lo=0, lo_open=True)),
    ("seed", int_rule(0, 2**32 - 1, none=True)),  # null: the caller picks (evaluate: the checkpoint's)
    ("timeout_s", num_rule(lo=0, lo_open=True, none=True)),
    ("max_retries", int_rule(lo=0)),
]
#: Subtrees not checked by the rule table (Hydra's own node, folder paths, free-form notes).
SKIP_ROOTS = ("hydra", "paths", "notes", "tags", "extras")


def rule_for(path: str) -> Rule | None:
    """The table rule for a dotted key path, if any."""
    if path in PATH_RULES:
        return PATH_RULES[path]
    if path.split(".")[0].split("[")[0] in SKIP_ROOTS:
        return None
    name = path.rsplit(".", 1)[-1]
    if "[" in name:
        return None
    for pattern, rule in NAME_RULES:
        if fnmatch.fnmatchcase(name, pattern):
            return rule
    return None


# -- annotations ----------------------------------------------------------------------------------
_UNKNOWN = None


def _ann_match(value: Any, ann: Any) -> bool | None:
    """True/False where the annotation decides; None where it cannot say (a class the config builds...)."""
    if ann is inspect.Parameter.empty or ann is Any or ann is object:
        return True
    if isinstance(value, DictConfig) and "_target_" in value:
        return True  # an object built from config; its own node is checked on its own
    if ann is type(None) or ann is None:
        return value is None
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin is typing.Union or origin is types.UnionType:
        results = [_ann_match(value, a) for a in args]
        return True if any(r is True for r in results) else (None if any(r is None for r in results) else False)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) or (_is_num(value) and _is_num(a) and value == a)
                   for a in args)  # fmt: skip
    if ann is int:
        return _is_int(value)
    if ann is float:
        return _is_num(value)
    if ann is bool:
        return isinstance(value, bool)
    if ann is str:
        return isinstance(value, str)
    if ann in (pathlib.Path, os.PathLike) or origin is os.PathLike:
        return isinstance(value, str | os.PathLike)
    base = origin or ann
    if base in (list, tuple, set, cabc.Sequence, cabc.Iterable, cabc.Collection, cabc.MutableSequence):
        if not _is_list(value):
            return False
        if args and len(args) == 1 or (base is tuple and len(args) == 2 and args[1] is Ellipsis):
            results = [_ann_match(v, args[0]) for v in value]
            return False if any(r is False for r in results) else True
        return True
    if base in (dict, cabc.Mapping, cabc.MutableMapping):
        return isinstance(value, dict | DictConfig)
    if inspect.isclass(base) and not isinstance(value, DictConfig | ListConfig) and isinstance(value, base):
        return True
    return _UNKNOWN


def describe_annotation(ann: Any) -> str:
    """Words for an annotation: `an integer`, `one of [...]`, `a list of a string`, `... or null`."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Union or origin is types.UnionType:
        literals = [v for a in args if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)]
        others = [describe_annotation(a) for a in args if typing.get_origin(a) is not typing.Literal]
        parts = ([f"one of {literals}"] if literals else []) + others
        return " or ".join(dict.fromkeys(parts))
    if origin is typing.Literal:
        return f"one of {list(args)}"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    if ann in names:
        return names[ann]
    base = origin or ann
    if base in (list, tuple, set, cabc.Sequence, cabc.Iterable, cabc.Collection):
        return f"a list of {describe_annotation(args[0])}" if len(args) == 1 else "a list"
    if base in (dict, cabc.Mapping):
        return "a mapping"
    return getattr(ann, "__name__", str(ann))


_HINTS: dict[str, dict[str, Any] | None] = {}


def signature_of(obj: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """({name: parameter}, {name: type hint}, whether it takes any keyword) of a function or a class's
    constructor. A medens constructor that passes `**kwargs` on to a medens base (the stacking meta-learner
    to `MedensModule`) also takes that base's parameters, up the MRO until one has no `**kwargs`; a library
    class's `**kwargs` may go anywhere (Lightning's DDP strategy hands them to torch), so they end the walk."""
    if inspect.isclass(obj):
        owners = [c for c in obj.__mro__ if "__init__" in vars(c)]
        owners = owners[:1] + [c for c in itertools.takewhile(lambda c: c.__module__.startswith("medens."), owners[1:])]
    else:
        owners = [obj]
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    for owner in owners:
        fn = owner.__init__ if inspect.isclass(owner) else owner
        sig = inspect.signature(fn)
        try:
            own_hints = typing.get_type_hints(fn)
        except Exception:  # an unresolvable annotation: keep only those that are already objects
            own_hints = {n: p.annotation for n, p in sig.parameters.items() if not isinstance(p.annotation, str)}
        for name, p in sig.parameters.items():
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name not in params:
                params[name] = p
                if name in own_hints:
                    hints[name] = own_hints[name]
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return params, hints, False
    return params, hints, True


def target_annotations(target: str) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """(owner name, {param: annotation}, {param: default}) of a `_target_`, or None when unknown."""
    if target in _HINTS:
        return _HINTS[target]  # type: ignore[return-value]
    result = None
    try:
        import hydra.utils

        obj = hydra.utils.get_object(target)
        params, hints, _ = signature_of(obj)
        owner = getattr(obj, "__name__", target.rsplit(".", 1)[-1])
        result = (owner, hints, {n: p.default for n, p in params.items()})
    except Exception:
        result = None
    _HINTS[target] = result  # type: ignore[assignment]
    return result


def _value(node: DictConfig, key: Any) -> tuple[bool, Any]:
    try:
        if OmegaConf.is_missing(node, key):
            return False, None
        return True, node[key]
    except Exception:  # an interpolation that only resolves inside a Hydra run (hydra:...)
        return False, None


def _fail(path: str, value: Any, what: str, owner: str | None, key: str) -> ConfigError:
    shown = value if not isinstance(value, DictConfig | ListConfig) else OmegaConf.to_container(value)
    where = f" ({owner}.{key})" if owner else ""
    return ConfigError(f"{path}={shown!r}: expected {what}{where}")


def check_values(node: Any, path: str = "") -> None:
    """Raise `ConfigError` for the first value of `node` (recursively) that breaks its rule or annotation.

    Values given directly are checked before interpolated ones, so `trainer.max_epochs=abc` is reported
    as itself, not as the `model.scheduler.T_max` that copies it."""
    _check(node, path, interpolated=False)
    _check(node, path, interpolated=True)


def _check(node: Any, path: str, interpolated: bool) -> None:
    if isinstance(node, ListConfig):
        for i in range(len(node)):
            ok, item = _value(node, i)  # type: ignore[arg-type]
            if ok and isinstance(item, DictConfig | ListConfig):
                _check(item, f"{path}[{i}]", interpolated)
        return
    if not isinstance(node, DictConfig):
        return
    info = None
    if "_target_" in node:
        ok, target = _value(node, "_target_")
        info = target_annotations(str(target)) if ok else None
    for key in node.keys():
        key = str(key)
        if key.startswith("_") and key.endswith("_"):
            continue
        full = f"{path}.{key}" if path else key
        ok, value = _value(node, key)
        if not ok:
            continue
        if isinstance(value, DictConfig | ListConfig):
            _check(value, full, interpolated)
        if OmegaConf.is_interpolation(node, key) != interpolated:
            continue
        rule = rule_for(full)
        owner = info[0] if info else None
        if rule is not None and not (isinstance(value, DictConfig) and "_target_" in value):
            if not rule.ok(value):
                raise _fail(full, value, rule.describe(), owner if info and key in info[1] else None, key)
        elif info is not None and key in info[1]:
            if value is None and info[2].get(key) is None:
                pass  # default None: null is accepted whatever the annotation says
            elif _ann_match(value, info[1][key]) is False:
                raise _fail(full, value, describe_annotation(info[1][key]), owner, key)
    if not interpolated and (path == "data" or (path == "" and "val_fraction" in node)):
        _check_fractions(node, path)


def _check_fractions(node: DictConfig, path: str) -> None:
    ok_v, val = _value(node, "val_fraction")
    ok_t, test = _value(node, "test_fraction")
    if ok_v and ok_t and _is_num(val) and _is_num(test) and val + test >= 1.0:
        p = f"{path}." if path else ""
        raise ConfigError(
            f"{p}val_fraction={val!r} + {p}test_fraction={test!r} = {val + test:g}: expected a sum < 1 "
            "(some patients must be left to train on)"
        )
