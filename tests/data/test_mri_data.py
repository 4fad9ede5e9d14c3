"""MRI (BraTS) data layer: presets, discovery, transforms, caching, splits, synthetic set, bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from medens.data.mri import (
    LABEL_NAMES,
    BraTSDataModule,
    discover_cases,
    generate_brats_synthetic,
    map_labels,
    patient_id_from_case,
    resolve_label_map,
    write_prediction_nifti,
)
from medens.data.mri.synthetic import MARKER_FILE, read_marker
from medens.data.mri.transforms import LoadBraTSCased
from medens.errors import ConfigError, DataError

SHAPE = (32, 32, 32)
MODS_2021 = {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"}


def _affine(shift: float = 0.0) -> np.ndarray:
    a = np.diag([-1.0, -1.0, 1.0, 1.0])
    a[1, 3] = 31.0 + shift
    return a


def _save(path: Path, arr: np.ndarray, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, _affine() if affine is None else affine), str(path))


def _dm(root: Path, tmp_path: Path, **kw: object) -> BraTSDataModule:
    args = dict(
        root=str(root),
        patch_size=[16, 16, 16],
        samples_per_volume=2,
        batch_size=1,
        cache="memory",
        cache_dir=str(tmp_path / "cache"),
        val_fraction=0.25,
        test_fraction=0.25,
    )
    args.update(kw)
    return BraTSDataModule(**args)


@pytest.fixture(scope="module")
def synth_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_brats_synthetic(
        tmp_path_factory.mktemp("synth") / "brats", n_cases=4, shape=SHAPE, seed=3
    )


@pytest.fixture()
def synth(synth_base: Path, tmp_path: Path) -> Path:
    """A private, mutable copy of the small synthetic set (4 cases, 32^3, 2021 naming)."""
    dst = tmp_path / "brats"
    shutil.copytree(synth_base, dst)
    return dst


# ---------------------------------------------------------------- label presets
RAW_CODES = np.array([0, 1, 2, 3, 4], dtype=np.float32)


@pytest.mark.parametrize(
    ("preset", "raw", "expected"),
    [
        ("brats2015", [0, 1, 2, 3, 4], [0, 1, 2, 1, 3]),  # 3 non-enhancing -> core, 4 enhancing
        ("brats2021", [0, 1, 2, 4], [0, 1, 2, 3]),  # 4 ET
        ("brats2018", [0, 1, 2, 4], [0, 1, 2, 3]),  # alias of 2018-2021 scheme
        ("brats2023", [0, 1, 2, 3], [0, 1, 2, 3]),  # 3 ET
        ("msd_task01", [0, 1, 2, 3], [0, 2, 1, 3]),  # 1 edema, 2 non-enhancing, 3 enhancing
    ],
)
def test_label_preset_maps_hand_written_volume(preset: str, raw: list[int], expected: list[int]) -> None:
    vol = np.array(raw, dtype=np.float32).reshape(1, 1, -1).repeat(2, axis=0)  # float like OTMultiClass
    out = map_labels(vol, resolve_label_map(preset), "case7", "seg.nii.gz")
    assert out.dtype == np.uint8
    assert out[0, 0].tolist() == expected and out[1, 0].tolist() == expected


@pytest.mark.parametrize(("preset", "bad_code"), [("brats2021", 3), ("brats2023", 4), ("msd_task01", 4)])
def test_label_outside_preset_is_rejected(preset: str, bad_code: int) -> None:
    vol = np.array([0, 1, bad_code], dtype=np.uint8).reshape(1, 1, 3)
    with pytest.raises(DataError, match=rf"case9.*lab\.nii\.gz.*\[{bad_code}\]"):
        map_labels(vol, resolve_label_map(preset), "case9", "lab.nii.gz")


def test_explicit_label_map_and_config_errors() -> None:
    m = resolve_label_map("brats2021", {"1": 2, "5": 3})  # YAML-style string keys; overrides the preset
    assert m == {0: 0, 1: 2, 5: 3}
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_label_map("brats1999")
    with pytest.raises(ConfigError, match="out of range"):
        resolve_label_map(None, {1: 7})
    with pytest.raises(DataError, match="not integers"):
        map_labels(np.array([[[0.0, 1.5]]]), m, "c", "f")


# ---------------------------------------------------------------- discovery and naming
def test_both_namings_discovered_with_modality_order(tmp_path: Path) -> None:
    r21 = generate_brats_synthetic(tmp_path / "b21", n_cases=2, shape=SHAPE, naming="2021")
    r23 = generate_brats_synthetic(tmp_path / "b23", n_cases=2, shape=SHAPE, naming="2023")
    mods = ["flair", "t1", "t1ce"]
    c21, e21 = discover_cases(r21, mods, "auto")
    c23, e23 = discover_cases(r23, ["t2f", "t1n", "t1c"], "auto")  # 2023 spellings are aliases
    assert not e21 and not e23
    assert [c.case_id for c in c21] == ["BraTS2021_00000", "BraTS2021_00001"]
    assert [c.case_id for c in c23] == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000"]
    assert c21[0].naming == "2021" and c23[0].naming == "2023"
    assert [p.name for p in c21[0].image_files] == [
        "BraTS2021_00000_flair.nii.gz",
        "BraTS2021_00000_t1.nii.gz",
        "BraTS2021_00000_t1ce.nii.gz",
    ]
    assert [p.name for p in c23[1].image_files] == [
        "BraTS-GLI-00001-000-t2f.nii.gz",
        "BraTS-GLI-00001-000-t1n.nii.gz",
        "BraTS-GLI-00001-000-t1c.nii.gz",
    ]
    assert c23[0].label_file is not None and c23[0].label_file.name.endswith("-seg.nii.gz")
    # a forced naming that does not fit is an error naming the case and the missing file pattern
    _, errs = discover_cases(r21, mods, "2023")
    assert set(errs) == {"BraTS2021_00000", "BraTS2021_00001"}
    assert "*-t2f.nii*" in str(errs["BraTS2021_00000"])


def test_modality_order_respected_in_channels(synth: Path, tmp_path: Path) -> None:
    dm = _dm(synth, tmp_path, modalities=["flair", "t1"], cache="none", verify=False)
    dm.setup()
    assert dm.num_channels == 2 and dm.modalities == ["flair", "t1"]
    assert dm.label_names == list(LABEL_NAMES) == ["background", "necrotic_core", "edema", "enhancing"]
    item = dm.dataset("predict")[0]
    cid = item["case_id"]
    s, e = item["crop_start"].tolist(), item["crop_end"].tolist()
    box = tuple(slice(a, b) for a, b in zip(s, e, strict=True))
    for ch, mod in enumerate(["flair", "t1"]):
        raw = nib.load(str(synth / cid / f"{cid}_{mod}.nii.gz")).get_fdata(dtype=np.float32)
        brain = raw != 0
        expected = np.where(brain, (raw - raw[brain].mean()) / raw[brain].std(), 0)[box]
        np.testing.assert_allclose(item["image"][ch].numpy(), expected, atol=1e-4)


def test_custom_file_patterns(tmp_path: Path) -> None:
    root = tmp_path / "custom"
    for cid in ("p1", "p2"):
        _save(root / cid / "img_A.nii.gz", np.ones(SHAPE, np.float32))
        _save(root / cid / "img_B.nii.gz", np.ones(SHAPE, np.float32))
        _save(root / cid / "truth.nii.gz", np.zeros(SHAPE, np.uint8))
    cases, errs = discover_cases(
        root, ["adc", "t2"], "custom", {"adc": "img_A.nii*", "t2": "img_B.nii*", "seg": "truth.nii*"}
    )
    assert not errs and [c.image_files[0].name for c in cases] == ["img_A.nii.gz", "img_A.nii.gz"]
    with pytest.raises(ConfigError, match="file_patterns"):
        BraTSDataModule(root=str(root), naming="custom")


# ---------------------------------------------------------------- real samples
def test_brats2015_two_modality_config_loads_one_case(samples_dir: Path, tmp_path: Path) -> None:
    src = samples_dir / "brats2015" / "brats_2013_pat0004_1"
    root = tmp_path / "b15"
    root.mkdir()
    os.symlink(src, root / src.name)  # one case only (real volumes are 240x240x155)
    # default four modalities: this layout has only FLAIR and T1c -> a clear error from headers alone
    with pytest.raises(DataError, match=r"brats_2013_pat0004_1.*missing modality 't1'"):
        BraTSDataModule(root=str(root), label_preset="brats2015", cache="none").setup()

    dm = BraTSDataModule(
        root=str(root),
        modalities=["flair", "t1ce"],
        label_preset="brats2015",
        cache="none",
        verify=False,
        val_fraction=0.0,
        test_fraction=0.0,
    )
    dm.setup()
    assert dm.split_case_ids("train") == ["brats_2013_pat0004_1"] and dm.cases[0].naming == "deepmedic"
    item = dm.dataset("predict")[0]
    img, lab = item["image"], item["label"]
    assert img.dtype == torch.float32 and img.shape[0] == 2 and lab.shape == (1, *img.shape[1:])
    assert item["original_shape"].tolist() == [240, 240, 155]
    assert all(n < f for n, f in zip(img.shape[1:], (240, 240, 155), strict=True))  # cropped to the brain
    ref = nib.load(str(src / "Flair_subtrMeanDivStd.nii.gz"))
    np.testing.assert_allclose(item["affine"].numpy(), ref.affine)
    # 2015 codes: 1 necrosis + 3 non-enhancing -> class 1, 4 -> class 3
    raw = np.asarray(nib.load(str(src / "OTMultiClass.nii.gz")).dataobj)
    counts = torch.bincount(lab.flatten(), minlength=4).tolist()
    assert counts[1] == int(((raw == 1) | (raw == 3)).sum()) and counts[3] == int((raw == 4).sum())
    # z-score over the brain mask (the background of these files is a non-zero constant)
    mask = np.asarray(nib.load(str(src / "brainmask.nii.gz")).dataobj) > 0.5
    s, e = item["crop_start"].tolist(), item["crop_end"].tolist()
    m = torch.from_numpy(mask[s[0] : e[0], s[1] : e[1], s[2] : e[2]])
    for c in range(2):
        assert abs(float(img[c][m].mean())) < 1e-3 and abs(float(img[c][m].std()) - 1) < 1e-3
        assert float(img[c][~m].abs().max()) == 0.0


def test_brats2023_sample_without_labels(samples_dir: Path, tmp_path: Path) -> None:
    root = samples_dir / "brats2023_sample"
    with pytest.raises(DataError, match=r"BraTS-GLI-00001-000.*missing ground truth 'seg'"):
        BraTSDataModule(root=str(root), label_preset="brats2023", cache="none").setup()
    dm = BraTSDataModule(
        root=str(root), label_preset="brats2023", require_label=False, cache="none", verify=False
    )
    dm.setup()
    assert dm.split_case_ids("predict") == ["BraTS-GLI-00001-000"] and dm.split_case_ids("train") == []
    batch = next(iter(dm.predict_dataloader()))
    assert "label" not in batch and batch["case_id"] == ["BraTS-GLI-00001-000"]
    assert batch["image"].shape[:2] == (1, 4) and batch["original_shape"][0].tolist() == [240, 240, 155]
    with pytest.raises(DataError, match="no labelled training cases"):
        dm.train_dataloader()


# ---------------------------------------------------------------- transforms
def test_zscore_over_nonzero_voxels_and_brain_crop(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "z"
    brain = np.zeros(SHAPE, bool)
    brain[8:24, 10:20, 4:28] = True
    for k, (mod, suf) in enumerate(MODS_2021.items()):
        if mod == "seg":
            seg = np.zeros(SHAPE, np.uint8)
            seg[12:14, 12:14, 10:12] = 4
            _save(root / "c1" / f"c1{suf}.nii.gz", seg)
        else:
            vals = np.where(brain, rng.normal(100 * (k + 1), 10 * (k + 1), SHAPE), 0).astype(np.float32)
            _save(root / "c1" / f"c1{suf}.nii.gz", vals)
    dm = _dm(root, tmp_path, cache="none", verify=False, val_fraction=0, test_fraction=0)
    dm.setup()
    item = dm.dataset("predict")[0]
    assert item["crop_start"].tolist() == [8, 10, 4] and item["crop_end"].tolist() == [24, 20, 28]
    img = item["image"]
    assert img.shape == (4, 16, 10, 24)  # exactly the brain box
    for c in range(4):
        assert abs(float(img[c].mean())) < 1e-4 and abs(float(img[c].std()) - 1) < 1e-3
    assert int((item["label"] == 3).sum()) == 8  # label 4 -> enhancing class 3


def test_patch_shape_and_positive_sampling(synth: Path, tmp_path: Path) -> None:
    dm = _dm(synth, tmp_path, samples_per_volume=3, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (6, 4, 16, 16, 16) and batch["label"].shape == (6, 1, 16, 16, 16)
    assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.long
    assert int(batch["label"].max()) <= 3 and len(batch["case_id"]) == 6
    # small patches (centre index 3) so that MONAI never has to shift a centre to fit the volume
    centres = {}
    for ratio in (float("inf"), 0.0):
        sm = _dm(
            synth,
            tmp_path,
            patch_size=[6, 6, 6],
            pos_neg_ratio=ratio,
            samples_per_volume=8,
            augment={"enabled": False},
        )
        sm.setup("fit")
        ds = sm.dataset("train")
        centres[ratio] = [
            (int(p["label"][0, 3, 3, 3]), bool((p["image"][:, 3, 3, 3] != 0).any()))
            for i in range(len(ds))
            for p in ds[i]
        ]
    assert len(centres[0.0]) == 16
    assert all(lab > 0 for lab, _ in centres[float("inf")])  # positives: centred on tumour
    assert all(lab == 0 and in_brain for lab, in_brain in centres[0.0])  # negatives: brain, not tumour


def test_patch_larger_than_volume_is_padded(synth: Path, tmp_path: Path) -> None:
    dm = _dm(synth, tmp_path, patch_size=[40, 36, 16], samples_per_volume=1)
    dm.setup()
    out = dm.dataset("train")[0][0]
    assert tuple(out["image"].shape) == (4, 40, 36, 16)


def test_prediction_written_back_aligned_with_input(synth: Path, tmp_path: Path) -> None:
    dm = _dm(synth, tmp_path)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    cid = batch["case_id"][0]
    out = write_prediction_nifti(
        batch["label"][0], batch, tmp_path / "pred.nii.gz", index=0, label_map=dm.label_map
    )
    seg_path = synth / cid / f"{cid}_seg.nii.gz"
    written, ref = nib.load(str(out)), nib.load(str(seg_path))
    np.testing.assert_allclose(written.affine, ref.affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(ref.dataobj))  # raw codes 1/2/4


# ---------------------------------------------------------------- caching
@pytest.mark.parametrize("cache", ["none", "memory", "disk"])
def test_cache_modes_give_identical_items(synth: Path, tmp_path: Path, cache: str) -> None:
    ref = _dm(synth, tmp_path, cache="none", verify=False)
    ref.setup()
    dm = _dm(synth, tmp_path, cache=cache)
    dm.prepare_data()
    dm.setup()
    for split in ("train", "val", "test"):
        assert dm.split_case_ids(split) == ref.split_case_ids(split)
    a, b = ref.dataset("val")[0], dm.dataset("val")[0]
    assert a["case_id"] == b["case_id"]
    for key in ("image", "label", "affine", "crop_start", "original_shape"):
        assert torch.equal(a[key], b[key]), key
    # the cached copy is not modified by the random train transforms
    train = dm.dataset("train")
    before = [train.decoded[i]["image"].clone() for i in range(len(train))]
    for i in range(len(train)):
        train[i]
    assert all(torch.equal(x, train.decoded[i]["image"]) for i, x in enumerate(before))


def test_disk_cache_is_reused_and_invalidated(
    synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = tmp_path / "cache"
    dm = _dm(synth, tmp_path, cache="disk")
    dm.prepare_data()
    dm.setup()
    files = sorted(cache_dir.glob("*.pt"))
    assert len(files) == 4
    mtimes = [f.stat().st_mtime_ns for f in files]
    expected = dm.dataset("val")[0]["image"]

    def boom(self: object, data: object) -> None:
        raise AssertionError("decoded a NIfTI although the disk cache holds it")

    monkeypatch.setattr(LoadBraTSCased, "__call__", boom)
    dm2 = _dm(synth, tmp_path, cache="disk")
    dm2.prepare_data()
    dm2.setup()
    assert torch.equal(dm2.dataset("val")[0]["image"], expected)
    assert sorted(cache_dir.glob("*.pt")) == files and [f.stat().st_mtime_ns for f in files] == mtimes
    monkeypatch.undo()
    # a changed decode configuration (label map) never reads the old entries
    dm3 = _dm(synth, tmp_path, cache="disk", label_map={0: 0, 1: 1, 2: 2, 4: 1})
    dm3.prepare_data()
    dm3.setup()
    assert len(list(cache_dir.glob("*.pt"))) == 8
    assert int(dm3.dataset("val")[0]["label"].max()) <= 2


# ---------------------------------------------------------------- splits and determinism
def test_patient_disjoint_split(tmp_path: Path) -> None:
    root = generate_brats_synthetic(tmp_path / "b23", n_cases=10, shape=(16, 16, 16), naming="2023")
    # follow-up scans: cases 1..4 become second time points of patients 5..8
    for i in range(1, 5):
        os.rename(root / f"BraTS-GLI-{i:05d}-000", root / f"BraTS-GLI-{i + 4:05d}-001")
    assert patient_id_from_case("BraTS-GLI-00005-001") == "BraTS-GLI-00005"
    assert patient_id_from_case("brats_2013_pat0004_1") == "brats_2013_pat0004"
    assert patient_id_from_case("BraTS2021_00012") == "BraTS2021_00012"
    dm = _dm(root, tmp_path, cache="none", verify=False, val_fraction=0.2, test_fraction=0.2, seed=5)
    dm.setup()
    dm.setup()  # idempotent
    splits = {s: dm.split_case_ids(s) for s in ("train", "val", "test")}
    assert sum(map(len, splits.values())) == 10 and all(splits.values())
    pats = {s: {patient_id_from_case(c) for c in ids} for s, ids in splits.items()}
    assert (
        not (pats["train"] & pats["val"])
        and not (pats["train"] & pats["test"])
        and not (pats["val"] & pats["test"])
    )
    again = _dm(root, tmp_path, cache="none", verify=False, val_fraction=0.2, test_fraction=0.2, seed=5)
    again.setup()
    assert {s: again.split_case_ids(s) for s in splits} == splits


def _epochs(dm: BraTSDataModule, epochs: list[int]) -> list[list[torch.Tensor]]:
    """Like Lightning: one DataLoader, ``sampler.set_epoch(e)`` before each epoch."""
    dl = dm.train_dataloader()
    out = []
    for e in epochs:
        dl.sampler.set_epoch(e)
        out.append([torch.cat([b["image"].flatten(), b["label"].flatten().float()]) for b in dl])
    return out


def test_train_loader_deterministic_given_seed_and_epoch(synth: Path, tmp_path: Path) -> None:
    kw = dict(seed=11, val_fraction=0, test_fraction=0)
    a, b = _dm(synth, tmp_path, num_workers=0, **kw), _dm(synth, tmp_path, num_workers=1, **kw)
    a.setup()
    b.setup()
    torch.manual_seed(0)
    np.random.seed(0)
    a0, a1 = _epochs(a, [0, 1])
    torch.manual_seed(123)  # global RNG state must not matter
    np.random.seed(123)
    (b1,) = _epochs(b, [1])  # "resumed" directly at epoch 1, and with a worker process
    assert len(a1) == len(b1) == 4
    assert all(torch.equal(x, y) for x, y in zip(a1, b1, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a0, a1, strict=True))
    # the same samples in another order would not be enough: the patches themselves change per epoch
    assert {round(float(x.sum()), 3) for x in a0} != {round(float(x.sum()), 3) for x in a1}
    c = _dm(synth, tmp_path, num_workers=0, **{**kw, "seed": 12})
    c.setup()
    assert not all(torch.equal(x, y) for x, y in zip(a1, _epochs(c, [1])[0], strict=True))


def test_loaders_shard_by_rank(synth: Path, tmp_path: Path) -> None:
    dm = _dm(synth, tmp_path, val_fraction=0, test_fraction=0)
    dm.setup()
    seen: dict[str, list[str]] = {"train": [], "predict": []}
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        train = dm.train_dataloader()
        train.sampler.set_epoch(3)
        seen["train"] += [cid for b in train for cid in b["case_id"][::2]]  # 2 patches per case
        seen["predict"] += [cid for b in dm.predict_dataloader() for cid in b["case_id"]]
    assert sorted(seen["train"]) == sorted(dm.split_case_ids("train")) and len(seen["train"]) == 4
    assert sorted(seen["predict"]) == dm.split_case_ids("predict")  # every case exactly once


# ---------------------------------------------------------------- synthetic set
def test_synthetic_generation_deterministic_and_contrasts(tmp_path: Path) -> None:
    a = generate_brats_synthetic(tmp_path / "a", n_cases=2, shape=(40, 36, 24), seed=7)
    b = generate_brats_synthetic(tmp_path / "b", n_cases=2, shape=(40, 36, 24), seed=7)
    c = generate_brats_synthetic(tmp_path / "c", n_cases=2, shape=(40, 36, 24), seed=8)
    cid = "BraTS2021_00001"
    load = lambda root, m: np.asarray(nib.load(str(root / cid / f"{cid}_{m}.nii.gz")).dataobj)  # noqa: E731
    assert load(a, "t1").shape == (40, 36, 24)
    for m in ("t1", "t1ce", "t2", "flair", "seg"):
        np.testing.assert_array_equal(load(a, m), load(b, m))
    assert not np.array_equal(load(a, "seg"), load(c, "seg"))
    seg = load(a, "seg")
    assert set(np.unique(seg).tolist()) == {0, 1, 2, 4}
    mean = {m: {k: load(a, m)[seg == k].mean() for k in (1, 2, 4)} for m in ("t1ce", "flair", "t2")}
    brain = {m: load(a, m)[(seg == 0) & (load(a, m) > 0)].mean() for m in ("t1ce", "flair", "t2")}
    assert (
        mean["t1ce"][4] > 1.5 * brain["t1ce"] and mean["t1ce"][1] < 0.6 * mean["t1ce"][4]
    )  # ET bright, NCR dark
    assert mean["flair"][2] > 1.5 * brain["flair"] and mean["t2"][2] > 1.5 * brain["t2"]  # oedema bright
    assert json.loads((a / MARKER_FILE).read_text())["seed"] == 7
    with pytest.raises(ConfigError, match="already holds"):
        generate_brats_synthetic(a, n_cases=1, shape=(16, 16, 16))


def test_synthetic_through_datamodule_and_regeneration(tmp_path: Path) -> None:
    root = tmp_path / "gen"
    syn = {"n_cases": 3, "shape": [24, 24, 20], "seed": 1}
    dm = _dm(root, tmp_path, generate_if_missing=True, synthetic=syn, val_fraction=0, test_fraction=0)
    dm.prepare_data()
    dm.setup()
    assert len(dm.split_case_ids("train")) == 3
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 4, 16, 16, 16) and int(batch["label"].max()) <= 3
    seg = root / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz"
    mtime = seg.stat().st_mtime_ns
    _dm(root, tmp_path, generate_if_missing=True, synthetic=syn).prepare_data()  # same params: untouched
    assert seg.stat().st_mtime_ns == mtime
    dm2 = _dm(root, tmp_path, generate_if_missing=True, synthetic={**syn, "n_cases": 5})
    dm2.prepare_data()  # params differ: regenerated
    assert read_marker(root)["n_cases"] == 5 and len(list(root.glob("BraTS2021_*"))) == 5
    # a folder with real data (no marker) is never overwritten
    real = tmp_path / "real"
    shutil.copytree(root, real)
    (real / MARKER_FILE).unlink()
    _dm(real, tmp_path, generate_if_missing=True, synthetic={**syn, "n_cases": 2}).prepare_data()
    assert len(list(real.glob("BraTS2021_*"))) == 5


# ---------------------------------------------------------------- bad input
def _break(root: Path, kind: str) -> tuple[str, str]:
    """Damage case BraTS2021_00001 in one way; returns (case id, file name the error must name)."""
    cid = "BraTS2021_00001"
    d = root / cid
    if kind == "missing_modality":
        (d / f"{cid}_flair.nii.gz").unlink()
        return cid, "flair"
    if kind == "shape":
        _save(d / f"{cid}_t2.nii.gz", np.ones((32, 32, 30), np.float32))
        return cid, f"{cid}_t2.nii.gz"
    if kind == "affine":
        arr = np.asarray(nib.load(str(d / f"{cid}_t2.nii.gz")).dataobj)
        _save(d / f"{cid}_t2.nii.gz", arr, _affine(shift=5.0))
        return cid, f"{cid}_t2.nii.gz"
    if kind == "label_value":
        seg = np.asarray(nib.load(str(d / f"{cid}_seg.nii.gz")).dataobj).copy()
        seg[seg == 1] = 3  # a BraTS 2023 code in a 2021 set
        _save(d / f"{cid}_seg.nii.gz", seg)
        return cid, f"{cid}_seg.nii.gz"
    if kind == "truncated":
        f = d / f"{cid}_t1ce.nii.gz"
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
        return cid, f"{cid}_t1ce.nii.gz"
    raise AssertionError(kind)


BAD_KINDS = {
    "missing_modality": r"missing modality 'flair'",
    "shape": r"has shape \(32, 32, 30\)",
    "affine": r"different affine",
    "label_value": r"label value\(s\) \[3\] are not in the label mapping",
    "truncated": r"cannot decode .*(truncated or corrupt|EOFError)",
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_bad_input_error_or_counted_skip(synth: Path, tmp_path: Path, kind: str) -> None:
    cid, fname = _break(synth, kind)
    with pytest.raises(DataError) as info:
        _dm(synth, tmp_path).setup()
    msg = str(info.value)
    assert "1 bad BraTS case" in msg and cid in msg and fname in msg
    assert __import__("re").search(BAD_KINDS[kind], msg), msg
    dm = _dm(synth, tmp_path, on_error="skip")
    dm.setup()
    assert list(dm.skipped_cases) == [cid] and fname in dm.skipped_cases[cid]
    assert cid not in dm.split_case_ids("all") and len(dm.split_case_ids("all")) == 3
    assert cid not in {*dm.split_case_ids("train"), *dm.split_case_ids("val"), *dm.split_case_ids("test")}


def test_bad_input_found_by_disk_cache_warmup(synth: Path, tmp_path: Path) -> None:
    cid, fname = _break(synth, "truncated")
    dm = _dm(synth, tmp_path, cache="disk", on_error="skip")
    dm.prepare_data()  # rank 0 decodes, records the failure beside the cache
    assert len(list((tmp_path / "cache").glob("*.error.json"))) == 1
    dm.setup()
    assert list(dm.skipped_cases) == [cid] and fname in dm.skipped_cases[cid]
    with pytest.raises(DataError, match=cid):
        _dm(synth, tmp_path, cache="disk").setup()


def test_config_errors_fail_fast(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cache"):
        BraTSDataModule(root=str(tmp_path), cache="ram")
    with pytest.raises(ConfigError, match="on_error"):
        BraTSDataModule(root=str(tmp_path), on_error="ignore")
    with pytest.raises(ConfigError, match="augment"):
        BraTSDataModule(root=str(tmp_path), augment={"flip_probability": 0.5})
    with pytest.raises(ConfigError, match="twice"):
        BraTSDataModule(root=str(tmp_path), modalities=["t1c", "t1ce"])
    with pytest.raises(ConfigError, match="synthetic"):
        BraTSDataModule(root=str(tmp_path), synthetic={"ncases": 3})
    with pytest.raises(DataError, match="does not exist"):
        BraTSDataModule(root=str(tmp_path / "nope")).setup()


def test_hydra_instantiation_with_omegaconf_containers(synth: Path, tmp_path: Path) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "_target_": "medens.data.mri.BraTSDataModule",
            "root": str(synth),
            "modalities": ["t2f", "t1c"],
            "label_map": {"0": 0, "1": 1, "2": 2, "4": 3},
            "patch_size": [8, 8, 8],
            "augment": {"flip_prob": 0.0},
            "synthetic": {"n_cases": 2, "shape": [16, 16, 16]},
            "cache_dir": str(tmp_path / "cache"),
        }
    )
    dm = instantiate(cfg)
    dm.prepare_data()
    dm.setup()
    assert dm.modalities == ["flair", "t1ce"] and dm.label_map[4] == 3
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 2, 8, 8, 8)
