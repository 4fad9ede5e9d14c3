"""Nodule records and the benign/malignant rule applied to a label table.

The patch cache stores each nodule's raw label fields (LIDC malignancy 1-5, a Benign/Malign
diagnosis, ...); the rule is applied when the datamodule is set up, so changing it (e.g. counting
malignancy 3 as benign) never needs the scans re-read.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from medens.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Columns read as an LIDC-style malignancy score (1-5, possibly a mean over readers), in order.
SCORE_COLUMNS = ("malignancy", "Malignancy_value", "malignancy_score", "malignancy_mean", "malignancy_median")
# Columns read as a binary diagnosis (0/1, or Benign/Malign[ant] text), in order.
BINARY_COLUMNS = ("Diagnosis", "diagnosis", "Diagnosis_value", "label", "malignant")

DEFAULT_RULE: dict[str, Any] = {
    "column": "auto",  # or a column name of the label table
    "malignant_min": 4.0,  # score >= this: malignant
    "benign_max": 2.0,  # score <= this: benign
    "indeterminate": "exclude",  # scores between: exclude | benign | malignant
}

_BENIGN_TEXT = {"benign", "0", "false", "no"}
_MALIGNANT_TEXT = {"malign", "malignant", "1", "true", "yes"}


@dataclass
class NoduleRecord:
    """One nodule: where its pixels come from, who it belongs to, and its raw label fields."""

    case_id: str
    patient_id: str
    source_file: str
    center_world: list[float] | None = None  # None: the centre of the volume (pre-cropped nodules)
    diameter_mm: float = math.nan
    label_fields: dict[str, Any] = field(default_factory=dict)
    mask_file: str | None = None
    series_uid: str | None = None
    official_split: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["diameter_mm"] = None if _isnan(self.diameter_mm) else float(self.diameter_mm)
        d["label_fields"] = {k: (None if _isnan(v) else v) for k, v in self.label_fields.items()}
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> NoduleRecord:
        d = dict(d)
        d["diameter_mm"] = math.nan if d.get("diameter_mm") is None else float(d["diameter_mm"])
        return cls(**d)


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def normalise_rule(rule: Mapping[str, Any] | None) -> dict[str, Any]:
    """Fill defaults and validate a malignancy rule given as a plain dict."""
    out = dict(DEFAULT_RULE)
    if rule:
        unknown = set(rule) - set(DEFAULT_RULE)
        if unknown:
            raise ConfigError(
                f"malignancy_rule: unknown keys {sorted(unknown)}; known: {sorted(DEFAULT_RULE)}"
            )
        out.update(dict(rule))
    if out["indeterminate"] not in ("exclude", "benign", "malignant"):
        raise ConfigError(
            f"malignancy_rule.indeterminate must be exclude|benign|malignant, got {out['indeterminate']!r}"
        )
    out["malignant_min"] = float(out["malignant_min"])
    out["benign_max"] = float(out["benign_max"])
    if out["benign_max"] >= out["malignant_min"]:
        raise ConfigError(
            f"malignancy_rule: benign_max ({out['benign_max']}) must be below malignant_min ({out['malignant_min']})"
        )
    return out


def resolve_label_column(columns: set[str], rule: Mapping[str, Any], where: str) -> tuple[str, str]:
    """(column, kind) the rule reads from a label table: kind is 'score' or 'binary'."""
    col = rule.get("column", "auto")
    if col != "auto":
        if col not in columns:
            raise DataError(
                f"{where}: malignancy_rule.column {col!r} is not a column (have {sorted(columns)})"
            )
        return col, "score" if col in SCORE_COLUMNS else "binary"
    for c in SCORE_COLUMNS:
        if c in columns:
            return c, "score"
    for c in BINARY_COLUMNS:
        if c in columns:
            return c, "binary"
    raise DataError(
        f"{where}: no label column found; expected one of {list(SCORE_COLUMNS + BINARY_COLUMNS)} "
        "or malignancy_rule.column naming one"
    )


def apply_rule(value: Any, kind: str, rule: Mapping[str, Any], where: str) -> float | None:
    """1.0 malignant, 0.0 benign, None excluded (indeterminate under the rule or no value)."""
    if value is None or _isnan(value) or (isinstance(value, str) and not value.strip()):
        return None
    if kind == "binary":
        text = str(value).strip().lower()
        if text.endswith(".0"):
            text = text[:-2]
        if text in _BENIGN_TEXT:
            return 0.0
        if text in _MALIGNANT_TEXT:
            return 1.0
        raise DataError(
            f"{where}: diagnosis value {value!r} is neither benign (0/Benign) nor malignant (1/Malign)"
        )
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: malignancy score {value!r} is not a number") from None
    if not 1.0 <= score <= 5.0:
        raise DataError(f"{where}: malignancy score {score} is outside the LIDC range 1-5")
    if score >= rule["malignant_min"]:
        return 1.0
    if score <= rule["benign_max"]:
        return 0.0
    ind = rule["indeterminate"]
    return None if ind == "exclude" else (1.0 if ind == "malignant" else 0.0)
