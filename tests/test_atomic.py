"""medens.utils.atomic: the one atomic file write every writer in medens goes through."""

from __future__ import annotations

import os
import stat

import pytest

from medens.utils.atomic import atomic_copy, atomic_path, atomic_write_text, publish_first_free, temp_sibling
from medens.utils.jsonio import write_json_strict


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "report.json"
    atomic_write_text(target, "old")
    write_json_strict(target, {"auc": float("nan")})
    assert target.read_text() == '{\n  "auc": null\n}\n'
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask, "the permissions a plain open() gives"


def test_error_in_body_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "model_best.pth"
    target.write_bytes(b"old")
    seen = []
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            seen.append(tmp.name)
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model_best.pth"]
    name = seen[0]
    assert name.startswith(".model_best.pth.") and name.endswith(".tmp") and not name.endswith(".pth")


def test_temp_suffix_may_not_look_like_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"\.pth"):
        with atomic_path(tmp_path / "x.pth", suffix=".tmp.pth"):
            pass


def test_exclusive_never_replaces(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"new")
    dst = tmp_path / "v1.pth"
    atomic_copy(src, dst, exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write_text(dst, "other", exclusive=True)
    assert dst.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["src.bin", "v1.pth"]


def test_publish_first_free_skips_taken_names(tmp_path):
    (tmp_path / "a.tar.gz").write_text("taken")
    with temp_sibling(tmp_path / "a.tar.gz") as tmp:
        tmp.write_text("mine")
        got = publish_first_free(tmp, [tmp_path / "a.tar.gz", tmp_path / "a_1.tar.gz"])
    assert got.name == "a_1.tar.gz" and got.read_text() == "mine"
    assert (tmp_path / "a.tar.gz").read_text() == "taken"
    assert sorted(os.listdir(tmp_path)) == ["a.tar.gz", "a_1.tar.gz"]


def test_report_writers_keep_the_old_file_when_writing_fails(tmp_path):
    """Figures, CSV tables and prediction label maps go through the atomic write too: a writer that dies
    half-way leaves the previous file whole and no temporary file behind."""
    import matplotlib.pyplot as plt
    import nibabel as nib
    import numpy as np
    import pandas as pd

    from medens.data.mri.transforms import write_prediction_nifti
    from medens.evaluation.classification import save_figure
    from medens.utils.atomic import write_csv

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    png = save_figure(fig, tmp_path / "figs" / "roc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_csv(pd.DataFrame({"case": ["a"], "p": [0.25]}), tmp_path / "predictions.csv")
    assert pd.read_csv(tmp_path / "predictions.csv").to_dict("list") == {"case": ["a"], "p": [0.25]}

    class HalfWritten:
        def to_csv(self, path, index):
            open(path, "w").write("case,p\nb,")
            raise OSError("disk full")

        def savefig(self, path, **kwargs):
            open(path, "wb").write(b"\x89PNG half")
            raise OSError("disk full")

        def tight_layout(self):
            pass

    with pytest.raises(OSError, match="disk full"):
        write_csv(HalfWritten(), tmp_path / "predictions.csv")
    with pytest.raises(OSError, match="disk full"):
        save_figure(HalfWritten(), png)
    assert pd.read_csv(tmp_path / "predictions.csv")["case"].tolist() == ["a"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(png.read_bytes()) > 1000
    assert sorted(os.listdir(tmp_path)) == ["figs", "predictions.csv"] and os.listdir(png.parent) == ["roc.png"]

    # a label map: nibabel's own reader gets back the labels, the affine and its codes
    label = np.zeros((4, 5, 6), np.uint8)
    label[1:3, 2, 3:5] = 2
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    meta = {"crop_start": np.zeros(3, int), "original_shape": np.array(label.shape), "affine": affine}
    for name in ("case_pred.nii.gz", "case_pred.nii"):
        out = write_prediction_nifti(label, meta, tmp_path / "pred" / name)
        img = nib.load(out)
        assert np.array_equal(np.asarray(img.dataobj), label) and np.allclose(img.affine, affine)
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert (tmp_path / "pred" / "case_pred.nii.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert sorted(os.listdir(tmp_path / "pred")) == ["case_pred.nii", "case_pred.nii.gz"]
