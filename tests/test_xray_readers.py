"""X-ray readers (`data.source`): NIH CSV + folder + official lists, MedMNIST npz, a new reader in a few
lines; the datamodule only caches, splits and loads whatever a reader lists."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import hydra.utils
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medens.checkpoint.safe_build import target_refusal
from medens.data.reader import upgrade_legacy_data_config
from medens.data.synthetic_xray import ensure_synthetic_nih
from medens.data.xray import NIH_LABELS, XRayDataModule
from medens.data.xray_readers import (
    CASE,
    PATIENT,
    SPLIT,
    TARGETS,
    MedMNISTReader,
    NIHReader,
    SyntheticNIHReader,
    XRayCases,
    XRayReader,
    build_xray_reader,
    upgrade_legacy_config,
)  # fmt: skip
from medens.errors import ConfigError, DataError


@pytest.fixture
def nih(tmp_path: Path) -> Path:
    root = ensure_synthetic_nih(tmp_path / "nih", n_patients=12, images_per_patient=2, image_size=40, seed=2)
    table = pd.read_csv(root / "Data_Entry_2017.csv")
    test = table[table["Patient ID"].astype(int) <= 3]["Image Index"]
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(sorted(set(table["Image Index"]) - set(test))) + "\n")
    return root


def _npz(path: Path, n_labels: int = 14) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 5)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, n_labels), dtype=np.uint8)
    np.savez(path, **arrays)
    return arrays


def test_nih_reader_lists_cases_with_patients_and_the_official_split(nih):
    cases = NIHReader().list_cases(nih, NIH_LABELS, missing_images="error")
    t = cases.table
    assert {CASE, PATIENT, TARGETS, SPLIT} <= set(t.columns) and not cases.skipped
    assert set(t.loc[t[SPLIT] == "test", PATIENT].astype(int)) == {1, 2, 3}
    assert set(t[SPLIT]) == {"test", "train_val"}
    no_lists = NIHReader(use_official_split=False).list_cases(nih, NIH_LABELS, "error")
    assert SPLIT not in no_lists.table.columns


def test_datamodule_from_a_reader_config_equals_the_nih_keys(nih, tmp_path):
    """An old flat config (NIH keys beside the datamodule's, as older checkpoints and run folders hold
    it) upgraded to the reader form gives the same cases and pixels as the reader config itself."""
    cache = {"enabled": True, "dir": str(tmp_path / "cache"), "workers": 1, "progress": False}
    flat = {"_target_": "medens.data.xray.XRayDataModule", "root": str(nih), "source": None, "image_size": 32,
            "view_positions": ["PA"], "image_dir": "images", "csv": None, "use_official_split": True, "seed": 0,
            "cache": cache}  # fmt: skip
    by_keys = hydra.utils.instantiate(upgrade_legacy_data_config(flat))
    by_source = XRayDataModule(str(nih), image_size=32, seed=0, cache=cache,
                               source={"_target_": "medens.data.xray_readers.NIHReader", "view_positions": ["PA"]})
    by_keys.setup()
    by_source.setup()
    for split in ("train", "val", "test"):
        assert by_keys.datasets[split].ids == by_source.datasets[split].ids
    assert {int(p) for p in by_source.datasets["test"].patient_ids} <= {1, 2, 3}  # the official test list
    assert by_source.describe()["source"] == "nih" and by_source.reader.view_positions == ["PA"]
    torch.testing.assert_close(by_keys.datasets["val"][0]["image"], by_source.datasets["val"][0]["image"])


def test_old_flat_xray_configs_upgrade_to_the_reader_they_meant(tmp_path):
    dm = "medens.data.xray.XRayDataModule"
    gen = {"n_patients": 100, "images_per_patient": 3, "image_size": 256, "seed": 0}
    old_default = {"_target_": dm, "root": "r", "source": None, "image_dir": "images", "csv": None,
                   "view_positions": None, "use_official_split": True, "synthetic": gen, "generate_if_missing": True}  # fmt: skip
    new = upgrade_legacy_config(old_default)
    assert new == {"_target_": dm, "root": "r", "source": {
        "_target_": "medens.data.xray_readers.SyntheticNIHReader", "image_dir": "images", "csv": None,
        "view_positions": None, "use_official_split": True, "generator": gen, "generate_if_missing": True}}  # fmt: skip
    assert build_xray_reader(new["source"]) == SyntheticNIHReader(generator=gen)  # what the old datamodule built
    assert upgrade_legacy_config(new) == new and upgrade_legacy_data_config(new) == new  # already upgraded
    real = upgrade_legacy_config({"_target_": dm, "csv": "labels.csv", "synthetic": None, "generate_if_missing": False})
    assert build_xray_reader(real["source"]) == NIHReader(csv="labels.csv")
    medmnist = {"_target_": "medens.data.xray_readers.MedMNISTReader", "path": "c.npz"}  # NIH keys were ignored
    assert upgrade_legacy_config({"_target_": dm, "source": medmnist, "image_dir": "images"})["source"] == medmnist
    ct = {"_target_": "medens.data.ct.CTDataModule", "source": "voi", "image_dir": "image"}
    assert upgrade_legacy_config(ct) == ct  # another modality's keys: not X-ray's to move

    from medens.evaluation.external import merge_data_config  # what evaluation reads back from a checkpoint

    ckpt = {"hyperparameters": {"data": {**old_default, "root": str(tmp_path)}}}
    merged = merge_data_config(ckpt, {"root": str(tmp_path / "other")}, "x.pth", "all")
    assert "synthetic" not in merged and merged.source.generator.n_patients == 100
    assert merged.source.generate_if_missing is False  # another folder is never overwritten by the generator


def test_medmnist_through_the_xray_datamodule(tmp_path):
    arrays = _npz(tmp_path / "pneumo.npz", n_labels=2)
    dm = XRayDataModule(str(tmp_path), image_size=32, seed=0, augment_on="device",
                        source={"_target_": "medens.data.xray_readers.MedMNISTReader", "path": "pneumo.npz"})
    assert dm.labels == ("label_0", "label_1")  # from the file, before setup
    dm.setup()
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 12, "val": 4, "test": 5}  # the file's split
    assert dm.cache is None and dm.io_contract()["source"] == "medmnist:pneumo.npz"
    item = dm.datasets["test"][3]
    assert item["image"].shape == (3, 32, 32) and item["case_id"] == "test_3"
    np.testing.assert_array_equal(item["label"].numpy(), arrays["test_labels"][3])
    train = dm.datasets["train"][0]  # on-device augmentation: uint8 + parameters
    assert train["image"].dtype == torch.uint8 and train["image"].shape == (1, 32, 32) and "augment" in train
    with pytest.raises(DataError, match="2 label columns but 3 label_names"):
        MedMNISTReader(path=str(tmp_path / "pneumo.npz"), label_names=["a", "b", "c"]).labels(tmp_path, ())


def test_bad_source_is_named_and_readers_are_allowed_in_checkpoints():
    with pytest.raises(ConfigError, match=r"data.source='cheXpert': not an X-ray reader; short names are"):
        build_xray_reader("cheXpert")
    with pytest.raises(ConfigError, match=r"data.source._target_='os.system': not an X-ray reader class"):
        build_xray_reader({"_target_": "os.system"})
    with pytest.raises(ConfigError, match=r"data.source \(medens.data.xray_readers.NIHReader\).*unexpected"):
        build_xray_reader({"_target_": "medens.data.xray_readers.NIHReader", "imagedir": "x"})
    assert isinstance(build_xray_reader("synthetic_nih"), SyntheticNIHReader)
    for cls in (NIHReader, SyntheticNIHReader, MedMNISTReader):
        assert target_refusal(f"{cls.__module__}.{cls.__qualname__}") is None
        assert build_xray_reader(cls().config()) == cls()  # the config a checkpoint records rebuilds it


@dataclass
class FolderPerLabelReader(XRayReader):
    """The README's worked example: `<label>/<patient>_<n>.png`, one folder per finding (no table)."""

    name: ClassVar[str] = "folders"

    def list_cases(self, root: Path, labels, missing_images: str) -> XRayCases:
        rows = [{CASE: f"{p.parent.name}/{p.name}", PATIENT: p.name.split("_")[0],
                 TARGETS: np.array([float(p.parent.name == n) for n in labels], dtype=np.float32)}
                for p in sorted(Path(root).glob("*/*.png"))]  # fmt: skip
        return XRayCases(pd.DataFrame(rows))

    def read_case(self, root: Path, case_id: str) -> Image.Image:
        return Image.open(Path(root) / case_id).convert("L")

    def image_folder(self, root: Path) -> Path:  # image files: the decoded-image cache reads them
        return Path(root)

    def fingerprint(self, root: Path, case_ids, mode: str = "stat") -> str:
        from medens.data.xray_cache import source_fingerprint

        return source_fingerprint(Path(root), case_ids, mode)


def test_a_new_reader_is_one_small_class(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("Mass", "Effusion"):
        (tmp_path / label).mkdir()
        for p in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(tmp_path / label / f"{label}{p}_0.png")
    dm = XRayDataModule(str(tmp_path), source=FolderPerLabelReader(), image_size=24, seed=0, val_fraction=0.25,
                        test_fraction=0.25, labels=("Mass", "Effusion"),
                        cache={"enabled": True, "dir": str(tmp_path / ".cache"), "workers": 1, "progress": False})
    dm.setup()
    assert dm.cache is not None and sum(len(d) for d in dm.datasets.values()) == 12
    assert dm.split_patient_ids("train").isdisjoint(dm.split_patient_ids("test"))
    item = dm.datasets["val"][0]
    assert item["image"].shape == (3, 24, 24) and float(item["label"].sum()) == 1.0
