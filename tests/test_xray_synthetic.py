"""The synthetic NIH generator is atomic and locked; full-size images; empty table cells are errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from medens.data.synthetic_xray import ensure_synthetic_nih
from medens.data.xray import read_nih_table
from medens.errors import DataError
from tests.helpers import ROOT

GEN = (
    "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr);"
    "from medens.data.synthetic_xray import ensure_synthetic_nih;"
    "ensure_synthetic_nih(sys.argv[1], n_patients=int(sys.argv[2]), images_per_patient=2, image_size=int(sys.argv[3]))"
)


def _generator(root: Path, n_patients: int, size: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", GEN, str(root), str(n_patients), str(size)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _intact(root: Path) -> int:
    table = pd.read_csv(root / "Data_Entry_2017.csv")
    pngs = sorted(p.name for p in (root / "images").iterdir())
    assert sorted(table["Image Index"]) == pngs and (root / "synthetic.json").is_file()
    for name in pngs:
        with Image.open(root / "images" / name) as im:
            im.load()
    return len(pngs)


@pytest.mark.slow
def test_killed_generation_leaves_nothing_that_a_later_run_refuses(tmp_path):
    root = tmp_path / "nih"
    proc = _generator(root, 400, 160)
    deadline = time.time() + 600  # a loaded CI machine may take minutes to import torch
    while len(list(tmp_path.glob(".nih.tmp-*/images/*.png"))) < 5:
        assert proc.poll() is None, proc.communicate()
        if time.time() > deadline:
            proc.kill()
            pytest.fail("the generator wrote no image within 600 s")
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not root.exists(), "a killed generator must not leave a half set under the final name"
    assert list(tmp_path.glob(".nih.tmp-*")), "the killed build folder is there (to be cleaned next run)"

    ensure_synthetic_nih(root, n_patients=6, images_per_patient=2, image_size=32)
    assert _intact(root) > 0
    assert not list(tmp_path.glob(".nih.tmp-*")) and not (tmp_path / ".nih.lock").exists()


@pytest.mark.slow
def test_two_concurrent_generations_make_one_intact_set(tmp_path):
    root = tmp_path / "nih"
    procs = [_generator(root, 40, 64) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    logs = "".join(o + e for o, e in outs)
    assert logs.count("synthetic NIH set written") == 1, logs  # the second waited, then found it ready
    assert _intact(root) >= 40
    assert not list(tmp_path.glob(".nih.*"))
    mtime = (root / "synthetic.json").stat().st_mtime_ns
    ensure_synthetic_nih(root, n_patients=40, images_per_patient=2, image_size=64)  # same request: untouched
    assert (root / "synthetic.json").stat().st_mtime_ns == mtime


def test_full_size_1024_images(tmp_path):
    root = ensure_synthetic_nih(tmp_path / "nih", n_patients=1, images_per_patient=1, image_size=1024)
    (png,) = (root / "images").iterdir()
    with Image.open(png) as im:
        assert im.size == (1024, 1024) and im.mode == "L"
    assert pd.read_csv(root / "Data_Entry_2017.csv")["OriginalImage[Width"].tolist() == [1024]


@pytest.mark.parametrize("column", ["Patient ID", "Finding Labels", "Image Index"])
def test_empty_cell_is_an_error_naming_the_file_and_row(tmp_path, column):
    csv = tmp_path / "Data_Entry_2017.csv"
    rows = [{"Image Index": f"0000000{i}_000.png", "Finding Labels": "No Finding", "Patient ID": str(i)}
            for i in range(1, 5)]  # fmt: skip
    rows[2][column] = ""
    pd.DataFrame(rows).to_csv(csv, index=False)
    with pytest.raises(DataError, match=rf"Data_Entry_2017.csv row 4 .*empty '{column}'"):
        read_nih_table(csv)
    rows[2][column] = "   " if column == "Patient ID" else rows[2][column]
    if column == "Patient ID":
        pd.DataFrame(rows).to_csv(csv, index=False)
        with pytest.raises(DataError, match="row 4"):
            read_nih_table(csv)


def test_patient_ids_stay_strings_with_leading_zeros(tmp_path):
    csv = tmp_path / "Data_Entry_2017.csv"
    pd.DataFrame([{"Image Index": "a.png", "Finding Labels": "Mass", "Patient ID": "00012"}]).to_csv(csv, index=False)
    assert read_nih_table(csv)["Patient ID"].tolist() == ["00012"]
