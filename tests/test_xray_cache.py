"""The X-ray decoded-image cache: built once, keyed by config and files, atomic, failures named, read-only."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medens.data.loaders import make_loader
from medens.data.synthetic_xray import ensure_synthetic_nih
from medens.data.xray import XRayDataModule
from medens.data.xray_cache import IMAGES, MANIFEST, cache_settings, decode_resized
from medens.errors import ConfigError, DataError
from medens.utils.seeding import EpochShuffleSampler
from tests.helpers import TINY_XRAY, cli_ok, run_cli


@pytest.fixture
def nih(tmp_path: Path) -> Path:
    return ensure_synthetic_nih(tmp_path / "nih", n_patients=12, images_per_patient=2, image_size=48, seed=3)


def _dm(root: Path, cache_dir: Path, **kw) -> XRayDataModule:
    cache = {"enabled": True, "dir": str(cache_dir), "workers": 2, "progress": False, **kw.pop("cache", {})}
    return XRayDataModule(str(root), image_size=32, batch_size=4, val_fraction=0.2, test_fraction=0.2,
                          cache=cache, **kw)  # fmt: skip


def _folders(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.glob("xray-*") if p.is_dir())


@pytest.mark.slow
def test_cache_is_built_once_and_holds_the_decoded_resized_images(nih, tmp_path, caplog):
    cache_dir = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="medens.data.xray_cache")
    dm = _dm(nih, cache_dir)
    dm.setup()
    (folder,) = _folders(cache_dir)
    manifest = json.loads((folder / MANIFEST).read_text())
    arr = np.load(folder / IMAGES)
    assert arr.dtype == np.uint8 and arr.shape == (len(manifest["names"]), 32, 32)  # default: the training size
    for i in (0, 7, len(arr) - 1):
        np.testing.assert_array_equal(arr[i], decode_resized(nih / "images" / manifest["names"][i], 32))
    assert manifest["failed"] == {} and "building the X-ray image cache" in caplog.text
    # a dataset item reads its row of the cache: same image as a PNG decode at the cache size, then resized
    ds = dm.datasets["val"]
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and ds.cache_rows[0] == manifest["names"].index(item["case_id"])
    # at the default size (the training size) cached and PNG-decoded items are the same pixels
    plain = XRayDataModule(str(nih), image_size=32, batch_size=4, val_fraction=0.2, test_fraction=0.2, cache=False)
    plain.setup()
    assert plain.datasets["val"].ids == ds.ids
    for i in range(len(ds)):
        torch.testing.assert_close(plain.datasets["val"][i]["image"], ds[i]["image"], rtol=0, atol=0)
    # a second datamodule reuses it: no rebuild, same folder, file untouched
    mtime = (folder / IMAGES).stat().st_mtime_ns
    caplog.clear()
    dm2 = _dm(nih, cache_dir)
    dm2.setup()
    assert _folders(cache_dir) == [folder] and (folder / IMAGES).stat().st_mtime_ns == mtime
    assert "building" not in caplog.text
    assert {k: len(v) for k, v in dm2.datasets.items()} == {k: len(v) for k, v in dm.datasets.items()}


def test_another_config_or_a_changed_image_builds_another_cache(nih, tmp_path):
    cache_dir = tmp_path / "cache"
    _dm(nih, cache_dir).setup()
    (first,) = _folders(cache_dir)
    _dm(nih, cache_dir, cache={"size": 40}).setup()  # another size: another key
    assert len(_folders(cache_dir)) == 2
    assert {json.loads((f / MANIFEST).read_text())["payload"]["size"] for f in _folders(cache_dir)} == {32, 40}
    # a changed image (new content, new mtime) is never served from the old cache
    name = json.loads((first / MANIFEST).read_text())["names"][0]
    img = nih / "images" / name
    Image.fromarray(np.full((48, 48), 255, np.uint8), mode="L").save(img)
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    dm = _dm(nih, cache_dir)
    dm.setup()
    assert len(_folders(cache_dir)) == 3 and dm.cache.folder != first
    assert (dm.cache.image(dm.cache.row(name)) == 255).all()
    # a cache whose manifest records another config is not reused even under the right name
    manifest = json.loads((dm.cache.folder / MANIFEST).read_text())
    manifest["payload"]["size"] = 99
    (dm.cache.folder / MANIFEST).write_text(json.dumps(manifest))
    dm2 = _dm(nih, cache_dir)
    dm2.setup()
    assert json.loads((dm2.cache.folder / MANIFEST).read_text())["payload"]["size"] == 32


def test_undecodable_image_is_named_then_fatal_or_skipped(nih, tmp_path, caplog):
    bad = sorted((nih / "images").iterdir())[3]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=rf"{bad.name}.*data.missing_images=skip"):
        _dm(nih, tmp_path / "c").setup()
    (folder,) = _folders(tmp_path / "c")  # the cache is complete and records the failure
    assert list(json.loads((folder / MANIFEST).read_text())["failed"]) == [bad.name]
    caplog.set_level(logging.WARNING)
    dm = _dm(nih, tmp_path / "c", missing_images="skip")
    dm.setup()
    assert bad.name in caplog.text and "1 of" in caplog.text
    ids = [i for ds in dm.datasets.values() for i in ds.ids]
    assert bad.name not in ids and len(ids) == len(json.loads((folder / MANIFEST).read_text())["names"]) - 1
    assert bad.name in dm.skipped and _folders(tmp_path / "c") == [folder]


def test_interrupted_build_leaves_no_cache_that_looks_complete(nih, tmp_path, monkeypatch):
    import medens.data.xray_cache as xc

    def boom(*a, **k):
        raise KeyboardInterrupt("killed during the build")

    monkeypatch.setattr(xc, "_build", boom)
    with pytest.raises(KeyboardInterrupt):
        _dm(nih, tmp_path / "c").setup()
    assert _folders(tmp_path / "c") == [] and not [p for p in (tmp_path / "c").iterdir() if p.is_dir()]
    monkeypatch.undo()
    dm = _dm(nih, tmp_path / "c")
    dm.setup()
    assert len(_folders(tmp_path / "c")) == 1 and len(dm.datasets["train"]) > 0


@contextlib.contextmanager
def _read_only_folder(tmp_path: Path):
    """A folder that cannot be written: a read-only tmpfs as root (where mount works), else chmod 555,
    else a path below a regular file."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "none", str(ro)],
                          capture_output=True).returncode == 0:  # fmt: skip
            try:
                yield ro / "cache"
            finally:
                subprocess.run(["umount", str(ro)], check=False)
            return
        (tmp_path / "file").write_text("x")
        yield tmp_path / "file" / "cache"
        return
    ro.chmod(0o555)
    try:
        yield ro / "cache"
    finally:
        ro.chmod(0o755)


def test_unwritable_cache_folder_is_an_error_or_a_warned_fallback(nih, tmp_path, caplog):
    with _read_only_folder(tmp_path) as ro:
        with pytest.raises(DataError, match=r"cannot write the X-ray image cache.*on_unwritable=no_cache"):
            _dm(nih, ro).setup()
        caplog.set_level(logging.WARNING)
        dm = _dm(nih, ro, cache={"on_unwritable": "no_cache"})
        dm.setup()
        assert dm.cache is None and "WITHOUT the cache" in caplog.text
        assert dm.datasets["train"][0]["image"].shape == (3, 32, 32)  # decoded from the PNG


def test_bad_cache_settings_are_named():
    with pytest.raises(ConfigError, match="data.cache.sise"):
        cache_settings({"enabled": True, "dir": "x", "sise": 3})
    with pytest.raises(ConfigError, match="on_unwritable='ignore'"):
        cache_settings({"enabled": True, "dir": "x", "on_unwritable": "ignore"})
    with pytest.raises(ConfigError, match="data.cache.size=4"):
        cache_settings({"enabled": True, "dir": "x", "size": 4})


def test_cached_loader_is_reproducible_across_workers_and_shards_over_ranks(nih, tmp_path):
    dm = _dm(nih, tmp_path / "c")
    dm.setup()
    ds = dm.datasets["train"]

    def batches(workers: int) -> list[torch.Tensor]:
        loader = make_loader(ds, batch_size=4, shuffle=True, seed=7, num_workers=workers)
        loader.sampler.set_epoch(2)
        return [b["image"] for b in loader]

    for a, b in zip(batches(0), batches(2), strict=True):  # same augmentation with 0 or 2 workers
        torch.testing.assert_close(a, b)
    shards = [EpochShuffleSampler(ds, seed=7, num_replicas=2, rank=r) for r in (0, 1)]
    seen = [i for s in shards for i, _ in s]
    assert sorted(set(seen)) == list(range(len(ds))) and len(seen) == len(ds) + len(ds) % 2


@pytest.mark.slow
def test_cli_builds_the_cache_once_and_resumes_exactly_on_it(tmp_path):
    common = ["experiment=xray", *TINY_XRAY, "trainer.max_epochs=3", "trainer.deterministic=true", "test=false",
              "logger=none", "callbacks.model_checkpoint_periodic.every_n_epochs=1", "data.num_workers=2",
              "data.cache.workers=2"]  # fmt: skip
    out = cli_ok(run_cli("train.py", *common, f"paths.saved_models_dir={tmp_path}/full", root=tmp_path))
    assert "building the X-ray image cache" in out
    (folder,) = _folders(tmp_path / "data" / "cache" / "xray")
    epoch2 = tmp_path / "full" / "xray" / "resnet18_epoch_2.pth"
    out = cli_ok(run_cli("train.py", *common, f"paths.saved_models_dir={tmp_path}/resumed", f"ckpt_path={epoch2}",
                         root=tmp_path))  # fmt: skip
    assert "building the X-ray image cache" not in out and _folders(tmp_path / "data" / "cache" / "xray") == [folder]
    from medens.checkpoint import load_checkpoint
    from tests.helpers import assert_same_training_state

    assert_same_training_state(
        load_checkpoint(tmp_path / "full" / "xray" / "resnet18_epoch_3.pth"),
        load_checkpoint(tmp_path / "resumed" / "xray" / "resnet18_epoch_3.pth"),
    )
