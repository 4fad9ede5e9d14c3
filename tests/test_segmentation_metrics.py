"""BraTS segmentation metrics on hand-made label maps (Dice computed by hand in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from medens.metrics import (
    BraTSSegmentationMetrics,
    counted_dice,
    dice,
    hd95,
    mean_metrics,
    region_dice,
    segmentation_dice,
    segmentation_hd95,
    segmentation_metrics,
)

#           index: 0  1  2  3  4  5  6  7  8  9
GT = np.array([0, 1, 1, 2, 2, 2, 3, 3, 0, 0]).reshape(1, 1, 10)
PRED = np.array([0, 1, 2, 2, 2, 0, 3, 3, 3, 0]).reshape(1, 1, 10)


def test_dice_by_hand() -> None:
    d = segmentation_dice(PRED, GT)
    # class 1: gt {1,2}, pred {1}         -> 2*1/(2+1)
    assert d["dice_necrotic_core"] == pytest.approx(2 / 3)
    # class 2: gt {3,4,5}, pred {2,3,4}   -> 2*2/(3+3)
    assert d["dice_edema"] == pytest.approx(4 / 6)
    # class 3: gt {6,7}, pred {6,7,8}     -> 2*2/(2+3)
    assert d["dice_enhancing"] == pytest.approx(4 / 5)
    # WT {1,2,3}: gt {1..7}, pred {1,2,3,4,6,7,8} -> 2*6/(7+7)
    assert d["dice_wt"] == pytest.approx(12 / 14)
    # TC {1,3}: gt {1,2,6,7}, pred {1,6,7,8} -> 2*3/(4+4)
    assert d["dice_tc"] == pytest.approx(6 / 8)
    assert d["dice_et"] == pytest.approx(4 / 5)
    assert d["dice_mean"] == pytest.approx((12 / 14 + 6 / 8 + 4 / 5) / 3)
    assert d["dice_mean_class"] == pytest.approx((2 / 3 + 4 / 6 + 4 / 5) / 3)
    # torch input with a leading channel axis gives the same numbers
    assert segmentation_dice(torch.from_numpy(PRED)[None], torch.from_numpy(GT)[None]) == d
    assert segmentation_dice(GT, GT)["dice_mean"] == 1.0


def test_empty_structures_convention() -> None:
    gt = np.zeros((4, 4, 4), np.int64)
    gt[1:3, 1:3, 1:3] = 2  # oedema only: TC and ET empty in ground truth
    pred = gt.copy()
    m = segmentation_metrics(pred, gt)
    assert m["dice_tc"] == 1.0 and m["dice_et"] == 1.0  # both empty -> 1
    assert m["hd95_et"] == 0.0 and m["hd95_et_undefined"] == 0.0
    pred[0, 0, 0] = 3  # a false-positive ET voxel
    m = segmentation_metrics(pred, gt)
    assert m["dice_et"] == 0.0 and m["dice_enhancing"] == 0.0  # one empty -> 0
    assert math.isnan(m["hd95_et"]) and m["hd95_et_undefined"] == 1.0
    assert m["hd95_wt"] >= 0 and m["hd95_wt_undefined"] == 0.0
    m = segmentation_hd95(pred, gt, empty_penalty=373.13)
    assert m["hd95_et"] == 373.13 and m["hd95_et_undefined"] == 1.0
    assert dice(np.zeros(3), np.zeros(3)) == 1.0 and dice(np.ones(3), np.zeros(3)) == 0.0


def test_counted_dice_equals_monai_dice_metric() -> None:
    """The counting Dice of the search loops gives DiceMetric's values, empty-mask cases included."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        gt = rng.integers(0, 4, (9, 11, 7))
        pred = np.where(rng.random(gt.shape) < 0.3, rng.integers(0, 4, gt.shape), gt)
        monai = segmentation_dice(pred, gt)
        counted = region_dice(pred, gt)
        assert counted == pytest.approx({r: monai[f"dice_{r}"] for r in ("wt", "tc", "et")}, abs=1e-6)
    no_et = np.where(GT == 3, 1, GT)
    assert region_dice(no_et, no_et)["et"] == 1.0 and region_dice(PRED, no_et)["et"] == 0.0
    assert region_dice(PRED, GT) == pytest.approx({"wt": 12 / 14, "tc": 6 / 8, "et": 4 / 5})  # by hand above
    for p, t in ((np.zeros(3), np.zeros(3)), (np.ones(3), np.zeros(3)), (np.array([1, 1, 0]), np.array([0, 1, 1]))):
        assert counted_dice(p, t) == pytest.approx(dice(p, t))


def test_hd95_by_hand_in_mm() -> None:
    a = np.zeros((1, 1, 8), bool)
    b = np.zeros((1, 1, 8), bool)
    a[0, 0, 1], b[0, 0, 4] = True, True
    assert hd95(a, b, spacing=(1, 1, 2)) == pytest.approx(6.0)  # 3 voxels x 2 mm
    gt = np.zeros((10, 10, 10), bool)
    gt[2:6, 2:6, 2:6] = True
    pred = np.roll(gt, 1, axis=0)  # shifted 1 voxel along x; 16 of 56 surface voxels are 1 voxel off
    assert hd95(pred, gt, spacing=(2.0, 1.0, 1.0)) == pytest.approx(2.0)
    assert hd95(gt, gt) == 0.0


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
def test_hd95_matches_monai() -> None:
    from monai.metrics import compute_hausdorff_distance

    rng = np.random.default_rng(0)
    a = ndimage.gaussian_filter(rng.standard_normal((30, 28, 20)), 3) > 0.05
    b = ndimage.gaussian_filter(rng.standard_normal((30, 28, 20)), 3) > 0.05
    sp = (1.0, 1.5, 2.0)
    ref = compute_hausdorff_distance(
        torch.tensor(np.stack([~a, a]))[None].float(),
        torch.tensor(np.stack([~b, b]))[None].float(),
        percentile=95,
        spacing=sp,
    )
    assert hd95(a, b, sp) == pytest.approx(float(ref), rel=1e-5)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        segmentation_dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def _case(et_in_gt: bool, shift: int) -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros((12, 12, 12), np.int64)
    gt[2:10, 2:10, 2:10] = 2
    gt[4:8, 4:8, 4:8] = 3 if et_in_gt else 1
    pred = np.roll(gt, shift, axis=1)
    if not et_in_gt:
        pred[5, 5, 5] = 3
    return pred, gt


def test_accumulator_mean_over_cases_with_undefined_hd95() -> None:
    cases = [_case(True, 0), _case(True, 1), _case(False, 2)]
    spacing = (1.0, 2.0, 1.0)
    per_case = [segmentation_metrics(p, g, spacing) for p, g in cases]
    metric = BraTSSegmentationMetrics()
    preds = torch.from_numpy(np.stack([p for p, _ in cases]))
    target = torch.from_numpy(np.stack([g for _, g in cases]))[:, None]  # [B,1,H,W,D] as the loader gives
    logits = torch.nn.functional.one_hot(preds[:2], 4).permute(0, 4, 1, 2, 3).float() * 5  # [B,4,H,W,D]
    metric.update(logits, target[:2], spacing=torch.tensor([spacing, spacing]))
    metric.update(preds[2:], target[2:], spacing=spacing)
    out = metric.compute()
    expected = mean_metrics(per_case)
    assert float(out["n_cases"]) == 3
    for key in ("dice_wt", "dice_tc", "dice_et", "dice_mean", "dice_edema", "hd95_wt", "hd95_tc"):
        assert float(out[key]) == pytest.approx(expected[key], rel=1e-5), key
        assert float(out[key]) == pytest.approx(np.mean([m[key] for m in per_case]), rel=1e-5), key
    # ET: undefined in case 3 (false positive, empty ground truth) -> mean over the 2 others, counted
    assert float(out["hd95_et"]) == pytest.approx((per_case[0]["hd95_et"] + per_case[1]["hd95_et"]) / 2)
    assert float(out["hd95_et_undefined"]) == 1.0 == expected["hd95_et_undefined"]
    assert per_case[1]["hd95_wt"] == pytest.approx(2.0)  # 1-voxel shift along the 2 mm axis
    assert float(out["dice_et"]) == pytest.approx((1.0 + per_case[1]["dice_et"] + 0.0) / 3)
    metric.reset()
    metric.update(preds[:1], target[:1])
    assert float(metric.compute()["n_cases"]) == 1 and float(metric.compute()["dice_mean"]) == 1.0


def test_accumulator_without_hd95() -> None:
    metric = BraTSSegmentationMetrics(include_hd95=False)
    p, g = _case(True, 1)
    metric.update(torch.from_numpy(p)[None], torch.from_numpy(g)[None])
    out = metric.compute()
    assert "hd95_wt" not in out
    assert float(out["dice_wt"]) == pytest.approx(segmentation_dice(p, g)["dice_wt"])
