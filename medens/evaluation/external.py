"""External validation: score every case of another folder in the checkpoint's own format and preprocessing.

`scripts/evaluate.py ckpt_path=... data.root=<folder> split=all`: the data config is the checkpoint's own
(its preprocessing, label rule, channels), and only the `data.<key>=` values given on the command line
replace keys of it. `data=<group>` still replaces the whole data config. A folder in another format
than the checkpoint's (an LIDC folder for an X-ray model) is refused before anything is loaded.

Also here: the per-case table columns (sex, view position, age, any LIDC column) that subgroup
analyses group by.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import ConcatDataset, Dataset

from medens.data.ct.readers import source_name
from medens.data.reader import upgrade_legacy_data_config
from medens.errors import ConfigError

log = logging.getLogger(__name__)

SPLITS = ("val", "test", "all")

#: Formats by what a folder holds; the checkpoint's format comes from its data config.
FORMAT_NAMES = {
    "nih_cxr14": "NIH ChestX-ray14 (Data_Entry_2017*.csv + images/)",
    "luna16": "LUNA16 (annotations.csv + scans)",
    "voi": "pre-cropped nodule volumes (labels.csv + image/*.nii.gz)",
    "brats": "BraTS (one folder per case with NIfTI modalities)",
    "npz": "MedMNIST .npz",
}


def hydra_data_overrides(argv: Sequence[str]) -> list[str]:
    """Command-line arguments with `data.<key>=v` turned into `+data.<key>=v` when no `data=<group>` is
    given, so they land in `cfg.data` as a partial config merged onto the checkpoint's own."""
    args = list(argv)
    group = any(a.split("=", 1)[0].lstrip("+~") == "data" for a in args if "=" in a)
    if group:
        return args
    return ["+" + a if a.startswith("data.") and "=" in a else a for a in args]


def is_partial(data_cfg: Any) -> bool:
    """A `cfg.data` that only overrides some keys (no `_target_`: not a whole data group)."""
    return data_cfg is not None and "_target_" not in data_cfg


def detect_format(root: str | Path) -> tuple[str | None, str]:
    """(format, evidence) of a dataset folder, or (None, reason) when it cannot tell."""
    root = Path(root)
    if root.is_file():
        return ("npz", root.name) if root.suffix == ".npz" else (None, f"{root} is a file")
    if not root.is_dir():
        return None, f"{root} does not exist"
    tables = sorted(root.glob("Data_Entry_2017*.csv")) + sorted(root.glob("Data_Entry_2017*.csv.gz"))
    if tables:
        return "nih_cxr14", tables[0].name
    if (root / "annotations.csv").is_file():
        return "luna16", "annotations.csv"
    if (root / "labels.csv").is_file() and (root / "image").is_dir():
        return "voi", "labels.csv + image/"
    for sub in sorted(p for p in root.iterdir() if p.is_dir())[:50]:
        if any(sub.glob("*.nii*")):
            return "brats", f"case folder {sub.name}/ with NIfTI files"
    if any(root.glob("*.npz")):
        return "npz", next(iter(root.glob("*.npz"))).name
    return None, f"no known dataset layout in {root}"


def expected_format(data_cfg: Any) -> str | None:
    """The dataset format a data config reads."""
    target = str(data_cfg.get("_target_", ""))
    if target.endswith("XRayDataModule"):
        return "nih_cxr14"
    if target.endswith("CTDataModule"):
        source = source_name(data_cfg.get("source", "luna16"))
        return {"luna16": "luna16", "dicom": "luna16", "voi": "voi", "nodulemnist3d": "npz"}.get(source)
    if "mri" in target.lower() or "brats" in target.lower():
        return "brats"
    return None


def merge_data_config(
    ckpt: dict[str, Any], given: Any, ckpt_path: str | Path, split: str
) -> DictConfig | None:
    """The data config to evaluate with: the checkpoint's own, with the `data.<key>=` overrides merged on
    top (or a whole `data=<group>` as given). Checks the folder's format against the checkpoint's.

    Returns None when nothing was given and the split is a normal one (the caller's default path)."""
    hyper = ckpt.get("hyperparameters") or {}
    own = OmegaConf.create(upgrade_legacy_data_config(hyper.get("data") or {}))  # a copy; old CT/X-ray form upgraded
    given = without_case_table(given)  # a table for subgroups, read by the report, never by the datamodule
    if given is not None and not len(given):
        given = None
    if given is None and split != "all":
        return None
    if given is None:
        data_cfg = own
    elif is_partial(given):
        data_cfg = OmegaConf.merge(own, given)
        if "root" in given:
            with open_dict(data_cfg):  # another hospital's folder is never overwritten by a generator
                if "generate_if_missing" in data_cfg:
                    data_cfg.generate_if_missing = False
                if isinstance(data_cfg.get("source"), DictConfig) and "generate_if_missing" in data_cfg.source:
                    data_cfg.source.generate_if_missing = False  # a synthetic reader (CT, X-ray, MRI)
                if data_cfg.get("synthetic") is not None:
                    data_cfg.synthetic = None
                if data_cfg.get("max_images") is not None:
                    data_cfg.max_images = None
            want, have = expected_format(own), detect_format(data_cfg.root)
            if want and have[0] and want != have[0]:
                raise ConfigError(
                    f"data.root={data_cfg.root} holds {FORMAT_NAMES.get(have[0], have[0])} data (found {have[1]}), "
                    f"but {ckpt_path} was trained on {FORMAT_NAMES.get(want, want)} data; evaluate it on a folder "
                    "of its own format (or pass a whole data=<group> of that modality)"
                )
    else:
        data_cfg = given
    if split == "all":
        with open_dict(data_cfg):
            if str(data_cfg.get("_target_", "")).endswith("CTDataModule") and source_name(data_cfg.get("source")) != "nodulemnist3d":
                # every case lands in one split; the patient split of training is irrelevant here
                data_cfg.n_folds, data_cfg.inner_val_fraction = None, 0.0
                data_cfg.test_fraction, data_cfg.val_fraction = 0.0, 0.0
    return data_cfg


def all_cases_dataset(dm: Any) -> Dataset:
    """Every case of the datamodule's folder, with evaluation transforms (no augmentation)."""
    name = type(dm).__name__
    if name == "XRayDataModule":
        from medens.data.xray import XRayDataset, build_transforms

        df = dm._table()
        tf = build_transforms(dm.image_size, dm.channels, dm.normalize, None)
        image_root = dm.reader.image_folder(dm.root)  # None: the reader decodes its own cases (MedMNIST)
        return XRayDataset(
            [image_root / n for n in df["Image Index"]] if image_root is not None else None,
            np.stack(df["targets"].to_list()),
            df["Image Index"].tolist(),
            df["Patient ID"].astype(str).tolist(),
            tf,
            read=None if image_root is not None else functools.partial(dm.reader.read_case, dm.root),
        )
    if name == "CTDataModule":
        dm.setup("test")
        parts = []
        for split in ("train", "val", "test"):
            ds = copy.copy(dm.datasets[split])
            ds.transform = None
            if len(ds):
                parts.append(ds)
        if not parts:
            raise ConfigError(f"{dm.root}: no case to evaluate")
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)
    raise ConfigError(f"split=all is not supported for {name}")


def all_cases_loader(dm: Any, batch_size: int) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(all_cases_dataset(dm), batch_size=batch_size, shuffle=False, num_workers=0)


# ----------------------------------------------------------------------------- per-case attributes
CASE_TABLE_KEY = "case_table"


def without_case_table(data_cfg: Any) -> Any:
    """`cfg.data` without `case_table` (a copy; None stays None)."""
    if data_cfg is None or CASE_TABLE_KEY not in data_cfg:
        return data_cfg
    out = copy.deepcopy(data_cfg)
    with open_dict(out):
        out.pop(CASE_TABLE_KEY)
    return out


def case_table_path(cfg: Any) -> Path | None:
    """`data.case_table=<csv>`: an extra per-case (or per-patient) table to group subgroups by."""
    data = cfg.get("data") if cfg is not None else None
    value = data.get(CASE_TABLE_KEY) if data is not None else None
    if value in (None, ""):
        return None
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.case_table={value}: no such file (a CSV with one row per case or patient)")
    return path


def read_case_table(path: Path, case_ids: Sequence[str], patient_ids: Sequence[str]) -> pd.DataFrame:
    """The CSV's rows indexed by case id. The id column is the one whose values name the most of the
    evaluated cases (e.g. `Brats20ID` of the BraTS survival table), else the most of their patients (each
    case then gets its patient's row)."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.case_table={path}: not a readable CSV ({exc})") from exc
    cases, patients = {str(c) for c in case_ids}, {str(p) for p in patient_ids}
    best: tuple[int, str, str] = (0, "", "")
    for col in table.columns:
        values = set(table[col].dropna().str.strip())
        for n, kind in ((len(values & cases), "case"), (len(values & patients), "patient")):
            if n > best[0]:
                best = (n, str(col), kind)
    if not best[0]:
        raise ConfigError(
            f"data.case_table={path}: no column holds the evaluated case or patient ids (columns: "
            f"{', '.join(map(str, table.columns))}; case ids look like {', '.join(sorted(cases)[:3])})"
        )
    n, col, kind = best
    table[col] = table[col].str.strip()
    table = table.drop_duplicates(col).set_index(col)
    if kind == "patient":
        by_case = dict(zip(map(str, case_ids), map(str, patient_ids), strict=True))
        table = table.reindex(list(by_case.values()))
        table.index = pd.Index(list(by_case), name="case_id")
    total = len(cases) if kind == "case" else len(patients)
    log.info("case table %s: %d of %d %ss matched by column %r", path, n, total, kind, col)
    return table


def case_attributes(
    dm: Any, case_table: Path | None = None, case_ids: Sequence[str] = (), patient_ids: Sequence[str] = ()
) -> pd.DataFrame:
    """One row per case id of the dataset with every column of its table (empty frame if it has none),
    joined with the columns of `data.case_table` when given (matched on `case_ids` / `patient_ids`)."""
    own = _own_case_attributes(dm)
    if case_table is None:
        return own
    extra = read_case_table(case_table, case_ids, patient_ids)
    extra = extra.drop(columns=[c for c in extra.columns if c in own.columns])
    return own.join(extra, how="outer") if len(own.columns) else extra


def _own_case_attributes(dm: Any) -> pd.DataFrame:
    name = type(dm).__name__
    if name == "BraTSDataModule":
        # patient id, and the grade where the folders say it (BraTS 2015/2017/2018: HGG/ and LGG/)
        from medens.data.mri.brats import patient_id_from_case

        rows = {}
        for case in dm.cases:
            row = {"patient_id": patient_id_from_case(case.case_id, getattr(dm, "patient_id_pattern", None))}
            parent = Path(case.folder).parent.name
            if parent.upper() in ("HGG", "LGG"):
                row["grade"] = parent.upper()
            rows[case.case_id] = row
        return pd.DataFrame.from_dict(rows, orient="index")
    if name == "XRayDataModule":
        from medens.data.xray import find_label_csv

        table = pd.read_csv(find_label_csv(dm.root, getattr(dm.reader, "csv", None)), dtype={"Patient ID": str})
        return table.drop_duplicates("Image Index").set_index("Image Index")
    if name == "CTDataModule":
        rows = {}
        for ds in getattr(dm, "datasets", {}).values():
            for r in getattr(ds, "records", []):
                rows[r.case_id] = {**r.label_fields, "patient_id": r.patient_id, "diameter_mm": r.diameter_mm}
        return pd.DataFrame.from_dict(rows, orient="index")
    return pd.DataFrame()
