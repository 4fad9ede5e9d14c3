"""NIH ChestX-ray14 loader: label parsing, patient splits, image formats, bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medens.data.medmnist import MedMNISTDataModule, read_medmnist
from medens.data.synthetic_xray import CO_OCCURRENCE, ensure_synthetic_nih, generate_synthetic_nih
from medens.data.xray import NIH_LABELS, XRayDataModule, load_xray_image, parse_finding_labels, read_nih_table
from medens.data.xray_readers import NIHReader
from medens.errors import DataError


def write_nih(root: Path, rows: list[tuple[str, str, str, str]], modes: dict[str, str] | None = None) -> Path:
    """rows: (image, finding labels, patient id, view). Writes PNGs and Data_Entry_2017.csv."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, _, _, _ in rows:
        mode = (modes or {}).get(name, "L")
        size = 40 + len(name) % 7
        if mode == "I;16":
            Image.fromarray(rng.integers(0, 4000, (size, size), dtype=np.uint16)).save(root / "images" / name)
        else:
            shape = (size, size) if mode == "L" else (size, size, len(mode))
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(root / "images" / name)
    pd.DataFrame(
        rows, columns=["Image Index", "Finding Labels", "Patient ID", "View Position"]
    ).to_csv(root / "Data_Entry_2017.csv", index=False)
    return root


def test_label_order_is_the_documented_nih_order():
    assert NIH_LABELS[:3] == ("Atelectasis", "Cardiomegaly", "Effusion")
    assert NIH_LABELS[-1] == "Hernia" and len(NIH_LABELS) == 14 and len(set(NIH_LABELS)) == 14


@pytest.mark.parametrize(
    "text, positives",
    [
        ("No Finding", []),
        ("Cardiomegaly", [1]),
        ("Effusion|Mass", [2, 4]),
        ("Hernia|Atelectasis|Pleural_Thickening", [0, 12, 13]),
        ("Infiltration|Nodule|Pneumonia|Pneumothorax", [3, 5, 6, 7]),
    ],
)
def test_finding_labels_parse_to_hand_written_vectors(text, positives):
    expected = np.zeros(14, dtype=np.float32)
    expected[positives] = 1
    np.testing.assert_array_equal(parse_finding_labels(text), expected)


def test_unknown_finding_is_an_error_naming_the_row(tmp_path):
    write_nih(tmp_path, [("a.png", "Effusion", "1", "PA"), ("b.png", "Efusion", "2", "PA")])
    with pytest.raises(DataError, match=r"row 3 \(b.png\).*'Efusion'"):
        read_nih_table(tmp_path / "Data_Entry_2017.csv")


def test_gzip_csv_and_targets(tmp_path):
    write_nih(tmp_path, [("a.png", "No Finding", "1", "PA"), ("b.png", "Edema|Effusion", "2", "AP")])
    csv = tmp_path / "Data_Entry_2017.csv"
    (tmp_path / "Data_Entry_2017_v2020.csv.gz").write_bytes(gzip.compress(csv.read_bytes()))
    csv.unlink()
    df = read_nih_table(tmp_path / "Data_Entry_2017_v2020.csv.gz")
    assert df["targets"][0].sum() == 0
    assert df["targets"][1][NIH_LABELS.index("Edema")] == 1 and df["targets"][1].sum() == 2


def _many_rows(n_patients=12, per_patient=3):
    return [
        (f"{p:08d}_{k:03d}.png", "Effusion" if (p + k) % 2 else "No Finding", str(p), "PA" if k % 2 else "AP")
        for p in range(1, n_patients + 1)
        for k in range(per_patient)
    ]


def test_splits_are_patient_disjoint_and_cover_all_images(tmp_path):
    write_nih(tmp_path, _many_rows())
    dm = XRayDataModule(root=str(tmp_path), image_size=32, val_fraction=0.2, test_fraction=0.25, seed=3)
    dm.setup()
    ids = {k: dm.split_patient_ids(k) for k in ("train", "val", "test")}
    assert ids["train"] and ids["val"] and ids["test"]
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert sum(len(d) for d in dm.datasets.values()) == 36


def test_official_split_lists_are_used(tmp_path):
    rows = _many_rows(6, 2)
    write_nih(tmp_path, rows)
    test_names = [r[0] for r in rows if r[2] in ("5", "6")]
    (tmp_path / "test_list.txt").write_text("\n".join(test_names))
    (tmp_path / "train_val_list.txt").write_text("\n".join(r[0] for r in rows if r[0] not in test_names))
    dm = XRayDataModule(root=str(tmp_path), image_size=32, val_fraction=0.25, seed=0)
    dm.setup()
    assert sorted(dm.datasets["test"].ids) == sorted(test_names)
    assert dm.split_patient_ids("train").isdisjoint(dm.split_patient_ids("val"))


def test_view_filter(tmp_path):
    write_nih(tmp_path, _many_rows())
    dm = XRayDataModule(root=str(tmp_path), image_size=32, source=NIHReader(view_positions=["PA"]), seed=0)
    dm.setup()
    assert sum(len(d) for d in dm.datasets.values()) == 12  # k == 1 of 3 per patient


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "I;16"])
def test_any_mode_and_size_becomes_configured_tensor(tmp_path, mode):
    rows = [(f"{p:08d}_000.png", "Mass", str(p), "PA") for p in range(1, 7)]
    write_nih(tmp_path, rows, modes={r[0]: mode for r in rows})
    dm = XRayDataModule(
        root=str(tmp_path), image_size=24, channels=3, normalize="none", seed=0, val_fraction=0.2, test_fraction=0.2
    )
    dm.setup()
    item = dm.datasets["val"][0]
    assert item["image"].shape == (3, 24, 24) and item["image"].dtype == torch.float32
    assert torch.equal(item["image"][0], item["image"][2])  # greyscale replicated
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0 and item["image"].std() > 0
    assert item["label"][NIH_LABELS.index("Mass")] == 1


def test_augmentation_only_in_training(tmp_path):
    write_nih(tmp_path, _many_rows())
    aug = [{"_target_": "torchvision.transforms.v2.RandomAffine", "degrees": 20, "translate": [0.1, 0.1]}]
    dm = XRayDataModule(root=str(tmp_path), image_size=32, train_augment=aug, seed=0)
    dm.setup()
    torch.manual_seed(0)
    a = dm.datasets["train"][0]["image"]
    b = dm.datasets["train"][0]["image"]
    assert not torch.equal(a, b)
    assert torch.equal(dm.datasets["val"][0]["image"], dm.datasets["val"][0]["image"])


def test_missing_images_reported_then_error_or_skip(tmp_path, caplog):
    rows = _many_rows(6, 2)
    write_nih(tmp_path, rows)
    for name in ("00000002_000.png", "00000004_001.png"):
        (tmp_path / "images" / name).unlink()
    with pytest.raises(DataError, match=r"2 of 12 images .* missing .*00000002_000.png, 00000004_001.png"):
        XRayDataModule(root=str(tmp_path), image_size=32).setup()
    dm = XRayDataModule(root=str(tmp_path), image_size=32, missing_images="skip")
    dm.setup()
    assert sum(len(d) for d in dm.datasets.values()) == 10 and len(dm.skipped) == 2
    assert "2 of 12 images" in caplog.text


def test_corrupt_png_is_a_clear_error(tmp_path):
    write_nih(tmp_path, _many_rows(6, 2))
    bad = tmp_path / "images" / "00000003_001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match="00000003_001.png: cannot decode image"):
        XRayDataModule(root=str(tmp_path), image_size=32, verify_images=True).setup()
    with pytest.raises(DataError, match="00000003_001.png"):
        load_xray_image(bad)


def test_missing_csv_column_is_named(tmp_path):
    write_nih(tmp_path, _many_rows(4, 1))
    df = pd.read_csv(tmp_path / "Data_Entry_2017.csv").drop(columns=["Patient ID"])
    df.to_csv(tmp_path / "Data_Entry_2017.csv", index=False)
    with pytest.raises(DataError, match=r"Data_Entry_2017.csv: missing column\(s\) \['Patient ID'\]"):
        XRayDataModule(root=str(tmp_path)).setup()


def test_empty_image_folder_and_missing_csv(tmp_path):
    write_nih(tmp_path, _many_rows(4, 1))
    for p in (tmp_path / "images").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="images: image folder is empty"):
        XRayDataModule(root=str(tmp_path)).setup()
    (tmp_path / "Data_Entry_2017.csv").unlink()
    with pytest.raises(DataError, match=r"no Data_Entry_2017\*.csv"):
        XRayDataModule(root=str(tmp_path)).setup()


def test_synthetic_set_is_deterministic_and_cooccurs(tmp_path):
    a = generate_synthetic_nih(tmp_path / "a", n_patients=60, image_size=32, seed=5)
    b = generate_synthetic_nih(tmp_path / "b", n_patients=60, image_size=32, seed=5)
    ta, tb = pd.read_csv(a / "Data_Entry_2017.csv"), pd.read_csv(b / "Data_Entry_2017.csv")
    pd.testing.assert_frame_equal(ta, tb)
    assert (a / "images" / ta["Image Index"][0]).read_bytes() == (b / "images" / tb["Image Index"][0]).read_bytes()
    targets = np.stack(read_nih_table(a / "Data_Entry_2017.csv")["targets"])
    assert (targets.sum(0) > 0).all(), "every label appears"
    eff, ate = NIH_LABELS.index("Effusion"), NIH_LABELS.index("Atelectasis")
    p_ate_given_eff = targets[targets[:, eff] == 1, ate].mean()
    assert ("Effusion", "Atelectasis", 0.4) in CO_OCCURRENCE and p_ate_given_eff > targets[:, ate].mean()


def test_synthetic_regenerates_when_params_change_and_protects_foreign_folders(tmp_path):
    root = tmp_path / "syn"
    ensure_synthetic_nih(root, n_patients=5, image_size=32, seed=0)
    n5 = len(pd.read_csv(root / "Data_Entry_2017.csv"))
    ensure_synthetic_nih(root, n_patients=9, image_size=32, seed=0)
    assert len(pd.read_csv(root / "Data_Entry_2017.csv")) > n5
    foreign = tmp_path / "mine"
    foreign.mkdir()
    with pytest.raises(FileExistsError):
        ensure_synthetic_nih(foreign, n_patients=5)


def test_medmnist_npz_reader(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 10), ("val", 4), ("test", 5)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 14), dtype=np.uint8)
    np.savez(tmp_path / "chestmnist.npz", **arrays)
    dm = MedMNISTDataModule(path=str(tmp_path / "chestmnist.npz"), image_size=32)
    dm.setup()
    assert dm.labels == NIH_LABELS and len(dm.datasets["val"]) == 4
    item = dm.datasets["test"][2]
    assert item["image"].shape == (3, 32, 32)
    np.testing.assert_array_equal(item["label"].numpy(), arrays["test_labels"][2])
    del arrays["val_labels"]
    np.savez(tmp_path / "broken.npz", **arrays)
    with pytest.raises(DataError, match=r"broken.npz: missing key\(s\) \['val_labels'\]"):
        read_medmnist(tmp_path / "broken.npz")


def test_real_nih_samples_load(samples_dir):
    dm = XRayDataModule(root=str(samples_dir / "nih_cxr14"), image_size=64, missing_images="skip", seed=0)
    dm.setup()
    n = sum(len(d) for d in dm.datasets.values())
    assert 500 <= n <= 614 and len(dm.skipped) > 100_000
    assert dm.split_patient_ids("train").isdisjoint(dm.split_patient_ids("test"))
    item = dm.datasets["train"][0]
    assert item["image"].shape == (3, 64, 64) and item["label"].shape == (14,)


def test_real_pneumoniamnist_sample(samples_dir):
    dm = MedMNISTDataModule(path=str(samples_dir / "medmnist" / "pneumoniamnist_balanced_subset.npz"), image_size=28)
    dm.setup()
    assert dm.num_classes == 1 and set(dm.datasets["train"].targets.unique().tolist()) == {0.0, 1.0}
