"""CT data layer: geometry, resampling, patches, cache, splits, every source, and bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from medens.data.ct import CTDataModule
from medens.data.ct import io as ct_io
from medens.data.ct.geometry import (
    hu_window,
    resample_scan,
    sample_patch,
    voxel_to_world,
    world_to_voxel,
)
from medens.data.ct.labels import apply_rule, normalise_rule
from medens.data.ct.readers import (
    DicomReader,
    Luna16Reader,
    NoduleMNIST3DReader,
    SyntheticLuna16Reader,
    VOIReader,
)
from medens.data.ct.synthetic import ensure_luna16_synthetic, generate_luna16_synthetic
from medens.data.ct.transforms import CTAugment
from medens.errors import ConfigError, DataError

# ----------------------------------------------------------------------------------------- helpers


def write_mhd(
    path: Path, array_ijk: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None
) -> Path:
    """Write an int16 volume indexed [i, j, k] as .mhd/.raw with the given geometry."""
    img = sitk.GetImageFromArray(np.asarray(array_ijk, dtype=np.int16).transpose(2, 1, 0))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    img.SetDirection(tuple(float(d) for d in direction.ravel()))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=False)
    return path


def write_annotations(root: Path, rows: list[dict]) -> None:
    """annotations.csv in LUNA16 columns plus a malignancy column (labels read from the same table)."""
    pd.DataFrame(rows).to_csv(root / "annotations.csv", index=False)


def tiny_luna(root: Path) -> dict[str, Path]:
    """Two 24^3 scans at 1.5 mm; scan A has two nodules, scan B one."""
    vol = np.full((24, 24, 24), -800, dtype=np.int16)
    vol[10:14, 10:14, 10:14] = 50
    a = write_mhd(root / "scans" / "uidA.mhd", vol, spacing=(1.5, 1.5, 1.5), origin=(-18, -18, -18))
    b = write_mhd(root / "scans" / "uidB.mhd", vol, spacing=(1.5, 1.5, 1.5), origin=(100, 100, 100))
    return {"uidA": a, "uidB": b}


def dm_kwargs(root: Path, cache: Path, **kw) -> dict:
    base = dict(
        source=Luna16Reader(labels_csv=None),
        root=str(root),
        patch_size=8,
        cache_dir=str(cache),
        augment=False,
        val_fraction=0.0,
        test_fraction=0.0,
    )
    base.update(kw)
    return base


def auc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ct") / "synthetic"
    return generate_luna16_synthetic(root, n_patients=6, nodules_per_patient=4, seed=3)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ct_cache")


def synthetic_dm(synthetic: Path, cache: Path, **kw) -> CTDataModule:
    args = dict(
        source="luna16",
        root=str(synthetic),
        patch_size=32,
        cache_dir=str(cache),
        augment=False,
        val_fraction=0.2,
        test_fraction=0.2,
        seed=1,
    )
    args.update(kw)
    dm = CTDataModule(**args)
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------------------------------- geometry

# columns = world directions of i, j, k: i -> +y, j -> -x, k -> -z
PERMUTED = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])


def test_world_to_voxel_hand_computed_non_identity_direction():
    origin, spacing = (10.0, 20.0, 30.0), (0.5, 2.0, 3.0)
    # voxel (2, 3, 4): spacing * index = (1, 6, 12); world = origin + 1*(0,1,0) + 6*(-1,0,0) + 12*(0,0,-1)
    world = (10.0 - 6.0, 20.0 + 1.0, 30.0 - 12.0)
    np.testing.assert_allclose(world_to_voxel(world, origin, spacing, PERMUTED), [2, 3, 4], atol=1e-9)
    np.testing.assert_allclose(voxel_to_world([2, 3, 4], origin, spacing, PERMUTED), world, atol=1e-9)


def test_world_to_voxel_matches_simpleitk_oblique():
    theta = np.radians(30)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    direction = rot @ np.diag([1.0, -1.0, -1.0])
    img = sitk.Image(10, 10, 10, sitk.sitkInt16)
    img.SetSpacing((0.7, 1.3, 2.5))
    img.SetOrigin((5.0, -7.0, 100.0))
    img.SetDirection(tuple(direction.ravel()))
    rng = np.random.default_rng(0)
    for point in rng.uniform(-50, 50, size=(5, 3)):
        expected = img.TransformPhysicalPointToContinuousIndex(tuple(point))
        got = world_to_voxel(point, img.GetOrigin(), img.GetSpacing(), np.reshape(img.GetDirection(), (3, 3)))
        np.testing.assert_allclose(got, expected, atol=1e-9)


def test_mhd_geometry_lands_on_the_marked_voxel(tmp_path):
    vol = np.full((6, 8, 10), -1000, dtype=np.int16)
    vol[2, 3, 4] = 700  # the only bright voxel
    path = write_mhd(
        tmp_path / "s.mhd", vol, spacing=(0.5, 2.0, 3.0), origin=(10, 20, 30), direction=PERMUTED
    )
    scan = ct_io.read_scan(path)
    np.testing.assert_allclose(scan.direction, PERMUTED)
    np.testing.assert_allclose(scan.spacing, [0.5, 2.0, 3.0])
    idx = world_to_voxel((4.0, 21.0, 18.0), scan.origin, scan.spacing, scan.direction)
    assert tuple(np.round(idx).astype(int)) == (2, 3, 4)
    assert scan.array[tuple(np.round(idx).astype(int))] == 700
    patch = sample_patch(scan, (4.0, 21.0, 18.0), patch_size=8, spacing_mm=0.5)
    assert patch[4, 4, 4] == pytest.approx(700.0)
    assert np.argmax(patch) == np.ravel_multi_index((4, 4, 4), patch.shape)


def test_patch_is_full_size_and_padded_with_air_not_wrapped():
    vol = np.full((20, 20, 20), 200.0, dtype=np.float32)
    vol[17:, :, :] = 3000.0  # a bright slab at the far side: wrapping would bring it into the patch
    scan = ct_io.Scan(vol, np.zeros(3), np.ones(3), np.eye(3), Path("synthetic"))
    patch = sample_patch(scan, (1.0, 1.0, 1.0), patch_size=16, spacing_mm=1.0)
    assert patch.shape == (16, 16, 16)
    win = hu_window(patch, -1000, 400)
    # patch index a samples voxel i = a - 7: a <= 6 lies outside the scan
    assert np.all(win[:7] == 0.0) and np.all(win[:, :7] == 0.0) and np.all(win[:, :, :7] == 0.0)
    np.testing.assert_allclose(patch[7:, 7:, 7:], 200.0)  # inside: the scan, not cropped short
    assert patch.max() == pytest.approx(200.0)


def test_resampling_spacing_exact_on_linear_field():
    shape, spacing = np.array([30, 25, 12]), np.array([0.7, 0.9, 2.5])
    direction = np.diag([-1.0, 1.0, 1.0])
    origin = np.array([15.0, -10.0, 40.0])
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = voxel_to_world(idx.reshape(-1, 3), origin, spacing, direction).reshape(*shape, 3)

    def field(w):
        return 3.0 * w[..., 0] + 2.0 * w[..., 1] + 1.0 * w[..., 2]

    scan = ct_io.Scan(field(world).astype(np.float32), origin, spacing, direction, Path("ramp"))
    centre = voxel_to_world([15, 12, 6], origin, spacing, direction)
    for step in (1.0, 0.5):
        p = sample_patch(scan, centre, patch_size=8, spacing_mm=step).astype(np.float64)
        assert p[4, 4, 4] == pytest.approx(field(centre), abs=1e-3)
        np.testing.assert_allclose(np.diff(p, axis=0), 3.0 * step, atol=1e-3)
        np.testing.assert_allclose(np.diff(p, axis=1), 2.0 * step, atol=1e-3)
        np.testing.assert_allclose(np.diff(p, axis=2), 1.0 * step, atol=1e-3)
    iso = resample_scan(scan, 1.0)
    np.testing.assert_allclose(iso.spacing, [1.0, 1.0, 1.0])
    assert iso.shape == tuple(int(np.floor((n - 1) * s)) + 1 for n, s in zip(shape, spacing, strict=True))
    iso_idx = np.stack(np.meshgrid(*[np.arange(n) for n in iso.shape], indexing="ij"), -1).reshape(-1, 3)
    iso_world = voxel_to_world(iso_idx, iso.origin, iso.spacing, iso.direction).reshape(*iso.shape, 3)
    np.testing.assert_allclose(iso.array, field(iso_world), atol=2e-3)


def test_hu_window_range():
    out = hu_window(np.array([-3000.0, -1000.0, -300.0, 400.0, 2000.0]), -1000, 400)
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])
    assert out.dtype == np.float32
    with pytest.raises(ValueError):
        hu_window(np.zeros(3), 400, -1000)
    with pytest.raises(ConfigError):
        CTDataModule(hu_window=[400, -1000])


def test_malignancy_rule():
    rule = normalise_rule(None)
    assert [apply_rule(v, "score", rule, "t") for v in (1, 2, 2.5, 3, 4, 5)] == [
        0.0,
        0.0,
        None,
        None,
        1.0,
        1.0,
    ]
    as_benign = normalise_rule({"indeterminate": "benign"})
    assert apply_rule(3, "score", as_benign, "t") == 0.0
    assert (
        apply_rule("Malign", "binary", rule, "t") == 1.0 and apply_rule("Benign", "binary", rule, "t") == 0.0
    )
    with pytest.raises(DataError, match="outside the LIDC range"):
        apply_rule(7, "score", rule, "labels.csv")
    with pytest.raises(ConfigError):
        normalise_rule({"benign_max": 4, "malignant_min": 3})


# --------------------------------------------------------------------------------- synthetic LUNA16


def test_synthetic_set_through_luna16_loader(synthetic, shared_cache):
    labels = pd.read_csv(synthetic / "labels.csv")
    ann = pd.read_csv(synthetic / "annotations.csv")
    assert list(ann.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    assert len(list((synthetic / "subset0").glob("*.mhd"))) == 6
    dm = synthetic_dm(synthetic, shared_cache, patch_size=64, val_fraction=0.0, test_fraction=0.0)
    ds = dm.datasets["train"]
    n_indeterminate = int((labels["malignancy"] == 3).sum())
    assert len(ds) == len(labels) - n_indeterminate
    assert len(dm.excluded) == n_indeterminate
    diam = dict(
        zip(zip(labels.seriesuid, labels.nodule_id - 1, strict=True), labels.diameter_mm, strict=True)
    )
    feats, sizes, ys = [], [], []
    o = np.arange(64) - 32.0
    r = np.sqrt(sum(g**2 for g in np.meshgrid(o, o, o, indexing="ij")))
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (1, 64, 64, 64) and item["image"].dtype == torch.float32
        assert item["label"].dtype == torch.float32 and item["label"].shape == ()
        assert item["patient_id"].startswith("SYN-")
        uid, n = item["case_id"].rsplit("_", 1)
        assert item["diameter_mm"] == pytest.approx(diam[(uid, int(n))], abs=1e-3)
        x = item["image"][0].numpy()
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert x[32, 32, 32] > hu_window(np.array([-500.0]), -1000, 400)[0]  # centred on the nodule, not lung
        r0 = item["diameter_mm"] / 2
        feats.append(x[(r > 0.45 * r0) & (r < 0.8 * r0)].std())  # interior heterogeneity
        sizes.append(item["diameter_mm"])
        ys.append(int(item["label"]))
    assert 0 < sum(ys) < len(ys)
    # malignancy lives in texture/margin, not (only) size: sizes overlap, texture separates
    assert auc(sizes, ys) < 0.9
    assert auc(feats, ys) >= 0.9 and auc(feats, ys) > auc(sizes, ys)


def test_synthetic_generation_deterministic_and_regenerated_on_param_change(tmp_path):
    small = dict(n_patients=2, nodules_per_patient=2, scan_shape=(48, 48, 40))
    a = generate_luna16_synthetic(tmp_path / "a", seed=7, **small)
    b = generate_luna16_synthetic(tmp_path / "b", seed=7, **small)
    c = generate_luna16_synthetic(tmp_path / "c", seed=8, **small)
    raws = sorted(p.name for p in (a / "subset0").glob("*.raw"))
    assert raws and raws == sorted(p.name for p in (b / "subset0").glob("*.raw"))
    for name in raws:
        assert (a / "subset0" / name).read_bytes() == (b / "subset0" / name).read_bytes()
    assert (a / "annotations.csv").read_text() == (b / "annotations.csv").read_text()
    assert (a / "annotations.csv").read_text() != (c / "annotations.csv").read_text()

    d = tmp_path / "d"
    ensure_luna16_synthetic(d, seed=7, **small)
    stamp = (d / "annotations.csv").stat().st_mtime_ns
    ensure_luna16_synthetic(d, seed=7, **small)  # same params: untouched
    assert (d / "annotations.csv").stat().st_mtime_ns == stamp
    ensure_luna16_synthetic(d, seed=8, **small)  # other params: regenerated
    assert json.loads((d / "generator_params.json").read_text())["seed"] == 8
    assert (d / "annotations.csv").read_text() == (c / "annotations.csv").read_text()

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "annotations.csv").write_text("seriesuid\n")
    with pytest.raises(DataError, match="not a medens synthetic"):
        generate_luna16_synthetic(tmp_path / "real", **small)


def test_datamodule_generates_in_prepare_data(tmp_path):
    gen = dict(n_patients=3, nodules_per_patient=2, scan_shape=(48, 48, 40), seed=2)
    dm = CTDataModule(
        root=str(tmp_path / "syn"),
        source=SyntheticLuna16Reader(generator=gen),
        patch_size=16,
        cache_dir=str(tmp_path / "cache"),
        malignancy_rule={"indeterminate": "malignant"},
        val_fraction=0.0,
        test_fraction=0.0,
    )
    dm.prepare_data()
    assert json.loads((tmp_path / "syn" / "generator_params.json").read_text())["n_patients"] == 3
    dm.setup()
    assert len(dm.datasets["train"]) == len(pd.read_csv(tmp_path / "syn" / "annotations.csv"))
    assert dm.num_channels == 1


# --------------------------------------------------------------------------------------- the cache


def test_cache_hit_and_invalidation_on_window_change(synthetic, shared_cache, monkeypatch):
    reads = []
    real = ct_io.read_scan
    monkeypatch.setattr(ct_io, "read_scan", lambda p: reads.append(p) or real(p))
    cache = shared_cache / "hit"
    dm1 = synthetic_dm(synthetic, cache)
    n_scans = len(reads)
    assert n_scans == 6  # every scan read once, all of its nodules cut from it
    dm2 = synthetic_dm(synthetic, cache)
    assert len(reads) == n_scans  # cache hit: no scan read again
    assert dm2.cache_path == dm1.cache_path
    a, b = dm1.datasets["train"], dm2.datasets["train"]
    assert [r.case_id for r in a.records] == [r.case_id for r in b.records]
    assert torch.equal(a[0]["image"], b[0]["image"])
    for _ in range(2):  # later epochs do not touch the scans
        for batch in dm2.train_dataloader():
            assert batch["image"].shape[1:] == (1, 32, 32, 32)
    assert len(reads) == n_scans

    dm3 = synthetic_dm(synthetic, cache, hu_window=[-1200, 600])
    assert len(reads) == 2 * n_scans  # window changed: rebuilt
    assert dm3.cache_path != dm1.cache_path
    c = dm3.datasets["train"]
    assert [r.case_id for r in c.records] == [r.case_id for r in a.records]
    assert not torch.allclose(a[0]["image"], c[0]["image"])
    other_spacing = CTDataModule(root=str(synthetic), patch_size=32, cache_dir=str(cache), spacing_mm=1.5)
    assert other_spacing.cache_key() != dm1.cache_key()


# ------------------------------------------------------------------------------------------ splits


def test_patient_disjoint_splits_and_kfolds(synthetic, shared_cache):
    dm = synthetic_dm(synthetic, shared_cache)
    sets = {s: dm.split_patient_ids(s) for s in ("train", "val", "test")}
    assert all(sets.values())
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    all_patients = set(pd.read_csv(synthetic / "labels.csv").patient_id)
    assert set().union(*sets.values()) == all_patients
    for split, ds in dm.datasets.items():
        assert {ds[i]["patient_id"] for i in range(len(ds))} <= sets[split]
    counts = dm.class_counts()
    assert counts["benign"] + counts["malignant"] == len(dm.datasets["train"])
    assert counts["malignant"] == sum(int(y) for y in dm.datasets["train"].labels)

    vals, tests = [], []
    for fold in range(3):
        f = synthetic_dm(synthetic, shared_cache, n_folds=3, fold=fold)
        tr, va, te = (f.split_patient_ids(s) for s in ("train", "val", "test"))
        assert not (tr & va or tr & te or va & te)
        vals.append(va)
        tests.append(te)
    assert all(t == tests[0] for t in tests)
    assert not (vals[0] & vals[1] or vals[0] & vals[2] or vals[1] & vals[2])
    assert set().union(*vals) == all_patients - tests[0]
    with pytest.raises(ConfigError):
        CTDataModule(n_folds=3, fold=3)


def test_train_loader_deterministic_and_augmentation_train_only(synthetic, shared_cache):
    dm = synthetic_dm(synthetic, shared_cache, augment={"prob": 1.0}, batch_size=4)

    def first_batch(epoch: int, global_seed: int) -> dict:
        torch.manual_seed(global_seed)  # must not matter: order and augmentation follow (seed, epoch)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))

    a, b, c = first_batch(5, 1), first_batch(5, 2), first_batch(6, 1)
    assert a["case_id"] == b["case_id"] and torch.equal(a["image"], b["image"])
    assert a["case_id"] != c["case_id"] or not torch.equal(a["image"], c["image"])
    train = dm.datasets["train"]
    assert any(not torch.equal(train[i]["image"], train.patch(i)) for i in range(3))  # augmented
    val = dm.datasets["val"]
    assert all(torch.equal(val[i]["image"], val.patch(i)) for i in range(len(val)))  # never augmented
    assert torch.equal(next(iter(dm.val_dataloader()))["image"][0], val.patch(0))


def test_augmentation_keeps_mask_binary_and_pads_with_air():
    torch.manual_seed(0)
    aug = CTAugment(n_image_channels=1, pad_value=0.0, prob=1.0, rotate_deg=30, translate_vox=4)
    x = torch.zeros(2, 16, 16, 16)
    x[0] = 0.7
    x[1, 5:11, 5:11, 5:11] = 1.0
    for _ in range(5):
        y = aug(x)
        assert y.shape == x.shape
        assert set(torch.unique(y[1]).tolist()) <= {0.0, 1.0}
    off = CTAugment(enabled=False)
    assert off(x) is x


# ------------------------------------------------------------------------------------ lidc_voi crops


def test_lidc_voi_from_samples(samples_dir, tmp_path):
    voi = samples_dir / "lidc_voi"
    table = pd.read_csv(voi / "labels.csv")
    rows = table[table.diameter_mm > 10].head(4)
    rows = pd.concat([rows, table[(table.diameter_mm <= 10)].head(2)])
    csv = tmp_path / "labels_subset.csv"
    rows.to_csv(csv, index=False)
    dm = CTDataModule(
        source=VOIReader(labels_csv=str(csv)),
        root=str(voi),
        channels=["image", "mask"],
        malignancy_rule={"column": "Diagnosis"},
        cache_dir=str(tmp_path / "cache"),
        augment=False,
        val_fraction=0.0,
        test_fraction=0.0,
    )
    dm.setup()
    ds = dm.datasets["train"]
    assert len(ds) == len(rows) and dm.num_channels == 2
    by_case = rows.set_index(rows.file.str.replace(".nii.gz", "", regex=False))
    for i in range(len(ds)):
        item = ds[i]
        row = by_case.loc[item["case_id"]]
        assert item["image"].shape == (2, 64, 64, 64)
        assert item["patient_id"] == row.patient_id
        assert float(item["label"]) == (1.0 if row.Diagnosis == "Malign" else 0.0)
        img, mask = item["image"][0].numpy(), item["image"][1].numpy()
        assert set(np.unique(mask).tolist()) <= {0.0, 1.0} and mask.sum() > 0
        assert img[0, 0, 0] == 0.0 and img[-1, -1, -1] == 0.0  # crop (< 64 mm) padded with air
        src = sitk.ReadImage(str(voi / "mask" / row.file))
        src_volume = float(sitk.GetArrayFromImage(src).astype(bool).sum()) * float(np.prod(src.GetSpacing()))
        assert mask.sum() == pytest.approx(src_volume, rel=0.3)  # 1 mm^3 voxels: same physical volume
        z_planes = int((img.reshape(64 * 64, 64) > 0).any(axis=0).sum())
        z_extent = src.GetSize()[2] * src.GetSpacing()[2]  # slices are as thick as their spacing
        assert abs(z_planes - z_extent) <= 2.5

    image_only = CTDataModule(
        source=VOIReader(labels_csv=str(csv)),
        root=str(voi),
        cache_dir=str(tmp_path / "cache"),
        augment=False,
        val_fraction=0.0,
        test_fraction=0.0,
    )
    image_only.setup()
    assert image_only.num_channels == 1
    assert all(
        image_only.datasets[s][0]["image"].shape == (1, 64, 64, 64)
        for s in ("train",)
        if len(image_only.datasets[s])
    )


# ------------------------------------------------------------------------------------ NoduleMNIST3D


def test_nodulemnist3d_npz(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, 28, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, size=(n, 1)).astype(np.uint8)
    path = tmp_path / "nodulemnist3d.npz"
    np.savez(path, **arrays)
    dm = CTDataModule(source="nodulemnist3d", root=str(path), patch_size=28, augment=False)
    dm.setup()
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        ds = dm.datasets[split]
        assert len(ds) == n
        for i in range(n):
            item = ds[i]
            np.testing.assert_allclose(
                item["image"][0].numpy(), arrays[f"{split}_images"][i] / 255.0, atol=1e-6
            )
            assert float(item["label"]) == float(arrays[f"{split}_labels"][i, 0])
            assert math.isnan(item["diameter_mm"])
    big = CTDataModule(
        source=NoduleMNIST3DReader(npz_file="nodulemnist3d.npz"), root=str(tmp_path), augment=False
    )
    big.setup()
    x = big.datasets["val"][1]["image"]
    assert x.shape == (1, 64, 64, 64) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0

    del arrays["val_labels"]
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(DataError, match="bad.npz.*val_labels"):
        CTDataModule(source="nodulemnist3d", root=str(bad)).setup()
    with pytest.raises(ConfigError):
        CTDataModule(source="nodulemnist3d", root=str(path), n_folds=3)


# ------------------------------------------------------------------------------------------- DICOM


def write_dicom_series(
    folder: Path,
    series_uid: str,
    stored: np.ndarray,
    positions: list[float],
    slope: float = 2.0,
    intercept: float = -1024.0,
    names: list[str] | None = None,
    patient_id: str = "P-DCM",
) -> None:
    """One CT slice file per k of ``stored`` [rows, cols, k] (uint16), at z = positions[k]."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    for k, z in enumerate(positions):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", series_uid
        ds.PatientID, ds.Modality, ds.InstanceNumber = patient_id, "CT", k + 1
        ds.Rows, ds.Columns = stored.shape[:2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.ImagePositionPatient = [-10.0, 5.0, float(z)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.6]  # row spacing (along j), column spacing (along i)
        ds.SliceThickness = 2.0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].astype(np.uint16)).tobytes()
        name = names[k] if names else f"slice{k:03d}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)


def dicom_volume(rows=6, cols=5, n=4) -> np.ndarray:
    r, c, k = np.meshgrid(np.arange(rows), np.arange(cols), np.arange(n), indexing="ij")
    return (500 + 100 * k + 10 * r + c).astype(np.uint16)


def test_dicom_series_sorted_by_position_and_rescaled(tmp_path):
    stored = dicom_volume()
    positions = [40.0, 42.0, 44.0, 46.0]
    # file names in the opposite order to position, so sorting by name would be wrong
    write_dicom_series(
        tmp_path / "s1", "1.2.3.4.5", stored, positions, names=["d.dcm", "c.dcm", "b.dcm", "a.dcm"]
    )
    scan = ct_io.read_scan(tmp_path / "s1")
    assert scan.shape == (5, 6, 4)  # [i = column, j = row, k = slice]
    np.testing.assert_allclose(scan.spacing, [0.6, 0.7, 2.0])
    np.testing.assert_allclose(scan.origin, [-10.0, 5.0, 40.0])
    expected_hu = stored.astype(np.float32) * 2.0 - 1024.0
    np.testing.assert_allclose(scan.array, expected_hu.transpose(1, 0, 2))
    assert scan.series_uid == "1.2.3.4.5"

    # unsorted positions in the files: still sorted by position
    write_dicom_series(tmp_path / "s2", "1.2.3.4.6", stored, [46.0, 40.0, 44.0, 42.0])
    s2 = ct_io.read_scan(tmp_path / "s2")
    order = np.argsort([46.0, 40.0, 44.0, 42.0])
    np.testing.assert_allclose(s2.array, expected_hu[:, :, order].transpose(1, 0, 2))


def test_dicom_patient_id_keeps_two_series_of_one_patient_in_one_split(tmp_path, caplog):
    """Issue 15 item 7: a DICOM series' patient is its PatientID (0010,0020), not the series UID."""
    stored = dicom_volume()
    root = tmp_path / "dicom_set"
    centre = voxel_to_world([2, 2, 1], [-10.0, 5.0, 0.0], [0.6, 0.7, 2.0], np.eye(3))
    patients = {"9.1": "PAT-A", "9.2": "PAT-A", "9.3": "PAT-B", "9.4": "PAT-C", "9.5": "PAT-D"}
    for uid, pid in patients.items():
        write_dicom_series(root / "scans" / uid, uid, stored, [0.0, 2.0, 4.0, 6.0], patient_id=pid)
    rows = [dict(seriesuid=uid, coordX=centre[0], coordY=centre[1], coordZ=centre[2], diameter_mm=3.0,
                 malignancy=5 if i % 2 else 1) for i, uid in enumerate(patients)]  # fmt: skip
    write_annotations(root, rows)
    reader = DicomReader(labels_csv=None, scans_dir="scans", missing_patient_ids="error")
    for seed in range(4):
        with caplog.at_level("WARNING"):
            dm = CTDataModule(**dm_kwargs(root, tmp_path / "cache", source=reader, seed=seed,
                                          val_fraction=0.25, test_fraction=0.25))  # fmt: skip
            dm.setup()  # missing_patient_ids=error: every series has its patient
        holding = [s for s, d in dm.datasets.items() if {"9.1", "9.2"} & {r.series_uid for r in d.records}]
        assert len(holding) == 1, (seed, holding)
        assert {r.patient_id for d in dm.datasets.values() for r in d.records} == set(patients.values())
    assert "LEAKAGE RISK" not in caplog.text

    # a series without PatientID falls back to its series UID, under the missing_patient_ids policy
    write_dicom_series(root / "scans" / "9.6", "9.6", stored, [0.0, 2.0, 4.0, 6.0], patient_id="")
    write_annotations(root, [*rows, {**rows[0], "seriesuid": "9.6"}])
    with pytest.raises(DataError, match="1 of 6 nodules have no patient id"):
        CTDataModule(**dm_kwargs(root, tmp_path / "cache", source=reader)).setup()


def test_dicom_patient_id_from_real_samples(samples_dir, tmp_path):
    """The two real CT slices of MEDENS_SAMPLES/dicom, each its own series: their PatientIDs are read."""
    import shutil

    import pydicom

    from medens.data.ct.sources import ErrorPolicy

    rows, want = [], {}
    for name in ("pydicom_CT_small.dcm", "kcr2019d1_anon_apct.dcm"):
        ds = pydicom.dcmread(samples_dir / "dicom" / name, stop_before_pixels=True)
        folder = tmp_path / "scans" / name.removesuffix(".dcm")
        folder.mkdir(parents=True)
        shutil.copy(samples_dir / "dicom" / name, folder / name)  # a temporary copy, never into the project
        pos, sp = [float(v) for v in ds.ImagePositionPatient], [float(v) for v in ds.PixelSpacing]
        x, y = pos[0] + sp[1] * ds.Columns / 2, pos[1] + sp[0] * ds.Rows / 2
        rows.append(dict(seriesuid=str(ds.SeriesInstanceUID), coordX=x, coordY=y, coordZ=pos[2], malignancy=5))
        want[str(ds.SeriesInstanceUID)] = str(ds.PatientID)
    write_annotations(tmp_path, rows)
    records, excluded = DicomReader(labels_csv=None, scans_dir="scans").list_cases(tmp_path, ErrorPolicy("error"), False)
    assert not excluded and {r.series_uid: r.patient_id for r in records} == want
    assert set(want.values()) == {"1CT1", "1690377420"}


def test_dicom_through_datamodule_and_mixed_series(tmp_path):
    stored = dicom_volume()
    root = tmp_path / "dicom_set"
    write_dicom_series(root / "scans" / "good", "1.2.3.4.7", stored, [0.0, 2.0, 4.0, 6.0])
    # the world point of voxel (i=3, j=2, k=1)
    centre = voxel_to_world([3, 2, 1], [-10.0, 5.0, 0.0], [0.6, 0.7, 2.0], np.eye(3))
    rows = [
        {
            "seriesuid": "1.2.3.4.7",
            "coordX": centre[0],
            "coordY": centre[1],
            "coordZ": centre[2],
            "diameter_mm": 3.0,
            "malignancy": 5,
        }
    ]
    write_annotations(root, rows)
    kw = dm_kwargs(root, tmp_path / "cache", source=DicomReader(labels_csv=None, scans_dir="scans"), hu_window=[-1100, 1100])
    dm = CTDataModule(**kw)
    dm.setup()
    item = dm.datasets["train"][0]
    hu = float(stored[2, 3, 1]) * 2.0 - 1024.0  # stored is [row j, column i, k]
    assert float(item["image"][0, 4, 4, 4]) == pytest.approx((hu + 1100) / 2200, abs=1e-3)
    assert float(item["label"]) == 1.0

    # a folder mixing two series
    mixed = root / "scans" / "mixed"
    write_dicom_series(mixed, "9.9.1", stored[:, :, :2], [0.0, 2.0], names=["a1.dcm", "a2.dcm"])
    write_dicom_series(mixed, "9.9.2", stored[:, :, :2], [4.0, 6.0], names=["b1.dcm", "b2.dcm"])
    with pytest.raises(DataError, match=r"mixed.*mixes 2 DICOM series"):
        ct_io.read_dicom_series(mixed)
    write_annotations(root, rows + [{**rows[0], "seriesuid": "9.9.1"}])
    with pytest.raises(DataError, match="mixes 2 DICOM series"):
        CTDataModule(**kw).setup()
    dm = CTDataModule(**{**kw, "on_error": "skip"})
    dm.setup()
    assert len(dm.datasets["train"]) == 1 and len(dm.skipped) == 1
    assert "mixes 2 DICOM series" in dm.skipped[0]["reason"]


# --------------------------------------------------------------------------------------- bad input


def test_nodule_outside_volume(tmp_path):
    tiny_luna(tmp_path)
    write_annotations(
        tmp_path,
        [
            {
                "seriesuid": "uidA",
                "coordX": 0.0,
                "coordY": 0.0,
                "coordZ": 0.0,
                "diameter_mm": 5.0,
                "malignancy": 5,
            },
            {
                "seriesuid": "uidA",
                "coordX": 300.0,
                "coordY": 0.0,
                "coordZ": 0.0,
                "diameter_mm": 5.0,
                "malignancy": 1,
            },
        ],
    )
    with pytest.raises(DataError, match=r"uidA\.mhd: nodule uidA_1 .* outside the scan"):
        CTDataModule(**dm_kwargs(tmp_path, tmp_path / "cache")).setup()
    assert not list((tmp_path / "cache").glob("ct-*"))  # no half-written cache left behind
    dm = CTDataModule(**dm_kwargs(tmp_path, tmp_path / "cache", on_error="skip"))
    dm.setup()
    assert [r.case_id for r in dm.datasets["train"].records] == ["uidA_0"]
    assert [s["case_id"] for s in dm.skipped] == ["uidA_1"]


def test_border_nodule_is_padded_through_datamodule(tmp_path):
    tiny_luna(tmp_path)
    # the first voxel centre of scan A: half the 8-voxel patch (1.5 mm spacing) lies outside the scan
    write_annotations(
        tmp_path,
        [
            {
                "seriesuid": "uidA",
                "coordX": -18.0,
                "coordY": -18.0,
                "coordZ": -18.0,
                "diameter_mm": 5.0,
                "malignancy": 5,
            }
        ],
    )
    dm = CTDataModule(**dm_kwargs(tmp_path, tmp_path / "cache", spacing_mm=1.5))
    dm.setup()
    x = dm.datasets["train"][0]["image"][0]
    assert x.shape == (8, 8, 8)
    assert float(x[:4].abs().max()) == 0.0 and float(x[:, :4].abs().max()) == 0.0  # air outside
    assert float(x[4:, 4:, 4:].min()) == pytest.approx((-800 + 1000) / 1400, abs=1e-3)  # lung inside


def test_series_without_scan(tmp_path):
    tiny_luna(tmp_path)
    write_annotations(
        tmp_path,
        [
            {
                "seriesuid": "uidA",
                "coordX": 0.0,
                "coordY": 0.0,
                "coordZ": 0.0,
                "diameter_mm": 5.0,
                "malignancy": 5,
            },
            {
                "seriesuid": "uidMISSING",
                "coordX": 0.0,
                "coordY": 0.0,
                "coordZ": 0.0,
                "diameter_mm": 5.0,
                "malignancy": 5,
            },
        ],
    )
    with pytest.raises(DataError, match=r"annotations\.csv: series uidMISSING .* has no scan"):
        CTDataModule(**dm_kwargs(tmp_path, tmp_path / "cache")).setup()
    dm = CTDataModule(**dm_kwargs(tmp_path, tmp_path / "cache", on_error="skip"))
    dm.setup()
    assert len(dm.datasets["train"]) == 1
    assert len(dm.skipped) == 1 and "uidMISSING" in dm.skipped[0]["reason"]


def test_truncated_raw(tmp_path):
    scans = tiny_luna(tmp_path)
    raw = scans["uidB"].with_suffix(".raw")
    with open(raw, "r+b") as fh:
        fh.truncate(raw.stat().st_size // 2)
    with pytest.raises(DataError, match=r"uidB\.raw: truncated"):
        ct_io.read_scan(scans["uidB"])
    write_annotations(
        tmp_path,
        [
            {
                "seriesuid": "uidA",
                "coordX": 0.0,
                "coordY": 0.0,
                "coordZ": 0.0,
                "diameter_mm": 5.0,
                "malignancy": 5,
            },
            {
                "seriesuid": "uidB",
                "coordX": 118.0,
                "coordY": 118.0,
                "coordZ": 118.0,
                "diameter_mm": 5.0,
                "malignancy": 1,
            },
            {
                "seriesuid": "uidB",
                "coordX": 110.0,
                "coordY": 110.0,
                "coordZ": 110.0,
                "diameter_mm": 5.0,
                "malignancy": 2,
            },
        ],
    )
    with pytest.raises(DataError, match="truncated"):
        CTDataModule(**dm_kwargs(tmp_path, tmp_path / "cache")).setup()
    dm = CTDataModule(**dm_kwargs(tmp_path, tmp_path / "cache", on_error="skip"))
    dm.setup()
    assert [r.case_id for r in dm.datasets["train"].records] == ["uidA_0"]
    assert sorted(s["case_id"] for s in dm.skipped) == ["uidB_0", "uidB_1"]


def test_separate_labels_table_matched_by_position(tmp_path):
    tiny_luna(tmp_path)
    write_annotations(
        tmp_path,
        [
            {"seriesuid": "uidA", "coordX": 0.0, "coordY": 0.0, "coordZ": 0.0, "diameter_mm": 5.0},
            {"seriesuid": "uidA", "coordX": 10.0, "coordY": 0.0, "coordZ": 0.0, "diameter_mm": 5.0},
            {"seriesuid": "uidB", "coordX": 118.0, "coordY": 118.0, "coordZ": 118.0, "diameter_mm": 5.0},
        ],
    )
    pd.DataFrame(
        [  # other order, positions off by ~1 mm, one row too far to match
            {
                "seriesuid": "uidA",
                "patient_id": "P1",
                "coordX": 10.8,
                "coordY": 0.5,
                "coordZ": 0.0,
                "malignancy": 1,
            },
            {
                "seriesuid": "uidA",
                "patient_id": "P1",
                "coordX": 0.6,
                "coordY": -0.4,
                "coordZ": 0.3,
                "malignancy": 5,
            },
            {
                "seriesuid": "uidB",
                "patient_id": "P2",
                "coordX": 140.0,
                "coordY": 118.0,
                "coordZ": 118.0,
                "malignancy": 4,
            },
        ]
    ).to_csv(tmp_path / "labels.csv", index=False)
    dm = CTDataModule(**dm_kwargs(tmp_path, tmp_path / "cache", source=Luna16Reader(labels_csv="labels.csv")))
    dm.setup()
    got = {
        r.case_id: (y, r.patient_id)
        for r, y in zip(dm.datasets["train"].records, dm.datasets["train"].labels, strict=True)
    }
    assert got == {"uidA_0": (1.0, "P1"), "uidA_1": (0.0, "P1")}
    assert [e["case_id"] for e in dm.excluded] == ["uidB_0"]


def test_concurrent_prepare_data_builds_the_cache_once(tmp_path, monkeypatch):
    import threading

    tiny_luna(tmp_path)
    write_annotations(
        tmp_path,
        [
            {
                "seriesuid": "uidA",
                "coordX": 0.0,
                "coordY": 0.0,
                "coordZ": 0.0,
                "diameter_mm": 5.0,
                "malignancy": 5,
            }
        ],
    )
    reads = []
    real = ct_io.read_scan
    monkeypatch.setattr(ct_io, "read_scan", lambda p: reads.append(p) or real(p))
    dms = [CTDataModule(**dm_kwargs(tmp_path, tmp_path / "cache")) for _ in range(3)]
    threads = [threading.Thread(target=dm.prepare_data) for dm in dms]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reads) == 1  # the others waited on the lock and found the finished cache
    for dm in dms:
        dm.setup()
        assert len(dm.datasets["train"]) == 1
    assert len(list((tmp_path / "cache").glob("ct-*"))) == 1


def test_incomplete_cache_folder_is_rebuilt_not_kept(tmp_path):
    """A cache folder without its manifest (a copy cut short, a half-deleted folder) is replaced by a
    fresh build, never kept in place of it."""
    tiny_luna(tmp_path)
    row = {"seriesuid": "uidA", "coordX": 0.0, "coordY": 0.0, "coordZ": 0.0, "diameter_mm": 5.0, "malignancy": 5}
    write_annotations(tmp_path, [row])
    dm = CTDataModule(**dm_kwargs(tmp_path, tmp_path / "cache"))
    dm.prepare_data()
    dm.setup()
    good = dm.datasets["train"][0]["image"].clone()
    path = dm.cache_path
    shutil.rmtree(path)
    path.mkdir()
    (path / "patches.npy").write_bytes(b"not a cache")  # no manifest.json beside it
    again = CTDataModule(**dm_kwargs(tmp_path, tmp_path / "cache"))
    again.prepare_data()
    again.setup()
    assert again.cache_path == path and (path / "manifest.json").is_file()
    assert torch.equal(again.datasets["train"][0]["image"], good)
    assert not [p.name for p in path.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]  # no leftovers


def test_luna16_nifti_scan_and_sphere_mask_channel(tmp_path):
    vol = np.full((20, 20, 10), -900, dtype=np.int16)
    vol[5, 12, 3] = 300  # the marked voxel
    direction = np.diag([-1.0, -1.0, 1.0])  # RAS-stored NIfTI: SimpleITK hands back LPS geometry
    img = sitk.GetImageFromArray(vol.transpose(2, 1, 0))
    img.SetSpacing((0.8, 0.8, 2.0))
    img.SetOrigin((40.0, 30.0, -100.0))
    img.SetDirection(tuple(direction.ravel()))
    (tmp_path / "scans").mkdir()
    sitk.WriteImage(img, str(tmp_path / "scans" / "uidN.nii.gz"))
    world = voxel_to_world([5, 12, 3], [40.0, 30.0, -100.0], [0.8, 0.8, 2.0], direction)
    write_annotations(
        tmp_path,
        [
            {
                "seriesuid": "uidN",
                "coordX": world[0],
                "coordY": world[1],
                "coordZ": world[2],
                "diameter_mm": 6.0,
                "malignancy": 4,
            }
        ],
    )
    dm = CTDataModule(**dm_kwargs(tmp_path, tmp_path / "cache", patch_size=16, channels=["image", "mask"]))
    dm.setup()
    dm.setup()  # idempotent
    x = dm.datasets["train"][0]["image"]
    assert x.shape == (2, 16, 16, 16) and dm.num_channels == 2
    assert float(x[0, 8, 8, 8]) == pytest.approx((300 + 1000) / 1400, abs=1e-3)
    assert int(torch.argmax(x[0])) == np.ravel_multi_index((8, 8, 8), (16, 16, 16))
    ball = x[1].numpy()
    assert set(np.unique(ball).tolist()) == {0.0, 1.0} and ball[8, 8, 8] == 1.0
    assert ball.sum() == pytest.approx(4 / 3 * math.pi * 3.0**3, rel=0.25)  # a 6 mm ball at 1 mm voxels


def test_setup_alone_regenerates_when_generator_params_change(tmp_path):
    gen = dict(n_patients=2, nodules_per_patient=2, scan_shape=(48, 48, 40), seed=2)
    kw = dict(
        root=str(tmp_path / "syn"),
        patch_size=8,
        cache_dir=str(tmp_path / "c"),
        malignancy_rule={"indeterminate": "benign"},
        val_fraction=0.0,
        test_fraction=0.0,
    )
    first = CTDataModule(source=SyntheticLuna16Reader(generator=gen), **kw)
    first.setup()
    second = CTDataModule(source=SyntheticLuna16Reader(generator={**gen, "n_patients": 3}), **kw)
    second.setup()  # no prepare_data call: setup still brings data and cache up to date
    assert len(second.split_patient_ids("train")) == 3 and len(first.split_patient_ids("train")) == 2
    assert second.cache_path != first.cache_path


# ------------------------------------------------------------------------------------------ readers


def test_reader_configs_round_trip_are_safe_and_old_flat_configs_upgrade(tmp_path):
    from omegaconf import OmegaConf

    from medens.checkpoint.safe_build import validate_safe_config
    from medens.data.ct.readers import READERS, build_reader, upgrade_legacy_config
    from medens.training.value_checks import check_values

    for name, cls in READERS.items():
        reader = build_reader(name)
        assert type(reader) is cls and build_reader(reader.config()) == reader
        validate_safe_config({"data": {"_target_": "medens.data.ct.CTDataModule", "source": reader.config()}})
    with pytest.raises(ConfigError, match="short names are"):
        build_reader("lidc")
    with pytest.raises(ConfigError, match="not a CT reader class"):
        build_reader({"_target_": "medens.data.ct.CTDataModule"})
    with pytest.raises(ConfigError, match="value_checks_typo"):
        build_reader({"_target_": "medens.data.ct.readers.VOIReader", "value_checks_typo": 1})
    bad = OmegaConf.create({"data": {"source": {"_target_": "medens.data.ct.readers.Luna16Reader",
                                                "label_match_mm": "near"}}})  # fmt: skip
    with pytest.raises(ConfigError, match="data.source.label_match_mm"):
        check_values(bad)

    # a checkpoint written before readers: flat keys beside `source: <name>`
    old = {"_target_": "medens.data.ct.CTDataModule", "source": "luna16", "root": str(tmp_path),
           "annotations_csv": "a.csv", "labels_csv": None, "scans_dir": "scans", "image_dir": "image",
           "mask_dir": "mask", "npz_file": None, "generate_if_missing": False, "generator": None,
           "series_patient_table": None, "missing_patient_ids": "warn", "label_match_mm": 3.0}  # fmt: skip
    new = upgrade_legacy_config(old)
    assert new["source"] == {"_target_": "medens.data.ct.readers.Luna16Reader", "annotations_csv": "a.csv",
                             "labels_csv": None, "scans_dir": "scans", "label_match_mm": 3.0,
                             "missing_patient_ids": "warn"}  # fmt: skip
    assert CTDataModule(**{k: v for k, v in new.items() if k != "_target_"}).reader.scans_dir == "scans"
    assert upgrade_legacy_config(new) == new
