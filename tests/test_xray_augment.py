"""X-ray training augmentation on the device (`data.augment_on=device`): torchvision's geometry and colour,
per-item parameters from the item's own seed, evaluation untouched, and training through Lightning."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from medens.data.loaders import make_loader
from medens.data.synthetic_xray import ensure_synthetic_nih
from medens.data.xray import XRayDataModule
from medens.data.xray_augment import PARAM_NAMES, BatchAugment
from medens.errors import ConfigError
from medens.models.xray import XRayClassifier, build_resnet

AUG = [
    {"_target_": "torchvision.transforms.v2.RandomAffine", "degrees": 7, "translate": [0.04, 0.04],
     "scale": [0.95, 1.05]},
    {"_target_": "torchvision.transforms.v2.ColorJitter", "brightness": 0.1, "contrast": 0.1},
]  # fmt: skip


@pytest.fixture
def nih(tmp_path: Path) -> Path:
    return ensure_synthetic_nih(tmp_path / "nih", n_patients=10, images_per_patient=2, image_size=40, seed=1)


def _dm(root: Path, tmp: Path, augment_on: str = "device", **kw) -> XRayDataModule:
    dm = XRayDataModule(str(root), image_size=32, batch_size=4, val_fraction=0.2, test_fraction=0.2, seed=3,
                        train_augment=AUG, augment_on=augment_on,
                        cache={"enabled": True, "dir": str(tmp / "cache"), "workers": 1, "progress": False},
                        **kw)  # fmt: skip
    dm.setup()
    return dm


def _params(**kw: float) -> torch.Tensor:
    base = {"scale": 1.0, "brightness": 1.0, "contrast": 1.0}
    return torch.tensor([[{**base, **kw}.get(n, 0.0) for n in PARAM_NAMES]], dtype=torch.float32)


@pytest.mark.parametrize("angle,tx,ty,scale,shx,shy", [(0, 3, 0, 1, 0, 0), (90, 0, 0, 1, 0, 0),
                                                       (17, 2, -3, 1.1, 0, 0), (-12, -1, 2, 0.9, 8, -4)])  # fmt: skip
def test_geometry_matches_torchvision_affine(angle, tx, ty, scale, shx, shy):
    img = (torch.rand(1, 1, 40, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    aug = BatchAugment(channels=1, degrees=(-30, 30), affine_mode="bilinear")
    mine = aug(img, _params(angle=angle, tx=tx, ty=ty, scale=scale, shear_x=shx, shear_y=shy))
    ref = TF.affine(img.float() / 255, angle=angle, translate=[tx, ty], scale=scale, shear=[shx, shy],
                    interpolation=InterpolationMode.BILINEAR)  # fmt: skip
    torch.testing.assert_close(mine, ref, atol=1e-4, rtol=0)


def test_colour_and_flip_match_torchvision():
    img = (torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    aug = BatchAugment(channels=1, brightness=(0.5, 1.5), contrast=(0.5, 1.5), hflip=0.5)
    p = torch.cat([_params(brightness=1.3, contrast=0.7, jitter_order=1.0, hflip=1.0),
                   _params(brightness=0.8, contrast=1.4, jitter_order=0.0)])  # fmt: skip
    out = aug(img, p)
    x = img.float() / 255
    first = TF.adjust_contrast(TF.adjust_brightness(TF.horizontal_flip(x[0]), 1.3), 0.7)
    second = TF.adjust_brightness(TF.adjust_contrast(x[1], 1.4), 0.8)
    torch.testing.assert_close(out[0], first, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], second, atol=1e-5, rtol=0)


def test_device_path_without_randomness_equals_the_evaluation_transforms(nih, tmp_path):
    dm = _dm(nih, tmp_path)
    train = dm.datasets["train"]
    item = train[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (1, 32, 32)
    assert item["augment"].shape == (len(PARAM_NAMES),)
    identity = _params().expand(1, -1)
    out = dm.batch_augment(item["image"][None], identity)[0]
    val_tf = dm.datasets["val"].transform
    torch.testing.assert_close(out, val_tf(item["image"]), atol=1e-6, rtol=0)  # same pixels, same normalisation
    assert dm.datasets["val"][0]["image"].dtype == torch.float32 and "augment" not in dm.datasets["val"][0]
    assert dm.io_contract()["train_augment_on"] == "device"


def test_parameters_follow_the_item_seed_not_workers_or_batches(nih, tmp_path):
    ds = _dm(nih, tmp_path).datasets["train"]

    def params(workers: int, batch: int) -> dict[str, torch.Tensor]:
        loader = make_loader(ds, batch_size=batch, shuffle=True, seed=7, num_workers=workers)
        loader.sampler.set_epoch(2)
        return {c: p for b in loader for c, p in zip(b["case_id"], b["augment"], strict=True)}

    a, b = params(0, 4), params(2, 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loader = make_loader(ds, batch_size=4, shuffle=True, seed=7)
    loader.sampler.set_epoch(3)
    other = {c: p for bt in loader for c, p in zip(bt["case_id"], bt["augment"], strict=True)}
    assert any(not torch.equal(a[k], other[k]) for k in a)  # a new epoch draws new parameters
    spread = torch.stack(list(a.values()))
    names = list(PARAM_NAMES)
    assert spread[:, names.index("angle")].abs().max() <= 7 and spread[:, names.index("angle")].std() > 0
    assert ((spread[:, names.index("brightness")] - 1).abs() <= 0.1 + 1e-6).all()


def test_unsupported_transform_or_setting_is_named(nih, tmp_path):
    with pytest.raises(ConfigError, match=r"GaussianBlur has no batched on-device equivalent.*augment_on=loader"):
        XRayDataModule(str(nih), augment_on="device",
                       train_augment=[{"_target_": "torchvision.transforms.v2.GaussianBlur", "kernel_size": 3}])
    XRayDataModule(str(nih), augment_on="loader",
                   train_augment=[{"_target_": "torchvision.transforms.v2.GaussianBlur", "kernel_size": 3}])  # fmt: skip
    with pytest.raises(ConfigError, match="augment_on='gpu'"):
        XRayDataModule(str(nih), augment_on="gpu")


@pytest.mark.parametrize("workers,train_augment,expected", [(2, AUG, "loader"), (0, AUG, "device"),
                                                             (2, [{"_target_": "torchvision.transforms.v2.GaussianBlur",
                                                                   "kernel_size": 3}], "loader")])  # fmt: skip
def test_auto_augments_in_the_workers_on_a_cpu_and_after_the_transfer_otherwise(nih, tmp_path, workers,
                                                                               train_augment, expected):  # fmt: skip
    """auto: on a CPU with loader workers they augment beside the training step; without workers (or on an
    accelerator) the batch is augmented after the transfer; a chain with no batched form stays in the loader."""
    dm = XRayDataModule(str(nih), image_size=32, batch_size=4, val_fraction=0.2, test_fraction=0.2, seed=3,
                        num_workers=workers, train_augment=train_augment, augment_on="auto",
                        cache={"enabled": True, "dir": str(tmp_path / "cache"), "workers": 1, "progress": False})  # fmt: skip
    dm.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    dm.setup("fit")
    assert dm.io_contract()["train_augment_on"] == expected
    item = dm.datasets["train"][0]
    if expected == "device":
        assert dm.batch_augment is not None and item["image"].dtype == torch.uint8 and "augment" in item
    else:
        assert dm.batch_augment is None and item["image"].dtype == torch.float32 and "augment" not in item
        assert item["image"].shape == (3, 32, 32)


class _SeeBatch(pl.Callback):
    def __init__(self) -> None:
        self.train: list[torch.Tensor] = []
        self.val: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.train.append(batch["image"])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        self.val.append(batch["image"])


@pytest.mark.slow
def test_training_batches_are_augmented_after_transfer_and_validation_is_not(nih, tmp_path):
    import functools

    dm = _dm(nih, tmp_path)
    model = XRayClassifier(build_resnet("resnet18", num_classes=14), optimizer=functools.partial(torch.optim.SGD, lr=0.0))
    seen = _SeeBatch()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, num_sanity_val_steps=0, callbacks=[seen])  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert len(seen.train) == 2 and all(x.dtype == torch.float32 and x.shape == (4, 3, 32, 32) for x in seen.train)
    assert seen.train[0].min() < -1 and seen.train[0].max() > 1  # ImageNet-normalised, not uint8 or [0, 1]
    (val,) = seen.val
    expected = torch.stack([dm.datasets["val"][i]["image"] for i in range(val.shape[0])])
    torch.testing.assert_close(val, expected)  # evaluation inputs exactly as before
    with pytest.raises(ConfigError, match="no batch augmentation"):
        XRayClassifier(build_resnet("resnet18", num_classes=14), optimizer=torch.optim.SGD).on_after_batch_transfer(
            {"image": torch.zeros(1, 1, 4, 4, dtype=torch.uint8), "augment": _params()}, 0)
