"""MRI readers (one per BraTS naming scheme, chosen by `data.source`) and the MONAI transform chains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Rand3DElasticd, RandAdjustContrastd, RandAffined

from medens.checkpoint.safe_build import validate_safe_config
from medens.data.mri import (
    BraTS2015Reader,
    BraTS2021Reader,
    BraTS2023Reader,
    BraTSDataModule,
    BraTSReader,
    SyntheticBraTSReader,
    build_reader,
    generate_brats_synthetic,
)
from medens.data.mri.readers import reader_from_data_config
from medens.data.mri.transforms import build_decode_transform, build_train_transform, uncrop
from medens.errors import ConfigError, DataError, UnsafeCheckpointError

SHAPE = (20, 18, 16)


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("readers")
    return {n: generate_brats_synthetic(base / n, n_cases=2, shape=SHAPE, naming=n) for n in ("2021", "2023")}


def test_short_names_and_target_configs_build_the_reader_of_each_scheme() -> None:
    assert (
        type(build_reader("brats2023")) is BraTS2023Reader and build_reader("brats2015").naming == "deepmedic"
    )
    r = build_reader({"_target_": "medens.data.mri.readers.BraTS2021Reader", "label_map": {"4": 3, "1": 1}})
    assert isinstance(r, BraTS2021Reader) and r.codes == {0: 0, 1: 1, 4: 3}
    assert build_reader(r.config()).config() == r.config()  # what a checkpoint records rebuilds it
    assert BraTS2015Reader().codes[3] == 1 and BraTS2023Reader().codes[3] == 3  # label codes per release
    with pytest.raises(ConfigError, match="short names"):
        build_reader("brats1999")
    with pytest.raises(ConfigError, match="not a BraTS reader class"):
        build_reader({"_target_": "medens.data.mri.BraTSDataModule"})
    with pytest.raises(ConfigError, match="naming"):
        build_reader(
            {"_target_": "medens.data.mri.readers.BraTS2021Reader", "naming": "2023"}
        )  # fixed by class


def test_each_reader_lists_its_own_scheme_only(sets: dict[str, Path]) -> None:
    mods = ["flair", "t1ce"]
    cases, errors = BraTS2023Reader().list_cases(sets["2023"], mods)
    assert not errors and [c.case_id for c in cases] == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000"]
    assert cases[0].image_files[0].name.endswith("-t2f.nii.gz")
    _, errors = BraTS2021Reader().list_cases(sets["2023"], mods)
    assert set(errors) == {"BraTS-GLI-00000-000", "BraTS-GLI-00001-000"} and "*_flair.nii*" in str(
        errors["BraTS-GLI-00000-000"]
    )
    auto, errors = BraTSReader().list_cases(sets["2021"], mods)
    assert not errors and auto[0].naming == "2021"
    assert BraTS2023Reader().patient_id("BraTS-GLI-00005-001") == "BraTS-GLI-00005"
    assert BraTSReader(patient_id_pattern=r"^(P\d+)_").patient_id("P12_scan2") == "P12"


def test_fingerprint_changes_with_label_codes_and_files(sets: dict[str, Path]) -> None:
    reader = BraTS2021Reader()
    (case, *_), _ = reader.list_cases(sets["2021"], ["t1"])
    fp = reader.fingerprint(case)
    assert fp == BraTS2021Reader().fingerprint(case)
    assert BraTS2021Reader(label_map={0: 0, 1: 1, 2: 2, 4: 1}).fingerprint(case) != fp
    st = case.image_files[0].stat()
    import os

    os.utime(case.image_files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert reader.fingerprint(case) != fp


def test_synthetic_reader_writes_once_and_reads_its_naming(tmp_path: Path) -> None:
    reader = SyntheticBraTSReader(generator={"n_cases": 2, "shape": [16, 16, 16], "naming": "2023"})
    assert reader.label_preset == "brats2023" and reader.codes[3] == 3
    assert reader.prepare(tmp_path / "s") and not reader.prepare(tmp_path / "s")  # second call: up to date
    cases, errors = reader.list_cases(tmp_path / "s", ["t1", "t2"])
    assert not errors and len(cases) == 2 and cases[0].naming == "2023"  # auto finds the naming
    assert not SyntheticBraTSReader(generate_if_missing=False).prepare(tmp_path / "never")
    assert not (tmp_path / "never").exists()
    with pytest.raises(ConfigError, match="synthetic"):
        SyntheticBraTSReader(generator={"ncases": 3})


def test_flat_keys_of_older_configs_still_build_a_reader(sets: dict[str, Path], tmp_path: Path) -> None:
    old = {"root": str(sets["2023"]), "naming": "2023", "label_preset": "brats2023", "modalities": ["t1n"],
           "file_patterns": None, "synthetic": None, "generate_if_missing": False, "cache": "none"}  # fmt: skip
    r = reader_from_data_config(old)
    assert type(r) is BraTSReader and r.naming == "2023" and r.codes[3] == 3
    dm = BraTSDataModule(**old)
    dm.setup()
    assert dm.split_case_ids("all") == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000"]
    assert dm.hparams["source"]["_target_"] == "medens.data.mri.readers.BraTSReader"
    old_default = {"naming": "auto", "label_preset": "brats2021", "synthetic": {"n_cases": 3}}
    assert isinstance(reader_from_data_config(old_default), SyntheticBraTSReader)
    with pytest.raises(ConfigError, match="belong under data.source"):
        BraTSDataModule(root=str(tmp_path), source="brats2023", label_preset="brats2021")
    with pytest.raises(ConfigError, match="Did you mean 'label_preset'"):
        BraTSDataModule(root=str(tmp_path), label_presets="brats2021")
    with pytest.raises(ConfigError, match="data.patch_sise'.*Did you mean 'patch_size'"):
        BraTSDataModule(root=str(tmp_path), source="brats2021", patch_sise=[8, 8, 8])


def test_checkpoint_safety_accepts_reader_targets_only() -> None:
    for name in (
        "BraTSReader",
        "BraTS2021Reader",
        "BraTS2023Reader",
        "BraTS2015Reader",
        "SyntheticBraTSReader",
    ):
        validate_safe_config({"data": {"source": {"_target_": f"medens.data.mri.readers.{name}"}}}, "c.pth")
    with pytest.raises(UnsafeCheckpointError, match="data.source._target_"):
        validate_safe_config(
            {"data": {"source": {"_target_": "medens.data.mri.readers.read_brats_case"}}}, "c.pth"
        )


def _item(root: Path, reader: BraTSReader, mods: list[str]) -> dict:
    (case, *_), _ = reader.list_cases(root, mods)
    d = {"case_id": case.case_id, "image_files": [str(p) for p in case.image_files], "modalities": mods}
    return {**d, "label_file": str(case.label_file)}


def test_crop_margin_box_and_its_inverse(sets: dict[str, Path]) -> None:
    reader = BraTS2021Reader()
    item = _item(sets["2021"], reader, ["t1", "flair"])
    raw = reader.read_case(dict(item))
    fg = (raw["brain_mask"][0] > 0) | (raw["label"][0] > 0)
    idx = [np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    for margin in (0, 3, 50):
        out = build_decode_transform(reader.codes, True, margin)(dict(item))
        start = [max(int(i[0]) - margin, 0) for i in idx]
        end = [min(int(i[-1]) + 1 + margin, s) for i, s in zip(idx, SHAPE, strict=True)]
        assert out["crop_start"].tolist() == start and out["crop_end"].tolist() == end
        assert out["crop_start"].dtype == torch.int64 and type(out["image"]) is torch.Tensor  # no MetaTensor
        back = uncrop(out["label"], out["crop_start"], out["original_shape"])
        np.testing.assert_array_equal(back, raw["label"])  # the inverse restores the full grid
        z = uncrop(out["image"], out["crop_start"], SHAPE)
        assert z.shape == (2, *SHAPE) and z.dtype == np.float32 and (z[:, ~fg] == 0).all()
    whole = build_decode_transform(reader.codes, False)(dict(item))
    assert whole["crop_start"].tolist() == [0, 0, 0] and tuple(whole["image"].shape[1:]) == SHAPE
    with pytest.raises(ValueError, match="does not fit"):
        uncrop(np.zeros((4, 4, 4)), [18, 0, 0], SHAPE)


def _patches(chain, decoded: dict, seed: int) -> list[dict]:
    chain.set_random_state(seed)
    return chain(dict(decoded))


def test_optional_augmentations_are_off_by_default_and_seeded(sets: dict[str, Path]) -> None:
    reader = BraTS2021Reader()
    decoded = build_decode_transform(reader.codes)(_item(sets["2021"], reader, ["t1", "flair"]))
    extra_types = (RandAffined, Rand3DElasticd, RandAdjustContrastd)
    default = build_train_transform([8, 8, 8], 1.0, 2, {})
    assert not any(isinstance(t, extra_types) for t in default.transforms)
    extra = {"affine_prob": 1.0, "elastic_prob": 1.0, "contrast_prob": 1.0, "elastic_magnitude": [1.0, 2.0]}
    chain = build_train_transform([8, 8, 8], 1.0, 2, extra)
    assert [type(t) for t in chain.transforms if isinstance(t, extra_types)] == list(extra_types)
    a, b = _patches(chain, decoded, 5), _patches(chain, decoded, 5)
    plain = _patches(build_train_transform([8, 8, 8], 1.0, 2, {}), decoded, 5)
    for p, q in zip(a, b, strict=True):
        assert p["image"].shape == (2, 8, 8, 8) and p["label"].dtype == torch.long
        assert set(p["label"].unique().tolist()) <= {0, 1, 2, 3}  # nearest: no blended label values
        assert torch.equal(p["image"], q["image"]) and torch.equal(p["label"], q["label"])  # same item seed
    assert not all(torch.equal(p["image"], r["image"]) for p, r in zip(a, plain, strict=True))
    with pytest.raises(ConfigError, match="augment"):
        build_train_transform([8, 8, 8], 1.0, 2, {"afine_prob": 0.5})


def test_original_brats2015_mha_release(tmp_path: Path) -> None:
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    seg = np.zeros((12, 10, 8), np.uint8)  # (z, y, x) as ITK stores it
    seg[4:6, 3:5, 2:4] = 4
    seg[6, 4, 3] = 3
    case = tmp_path / "HGG" / "brats_2013_pat0001_1"
    for i, role in enumerate(["MR_Flair", "MR_T1", "MR_T1c", "MR_T2", "OT"]):
        arr = (
            seg if role == "OT" else np.where(rng.random(seg.shape) > 0.2, rng.normal(100, 10, seg.shape), 0)
        )
        img = sitk.GetImageFromArray(arr.astype(np.uint8 if role == "OT" else np.float32))
        img.SetSpacing((0.9, 1.1, 1.5))
        img.SetOrigin((10.0, -20.0, 5.0))
        more = "Brain_3more" if role == "OT" else "Brain"
        folder = case / f"VSD.{more}.XX.O.{role}.{54512 + i}"
        folder.mkdir(parents=True)
        sitk.WriteImage(img, str(folder / f"{folder.name}.mha"))
    dm = BraTSDataModule(root=str(tmp_path), source="brats2015_mha", modalities=["flair", "t1ce"], cache="none",
                         val_fraction=0, test_fraction=0, crop_foreground=False)  # fmt: skip
    dm.setup()
    assert (
        dm.split_case_ids("train") == ["brats_2013_pat0001_1"]
        and dm.reader.patient_id("brats_2013_pat0001_1") == "brats_2013_pat0001"
    )
    item = dm.dataset("predict")[0]
    assert tuple(item["image"].shape) == (2, 8, 10, 12) and item["original_shape"].tolist() == [8, 10, 12]
    assert int((item["label"] == 3).sum()) == 8 and int((item["label"] == 1).sum()) == 1  # 2015 codes
    # world position of voxel (i, j, k): ITK's LPS point with x and y negated (RAS, as NIfTI)
    lps = sitk.ReadImage(str(next(case.glob("*MR_Flair*/*.mha")))).TransformIndexToPhysicalPoint((3, 2, 1))
    ras = item["affine"].numpy() @ np.array([3, 2, 1, 1.0])
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-6)
    (next(case.glob("*MR_T1c*/*.mha"))).unlink()
    with pytest.raises(DataError, match=r"brats_2013_pat0001_1.*0 files match the t1ce pattern"):
        BraTSDataModule(
            root=str(tmp_path), source="brats2015_mha", modalities=["flair", "t1ce"], cache="none"
        ).setup()
