"""The MRI U-Net module: default size, checkpoint contract (plain PyTorch, medens loader), metrics wiring."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from torch import nn

from medens.checkpoint import load_checkpoint, load_network_weights
from medens.errors import CheckpointError, ConfigError
from medens.models.mri import UNetSegmenter
from medens.training.train import train
from tests.helpers import TINY_MRI, compose, plain

DESIGN_KEYS = {
    "epoch", "model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "train_loss", "val_loss",
    "val_dice", "best_metric", "hyperparameters", "timestamp",
}  # fmt: skip
DICE_LOGGED = {f"val/dice_{k}" for k in ("necrotic_core", "edema", "enhancing", "wt", "tc", "et")}


def _compose(root: Path, *overrides: str):
    return compose("train", f"data.cache_dir={root}/cache", "logger=none", *TINY_MRI, *overrides, root=root)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mri")
    metrics, _ = train(
        _compose(root, "trainer.max_epochs=2", "callbacks.model_checkpoint_periodic.every_n_epochs=1")
    )
    return root / "saved_models" / "mri", metrics


def _net_args(ckpt: dict) -> dict:
    return {k: v for k, v in ckpt["hyperparameters"]["model"]["net"].items() if not k.startswith("_")}


def test_default_experiment_is_the_seed_size_unet(tmp_path):
    cfg = compose("train", f"paths.root_dir={tmp_path}", "experiment=mri")
    net = instantiate(cfg.model.net)
    assert isinstance(net, UNet)
    n_params = sum(p.numel() for p in net.parameters())
    assert 18.5e6 < n_params < 20e6, n_params  # 19,225,897 with channels 32-512, 2 residual units
    assert list(cfg.model.net.channels) == [32, 64, 128, 256, 512] and cfg.model.net.num_res_units == 2
    assert (net.in_channels, net.out_channels) == (4, 4)
    assert list(cfg.data.modalities) == ["t1", "t1ce", "t2", "flair"]
    assert list(cfg.data.patch_size) == [128, 128, 128] and list(cfg.model.inferer.roi_size) == [128, 128, 128]
    assert (cfg.modality, cfg.monitor, cfg.monitor_mode, cfg.model.name) == ("mri", "val/dice", "max", "unet")
    assert cfg.optimized_metric == "best/val/dice"
    assert isinstance(instantiate(cfg.model.loss), DiceCELoss)


@pytest.mark.slow
def test_layout_history_and_logged_metrics(tiny_run):
    folder, metrics = tiny_run
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["training_history.json", "unet_best.pth", "unet_epoch_1.pth", "unet_epoch_2.pth"]
    history = json.loads((folder / "training_history.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == [1, 2]
    for h in history:
        assert {"train/loss", "val/loss", "val/dice", *DICE_LOGGED} <= set(h)
        assert h["val/dice"] == pytest.approx((h["val/dice_wt"] + h["val/dice_tc"] + h["val/dice_et"]) / 3)
    best = load_checkpoint(folder / "unet_best.pth")
    assert best["val_dice"] == pytest.approx(max(h["val/dice"] for h in history), abs=1e-6)
    assert metrics["best/val/dice"] == pytest.approx(best["best_metric"])
    assert {"test/dice", "test/dice_wt", "test/hd95_wt", "test/hd95_tc", "test/hd95_et"} <= set(metrics)


def test_plain_pytorch_loads_the_unet(tiny_run):
    path = tiny_run[0] / "unet_best.pth"
    ckpt = torch.load(path, weights_only=True)
    assert DESIGN_KEYS <= set(ckpt)
    net = UNet(**_net_args(ckpt))  # the bare MONAI network, no medens code
    net.load_state_dict(ckpt["model_state_dict"])  # strict: every key matches
    assert plain(ckpt["hyperparameters"]), "hyperparameters must be plain containers"
    contract = ckpt["hyperparameters"]["io_contract"]
    assert contract["channels"] == ["t1", "t1ce", "t2", "flair"]
    assert contract["label_names"] == ["background", "necrotic_core", "edema", "enhancing"]
    assert contract["label_map"] == {"0": 0, "1": 1, "2": 2, "4": 3}  # BraTS 2021 codes of the synthetic set
    assert contract["regions"] == {"wt": [1, 2, 3], "tc": [1, 3], "et": [3]}
    assert contract["spacing"] == [1.0, 1.0, 1.0] and contract["patch_size"] == [32, 32, 32]
    datetime.fromisoformat(ckpt["timestamp"])
    assert ckpt["best_metric"] == pytest.approx(ckpt["val_dice"])
    net.eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 4, 32, 32, 32)).shape == (1, 4, 32, 32, 32)


def test_wrong_architecture_lists_keys_and_strict_false_loads_what_matches(tiny_run):
    path = tiny_run[0] / "unet_best.pth"
    args = _net_args(load_checkpoint(path))
    wider = UNet(**{**args, "channels": [4, 8, 32]})  # deepest level wider: shape mismatches
    with pytest.raises(CheckpointError) as err:
        load_network_weights(wider, path)
    msg = str(err.value)
    assert "unet_best.pth" in msg and "shape mismatches" in msg and "strict=False" in msg
    deeper = UNet(**{**args, "num_res_units": 2})  # extra residual units: missing keys
    with pytest.raises(CheckpointError, match="missing keys"):
        load_network_weights(deeper, path)
    report = load_network_weights(wider, path, strict=False)
    assert report.shape_mismatch and not report.exact
    state = load_checkpoint(path)["model_state_dict"]
    first = next(k for k in state if k.endswith("conv.weight"))
    assert torch.equal(wider.state_dict()[first], state[first])  # same shape: loaded


def test_module_state_is_only_the_network(tiny_run):
    ckpt = load_checkpoint(tiny_run[0] / "unet_best.pth")
    assert "extra_state_dict" not in ckpt
    model = instantiate(_compose(tiny_run[0].parent.parent).model)
    assert all(k.startswith("net.") for k in model.state_dict())


class _Oracle(nn.Module):
    """'Network' whose logits are the one-hot of channel 0 (the label hidden in the image), or all background."""

    def __init__(self, perfect: bool) -> None:
        super().__init__()
        self.perfect = perfect
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        labels = x[:, 0].round().long().clamp(0, 3) if self.perfect else torch.zeros_like(x[:, 0]).long()
        return nn.functional.one_hot(labels, 4).permute(0, 4, 1, 2, 3).float() * 10 * self.scale


@pytest.mark.parametrize("perfect", [True, False])
def test_sliding_window_validation_dice(perfect):
    torch.manual_seed(0)
    label = torch.zeros(1, 1, 30, 26, 20, dtype=torch.long)
    label[0, 0, 8:20, 6:18, 4:14] = 2
    label[0, 0, 11:17, 9:15, 7:11] = 3
    label[0, 0, 13:15, 11:13, 8:10] = 1
    image = torch.cat([label.float(), torch.randn(1, 1, 30, 26, 20)], dim=1)
    model = UNetSegmenter(
        _Oracle(perfect), optimizer=torch.optim.SGD,
        inferer=SlidingWindowInferer(roi_size=[16, 16, 16], sw_batch_size=2, overlap=0.5, mode="gaussian"),
    )  # fmt: skip
    model.validation_step({"image": image, "label": label, "spacing": torch.ones(1, 3)}, 0)
    values = {k: float(v) for k, v in model.val_metrics.compute().items()}
    expected = 1.0 if perfect else 0.0
    for key in ("dice_wt", "dice_tc", "dice_et", "dice_necrotic_core", "dice_edema", "dice_enhancing", "dice_mean"):
        assert values[key] == pytest.approx(expected), key
    assert values["n_cases"] == 1


def test_channel_count_mismatch_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"model.net.in_channels=2 but the data has 4 modalities"):
        train(_compose(tmp_path, "model.net.in_channels=2", "trainer.max_epochs=1"))


def test_ddp_eval_shards_are_padded_and_padding_is_skipped(tmp_path):
    from types import SimpleNamespace

    from medens.data.mri import BraTSDataModule, generate_brats_synthetic
    from medens.models.mri import without_padding

    root = generate_brats_synthetic(tmp_path / "b", n_cases=3, shape=(24, 24, 24))
    dm = BraTSDataModule(root=str(root), cache="none", verify=False, val_fraction=0, test_fraction=0)
    dm.setup()
    seen = []
    for rank in (0, 1):  # 3 cases on 2 ranks: both run 2 batches, rank 1's second is a flagged repeat
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        batches = list(dm.predict_dataloader())
        assert len(batches) == 2
        seen += [(b["case_id"][0], bool(b["is_padding"][0])) for b in batches]
    assert sorted(c for c, pad in seen if not pad) == dm.split_case_ids("predict")
    assert [pad for _, pad in seen] == [False, False, False, True]
    assert without_padding({"image": torch.zeros(1), "is_padding": torch.tensor([True])}) is None
    mixed = {"image": torch.arange(3), "case_id": ["a", "b", "c"], "is_padding": torch.tensor([False, True, False])}
    kept = without_padding(mixed)
    assert kept["image"].tolist() == [0, 2] and kept["case_id"] == ["a", "c"]


class _OracleWithStray(_Oracle):
    """The perfect oracle plus a false tumour blob in the volume's corner, outside the brain."""

    def __init__(self) -> None:
        super().__init__(perfect=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x).clone()
        logits[:, :, :3, :3, :3] = 0
        logits[:, 2, :3, :3, :3] = 10
        return logits


def _case_with_brain_box() -> dict:
    torch.manual_seed(0)
    label = torch.zeros(1, 1, 30, 26, 20, dtype=torch.long)
    label[0, 0, 10:20, 8:18, 6:14] = 2
    label[0, 0, 13:17, 11:15, 8:11] = 3
    brain = torch.zeros(1, 1, 30, 26, 20)
    brain[..., 5:27, 5:23, 4:18] = 1
    image = torch.cat([label.float(), (torch.rand(1, 1, 30, 26, 20) + 1) * brain], dim=1)  # 0 outside the brain
    return {"image": image, "label": label, "spacing": torch.ones(1, 3), "case_id": ["c0"]}


def test_postprocessing_chosen_on_validation_is_saved_in_the_checkpoint_and_applied():
    from monai.inferers import SimpleInferer

    from medens.checkpoint.io import MEDENS_KEY

    candidates = [{}, {"min_size": 10**6}, {"brain_only": True}]  # raw, everything removed, brain only
    kwargs = {"optimizer": torch.optim.SGD, "inferer": SimpleInferer(), "postprocess": "choose",
              "postprocess_candidates": candidates}  # fmt: skip
    model = UNetSegmenter(_OracleWithStray(), **kwargs)
    batch = _case_with_brain_box()
    model.validation_step(batch, 0)
    raw_wt = float(model.val_metrics.compute()["dice_wt"])
    assert raw_wt < 0.99  # the stray blob costs the network's own figure
    model.log_epoch_metrics("val")
    chosen = {"brain_only": True, "min_size": 0, "largest_only": False}
    assert model.postprocess_spec == chosen
    model.test_step(batch, 0)
    assert float(model.test_metrics.compute()["dice_wt"]) == pytest.approx(1.0)
    assert torch.equal(model.predict_step(batch, 0)["pred"][:, 0].long(), batch["label"][:, 0])

    ckpt: dict = {}
    model.on_save_checkpoint(ckpt)
    saved = ckpt[MEDENS_KEY]
    assert saved["postprocess"] == chosen and saved["hyperparameters"]["io_contract"]["postprocess"] == chosen
    resumed = UNetSegmenter(_OracleWithStray(), **kwargs)  # Lightning's resume path
    resumed.on_load_checkpoint(ckpt)
    rebuilt = UNetSegmenter(_OracleWithStray(), **kwargs)  # evaluation's rebuild: the io_contract only
    rebuilt.io_contract = saved["hyperparameters"]["io_contract"]
    for m in (resumed, rebuilt):
        assert m.active_postprocess() == chosen
    fixed_none = UNetSegmenter(_OracleWithStray(), optimizer=torch.optim.SGD, inferer=SimpleInferer())
    fixed_none.io_contract = saved["hyperparameters"]["io_contract"]
    assert fixed_none.active_postprocess() is None  # postprocess=none ignores a recorded choice


def test_postprocess_setting_typos_are_config_errors():
    with pytest.raises(ConfigError, match="postprocess must be none, choose"):
        UNetSegmenter(_Oracle(True), optimizer=torch.optim.SGD, postprocess="chose")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['brain'\]"):
        UNetSegmenter(_Oracle(True), optimizer=torch.optim.SGD, postprocess={"brain": True})


def test_test_time_mirroring_is_flip_equivariant_and_exact_for_a_pointwise_net():
    from medens.models.tta import flip_averaged_logits

    torch.manual_seed(0)
    x = torch.randn(2, 2, 10, 8, 6)
    conv = nn.Conv3d(2, 4, 3, padding=1)  # an asymmetric kernel: its output changes under a flip
    with torch.no_grad():
        out = flip_averaged_logits(conv, x)
        assert torch.allclose(out.exp().sum(1), torch.ones(2, 10, 8, 6), atol=1e-5)
        plain_prob = torch.softmax(conv(x), 1)
        assert not torch.allclose(out.exp(), plain_prob, atol=1e-3)  # the flips did change the answer
        for dims in [(2,), (3, 4), (2, 3, 4)]:
            assert torch.allclose(flip_averaged_logits(conv, x.flip(dims)), out.flip(dims), atol=1e-5)
        pointwise = nn.Conv3d(2, 4, 1)  # commutes with every flip: mirroring changes nothing
        assert torch.allclose(flip_averaged_logits(pointwise, x).exp(), torch.softmax(pointwise(x), 1), atol=1e-5)


def test_the_default_experiment_saves_its_chosen_postprocessing(tiny_run):
    from medens.models.mri_postprocess import DEFAULT_CANDIDATES, check_postprocess

    ckpt = load_checkpoint(tiny_run[0] / "unet_best.pth")
    model_cfg = ckpt["hyperparameters"]["model"]
    assert model_cfg["tta_flips"] is True and model_cfg["postprocess"] == "choose"
    assert ckpt["postprocess"] in [check_postprocess(c) for c in DEFAULT_CANDIDATES]
    assert ckpt["hyperparameters"]["io_contract"]["postprocess"] == ckpt["postprocess"]
