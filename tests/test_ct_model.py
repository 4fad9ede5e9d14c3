"""The CT classifier: MONAI 3D ResNet-18, class weighting, operating points, and the checkpoint contract."""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import ResNet, resnet18, resnet34

from medens.checkpoint import load_checkpoint, load_network_weights
from medens.data.ct import CTDataModule
from medens.errors import CheckpointError, ConfigError
from medens.evaluation.classification import threshold_for_sensitivity
from medens.models.ct import CTClassifier, count_parameters
from medens.training.train import train
from tests.helpers import TINY_CT, compose

DESIGN_KEYS = {
    "epoch", "model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "train_loss", "val_loss",
    "val_auc", "best_metric", "hyperparameters", "timestamp",
}  # fmt: skip


def _compose(root: Path, *overrides: str):
    return compose("train", "logger=none", *overrides, root=root)


def _net_args(ckpt: dict) -> dict:
    return {k: v for k, v in ckpt["hyperparameters"]["model"]["net"].items() if k != "_target_"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny 3D nets gain nothing from more intra-op threads, and spinning ones on a shared CPU cost a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("ct")
    cfg = _compose(
        root,
        "experiment=ct",
        *TINY_CT,
        "trainer.max_epochs=3",
        "callbacks.model_checkpoint_periodic.every_n_epochs=1",
    )
    metrics, objects = train(cfg)
    return root, root / "saved_models" / "ct", metrics, objects


def test_default_network_is_monai_resnet18_3d_with_33m_parameters():
    cfg = _compose(Path("/tmp"), "experiment=ct")
    net_cfg = {k: v for k, v in cfg.model.net.items() if k != "_target_"}
    assert cfg.model.net._target_ == "monai.networks.nets.resnet18" and net_cfg["spatial_dims"] == 3
    net = resnet18(**net_cfg)
    assert isinstance(net, ResNet) and net.fc.out_features == 1
    assert count_parameters(net) == 33_161_409  # ~33.2M (one output, one input channel)
    assert cfg.data.patch_size == 64 and list(cfg.data.hu_window) == [-1000.0, 400.0]
    assert cfg.data.spacing_mm == 1.0 and list(cfg.data.channels) == ["image"]
    assert cfg.model.name == "3dcnn" and cfg.modality == "ct" and cfg.monitor == "val/auc"


def test_layout_history_and_logged_operating_point(ct_run):
    _, folder, metrics, objects = ct_run
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "3dcnn_best.pth", "3dcnn_epoch_1.pth", "3dcnn_epoch_2.pth", "3dcnn_epoch_3.pth", "training_history.json",
    ]  # fmt: skip
    history = json.loads((folder / "training_history.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for h in history:
        assert {"train/loss", "val/loss", "val/auc", "val/sensitivity", "val/specificity",
                "val/threshold_at_90_sensitivity", "val/specificity_at_90_sensitivity"} <= set(h)  # fmt: skip
    best = load_checkpoint(folder / "3dcnn_best.pth")
    assert best["val_auc"] == pytest.approx(max(h["val/auc"] for h in history), abs=1e-6)
    assert metrics["best/val/auc"] == pytest.approx(best["best_metric"])
    assert "test/auc" in metrics and "test/sensitivity" in metrics
    epoch = best["epoch"]
    op = best["operating_point"]
    assert op["epoch"] == epoch and op["threshold"] == 0.5 and op["target_sensitivity"] == 0.9
    assert op["threshold_at_target_sensitivity"] == pytest.approx(
        history[epoch - 1]["val/threshold_at_90_sensitivity"], abs=1e-6
    )
    assert op["sensitivity_at_target_threshold"] >= 0.9
    # class imbalance: malignant cases weighted by benign / malignant of the training split
    counts = objects["datamodule"].class_counts()
    assert float(objects["model"].pos_weight) == pytest.approx(counts["benign"] / counts["malignant"])


def test_plain_pytorch_loads_the_monai_network(ct_run):
    _, folder, _, _ = ct_run
    path = folder / "3dcnn_best.pth"
    ckpt = torch.load(path, weights_only=True)
    assert DESIGN_KEYS <= set(ckpt)
    datetime.fromisoformat(ckpt["timestamp"])
    net = resnet18(**_net_args(ckpt))  # only MONAI and the checkpoint's own hyperparameters
    net.load_state_dict(ckpt["model_state_dict"])  # strict
    assert torch.equal(net.fc.weight, ckpt["model_state_dict"]["fc.weight"])
    contract = ckpt["hyperparameters"]["io_contract"]
    assert contract["channels"] == ["image"] and contract["patch_size"] == [16, 16, 16]
    assert contract["spacing_mm"] == [1.0, 1.0, 1.0] and contract["hu_window"] == [-1000.0, 400.0]
    assert contract["label_names"] == ["malignant"] and contract["decision_threshold"] == 0.5
    assert contract["threshold_at_target_sensitivity"] == pytest.approx(
        ckpt["operating_point"]["threshold_at_target_sensitivity"]
    )
    x = torch.rand(2, 1, 16, 16, 16)
    net.eval()
    assert net(x).shape == (2, 1)


def test_wrong_architecture_lists_keys_and_strict_false_loads_what_matches(ct_run):
    _, folder, _, _ = ct_run
    path = folder / "3dcnn_best.pth"
    ckpt = load_checkpoint(path)
    assert load_network_weights(resnet18(**_net_args(ckpt)), path).exact
    deeper = resnet34(**_net_args(ckpt))
    with pytest.raises(CheckpointError) as err:
        load_network_weights(deeper, path)
    msg = str(err.value)
    assert "3dcnn_best.pth" in msg and "missing keys" in msg and "layer1.2.conv1.weight" in msg
    assert "strict=False" in msg
    report = load_network_weights(deeper, path, strict=False)
    assert any(k.startswith("layer3.5.") for k in report.missing)
    assert torch.equal(deeper.conv1.weight, ckpt["model_state_dict"]["conv1.weight"])
    assert torch.equal(deeper.fc.weight, ckpt["model_state_dict"]["fc.weight"])


def test_channel_mismatch_between_net_and_data_is_a_config_error(ct_run):
    root, _, _, _ = ct_run
    cfg = _compose(root, "experiment=ct", *TINY_CT, "data.channels=[image,mask]", "trainer.max_epochs=1",
                   f"paths.saved_models_dir={root}/mismatch")  # fmt: skip
    with pytest.raises(ConfigError, match=r"n_input_channels=1 but data.channels gives 2"):
        train(cfg)


def test_two_output_head_uses_softmax_and_class_weighted_cross_entropy():
    net = resnet18(spatial_dims=3, n_input_channels=1, num_classes=2, widen_factor=0.125, conv1_t_size=3)
    model = CTClassifier(net, optimizer=torch.optim.AdamW, pos_weight=3.0)
    model.setup("fit")  # no trainer: a numeric pos_weight needs no data
    logits = torch.tensor([[0.2, 1.0], [2.0, -1.0], [0.0, 0.0]])
    target = torch.tensor([1.0, 0.0, 1.0])
    probs = model.probability(logits)
    torch.testing.assert_close(probs[:, 0], torch.softmax(logits, 1)[:, 1])
    expected = torch.nn.functional.cross_entropy(logits, target.long(), weight=torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(model._loss(logits, target), expected)
    one = CTClassifier(
        resnet18(spatial_dims=3, n_input_channels=1, num_classes=1, widen_factor=0.125),
        optimizer=torch.optim.AdamW,
        pos_weight=None,
        tta_flips=True,
    )
    x = torch.rand(2, 1, 16, 16, 16)
    one.eval()
    with torch.no_grad():
        p = one.predict_proba(x)
        manual = torch.stack([torch.sigmoid(one.net(torch.flip(x, dims=f) if f else x)) for f in
                              [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]]).mean(0)  # fmt: skip
    assert p.shape == (2, 1)
    torch.testing.assert_close(p, manual)
    with pytest.raises(ConfigError, match="1 \\(sigmoid\\) or 2 \\(softmax\\)"):
        CTClassifier(resnet18(spatial_dims=3, n_input_channels=1, num_classes=3), optimizer=torch.optim.AdamW)
    with pytest.raises(ConfigError, match="pos_weight"):
        CTClassifier(net, optimizer=torch.optim.AdamW, pos_weight="inverse")


def test_threshold_for_sensitivity_is_the_highest_reaching_the_target():
    probs = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.85, 0.05])
    targets = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    row = threshold_for_sensitivity(probs, targets, 0.9)  # 9 of 10 positives -> the 9th highest, 0.2
    assert row["threshold"] == pytest.approx(0.2)
    assert row["sensitivity"] == pytest.approx(0.9) and row["specificity"] == pytest.approx(0.5)
    assert threshold_for_sensitivity(probs, targets, 1.0)["threshold"] == pytest.approx(0.1)
    assert math.isnan(threshold_for_sensitivity(probs, np.zeros(12), 0.9)["threshold"])


def test_nested_folds_hold_out_test_patients_and_validate_on_training_patients(ct_run):
    root, _, _, objects = ct_run
    kw = dict(objects["datamodule"].hparams)
    kw.update(n_folds=3, test_fraction=0.0, inner_val_fraction=0.25,
              source={**kw["source"], "generate_if_missing": False})
    held_out = []
    for fold in range(3):
        dm = CTDataModule(**{**kw, "fold": fold})
        dm.setup("fit")
        tr, va, te = (dm.split_patient_ids(s) for s in ("train", "val", "test"))
        assert tr and va and te and not (tr & va or tr & te or va & te)
        held_out.append(te)
    assert not (held_out[0] & held_out[1] or held_out[0] & held_out[2] or held_out[1] & held_out[2])
    assert set().union(*held_out) == set().union(tr, va, te)  # every patient is held out exactly once
    with pytest.raises(ConfigError, match="test_fraction=0"):
        CTDataModule(**{**kw, "test_fraction": 0.2})
    with pytest.raises(ConfigError, match="needs n_folds"):
        CTDataModule(**{**kw, "n_folds": None})
