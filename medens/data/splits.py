"""Patient-level splits: every image/scan/case of one patient lands in exactly one split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _unique_patients(patient_ids: Sequence[str], seed: int) -> list[str]:
    patients = sorted(set(map(str, patient_ids)))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(patients))
    return [patients[i] for i in order]


def patient_split(
    patient_ids: Sequence[str],
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, list[int]]:
    """Split item indices into train/val/test so that no patient appears in two splits.

    Fractions are of patients, not items. Each non-empty fraction gets at least one patient when
    there are enough patients to keep train non-empty.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"invalid split fractions: val={val_fraction}, test={test_fraction}")
    patients = _unique_patients(patient_ids, seed)
    n = len(patients)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    if test_fraction > 0 and n_test == 0 and n >= 3:
        n_test = 1
    if val_fraction > 0 and n_val == 0 and n - n_test >= 2:
        n_val = 1
    test_p = set(patients[:n_test])
    val_p = set(patients[n_test : n_test + n_val])
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, p in enumerate(map(str, patient_ids)):
        key = "test" if p in test_p else "val" if p in val_p else "train"
        out[key].append(i)
    return out


def split_by_patient_list(
    patient_ids: Sequence[str], val_fraction: float, seed: int
) -> dict[str, list[int]]:
    """Split items (already restricted to a train/val pool) into train and val by patient."""
    s = patient_split(patient_ids, val_fraction=val_fraction, test_fraction=0.0, seed=seed)
    return {"train": s["train"], "val": s["val"]}


def patient_kfold(
    patient_ids: Sequence[str], n_folds: int, seed: int = 0, labels: np.ndarray | None = None
) -> list[dict[str, list[int]]]:
    """Patient-grouped k-fold: each fold's `val` holds about 1/k of the patients, `train` the rest.

    With `labels` ([items, labels] 0/1) the patients are dealt so that every fold gets about 1/k of each
    label's positives (iterative stratification, Sechidis et al. 2011, at patient level): folds with the
    same case mix, so that predictions pooled over folds compare like with like.
    """
    patients = _unique_patients(patient_ids, seed)
    if n_folds < 2 or n_folds > len(patients):
        raise ValueError(f"n_folds={n_folds} needs 2 <= n_folds <= number of patients ({len(patients)})")
    if labels is None:
        fold_of = {p: i % n_folds for i, p in enumerate(patients)}
    else:
        fold_of = _stratified_fold_of(list(map(str, patient_ids)), patients, np.asarray(labels) > 0, n_folds)
    folds = []
    for k in range(n_folds):
        train = [i for i, p in enumerate(map(str, patient_ids)) if fold_of[p] != k]
        val = [i for i, p in enumerate(map(str, patient_ids)) if fold_of[p] == k]
        folds.append({"train": train, "val": val})
    return folds


def _stratified_fold_of(ids: list[str], patients: list[str], positive: np.ndarray, n_folds: int) -> dict[str, int]:
    """Patients (in their seeded order) to folds: those with positives of the rarest labels first, each to the
    fold furthest below its share of that patient's labels (ties: the fold with fewest items)."""
    row = {p: i for i, p in enumerate(patients)}
    pos = np.zeros((len(patients), positive.shape[1]))
    items = np.zeros(len(patients))
    for i, p in enumerate(ids):
        pos[row[p]] += positive[i]
        items[row[p]] += 1
    want = pos.sum(0) / n_folds
    rarity = (pos > 0) @ (1.0 / np.maximum(pos.sum(0), 1))
    fold_pos, fold_items = np.zeros((n_folds, pos.shape[1])), np.zeros(n_folds)
    out = {}
    for j in sorted(range(len(patients)), key=lambda j: -rarity[j]):  # stable: the seeded order breaks ties
        has = pos[j] > 0
        need = ((want - fold_pos)[:, has] / np.maximum(want[has], 1e-9)).sum(1) if has.any() else np.zeros(n_folds)
        k = max(range(n_folds), key=lambda f: (round(float(need[f]), 9), -fold_items[f]))
        out[patients[j]] = k
        fold_pos[k] += pos[j]
        fold_items[k] += items[j]
    return out
