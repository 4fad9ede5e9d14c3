"""AUROC and the operating point (medens.metrics.classification): one convention, torchmetrics-synchronised."""

from __future__ import annotations

import math
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import roc_auc_score

from medens.evaluation.classification import auc_per_class, operating_points, threshold_for_sensitivity
from medens.metrics.classification import LabelROC, binary_auroc, mean_defined, per_label_auroc


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = np.round(rng.random((120, 3)), 2).astype(np.float32)  # ties included
    targets = (rng.random((120, 3)) < 0.4).astype(np.float64)
    targets[rng.random((120, 3)) < 0.2] = np.nan  # unknown labels
    targets[:, 2] = np.where(np.isnan(targets[:, 2]), np.nan, 0.0)  # no positive: AUC undefined
    return probs, targets


def test_unknown_labels_masked_and_undefined_class_left_out_of_the_mean() -> None:
    probs, targets = _data()
    aucs = per_label_auroc(probs, targets)
    for c in range(2):
        known = ~np.isnan(targets[:, c])
        assert aucs[c] == pytest.approx(roc_auc_score(targets[known, c], probs[known, c]), abs=1e-12)
    assert math.isnan(aucs[2])
    assert mean_defined(aucs) == pytest.approx((aucs[0] + aucs[1]) / 2)
    report = auc_per_class(probs, targets, ["a", "b", "none"])
    assert report["auc"]["none"] is None and report["n_classes_with_auc"] == 2  # null in JSON
    assert report["mean_auc"] == pytest.approx(mean_defined(aucs))
    assert report["counts"]["none"]["positives"] == 0


def test_binary_auroc_for_reports_masks_unknown_targets_and_missing_scores() -> None:
    probs, targets = _data(2)
    scores = probs[:, 0].astype(np.float64) * 40 - 7  # outside [0, 1] (a diameter in mm): same ranks
    scores[::9] = np.nan  # a missing modality: no score
    known = np.isfinite(targets[:, 0]) & np.isfinite(scores)
    assert binary_auroc(targets[:, 0], scores) == pytest.approx(
        roc_auc_score(targets[known, 0], scores[known]), abs=1e-12
    )
    assert binary_auroc(targets[:, 2], probs[:, 2]) is None  # no positive: null, not 0.5
    assert binary_auroc([1.0, np.nan], [0.3, 0.4]) is None and binary_auroc([], []) is None


def test_epoch_of_batches_equals_one_shot_and_reset_starts_over() -> None:
    probs, targets = _data(1)
    roc = LabelROC(3)
    for i in range(0, 120, 16):
        roc.update(torch.from_numpy(probs[i:i + 16]), torch.from_numpy(targets[i:i + 16]).float())
    np.testing.assert_allclose(roc.auroc().numpy(), per_label_auroc(probs, targets), rtol=0, atol=1e-12)
    roc.reset()
    assert roc.update_count == 0
    roc.update(torch.tensor([[0.9, 0.1, 0.5], [0.1, 0.9, 0.5]]), torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert roc.auroc().tolist() == [1.0, 0.0, 0.5]


def test_operating_point_by_hand() -> None:
    probs = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.3, 0.2, 0.1])
    targets = np.array([1, 1, 0, 1, 1, 0, 1, 0, 0, 0], dtype=float)
    # >= 0.5 positive: TP 5 of 5, FP 2 of 5 (0.8 and the 0.5 tie)
    (row,) = operating_points(probs, targets, [0.5])
    assert (row["sensitivity"], row["specificity"]) == (1.0, 0.6)
    # 80% sensitivity = 4 of 5 positives: the 4th highest positive score, 0.6; FP there: 0.8 only
    op = threshold_for_sensitivity(probs, targets, 0.8)
    assert op == {"threshold": 0.6, "sensitivity": 0.8, "specificity": 0.8}
    roc = LabelROC(1)
    roc.update(torch.from_numpy(probs), torch.from_numpy(targets))
    module = roc.operating_point(0.5, 0.8)
    assert (module["sensitivity"], module["specificity"]) == (1.0, 0.6)
    assert (module["threshold_at_target"], module["specificity_at_target"]) == (0.6, 0.8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, probs: np.ndarray, targets: np.ndarray, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        roc = LabelROC(probs.shape[1])
        part = slice(rank, None, world)  # uneven shares: 61 and 59 cases
        roc.update(torch.from_numpy(probs[part]), torch.from_numpy(targets[part]))
        out[rank] = (roc.auroc().tolist(), roc.operating_point(0.5, 0.9, label=0))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_agree_on_the_whole_epoch_under_ddp() -> None:
    probs, targets = _data(2)
    probs, targets = probs[:-1], targets[:-1]  # 119 cases: ranks hold different numbers
    out = mp.Manager().dict()
    # spawn, not fork: a rank forked from a threaded pytest worker (xdist) could inherit a held lock and hang
    ctx = mp.start_processes(_rank, args=(2, _free_port(), probs, targets, out), nprocs=2, join=False,
                             start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the two gloo ranks did not finish within 300 s")
    whole = LabelROC(3)
    whole.update(torch.from_numpy(probs), torch.from_numpy(targets))
    expected = whole.auroc().tolist()
    for rank in (0, 1):
        aucs, op = out[rank]
        np.testing.assert_allclose(aucs, expected, atol=1e-12)
        assert op == whole.operating_point(0.5, 0.9, label=0)


def test_scores_outside_unit_interval_keep_their_units_and_order():
    """A baseline score in mm (or a logit) is not squashed: torchmetrics would apply a sigmoid to it, which
    saturates large values into ties and returns thresholds in sigmoid space."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    mm = rng.normal(10, 5, 300) + 8 * y
    mm[:5], mm[5:10] = 80.0, 90.0  # sigmoid(80) == sigmoid(90) == 1.0 in float64
    assert per_label_auroc(mm[:, None], y[:, None])[0] == pytest.approx(roc_auc_score(y, mm), abs=1e-12)
    target = threshold_for_sensitivity(mm, y, 0.9)
    assert target["threshold"] in set(mm.tolist())
    assert target["sensitivity"] == pytest.approx((mm[y == 1] >= target["threshold"]).mean())
    (at,) = operating_points(mm, y, [15.0])
    assert at["sensitivity"] == pytest.approx((mm[y == 1] >= 15.0).mean())
    assert at["specificity"] == pytest.approx((mm[y == 0] < 15.0).mean())
