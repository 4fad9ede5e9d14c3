"""Semantic versions of checkpoints: naming, refusal, bumping, integrity, atomicity (no MLflow here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medens.errors import RegistryError
from medens.registry import (
    SemVer,
    list_versions,
    load_versioned,
    next_version,
    promote_checkpoint,
    split_checkpoint_name,
    verify_versioned,
    versioning,
)
from tests.helpers import folder_names, make_checkpoint


@pytest.fixture
def best(tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "saved_models" / "xray" / "resnet50_best.pth")


def test_promote_writes_versioned_copy_and_metadata(best: Path):
    res = promote_checkpoint(best, version="1.1.0", notes="first clinical candidate")
    assert res.path == best.parent / "resnet50_v1.1.0_best.pth"
    assert res.metadata_path == best.parent / "resnet50_v1.1.0_best.json"
    assert res.path.read_bytes() == best.read_bytes()
    meta = json.loads(res.metadata_path.read_text())
    for key in (
        "model_name",
        "version",
        "dataset",
        "training_date",
        "hyperparameters",
        "performance",
        "notes",
    ):
        assert key in meta, key
    assert meta["model_name"] == "resnet50" and meta["version"] == "1.1.0" and meta["modality"] == "xray"
    assert meta["training_date"] == "2025-01-02T03:04:05+00:00"
    assert meta["dataset"]["root"] == "/data/nih"
    assert meta["hyperparameters"]["model"]["optimizer"]["lr"] == 0.001
    assert meta["performance"]["best_metric"] == pytest.approx(0.81)
    assert meta["performance"]["monitor"] == "val/auc"
    assert meta["notes"] == "first clinical candidate"
    assert meta["sha256"] == versioning.sha256_file(res.path)
    ckpt = load_versioned(res.path)
    torch.testing.assert_close(
        ckpt["model_state_dict"]["fc.weight"], torch.load(best)["model_state_dict"]["fc.weight"]
    )
    assert [str(v.version) for v in list_versions(best.parent, "resnet50")] == ["1.1.0"]
    assert not [n for n in folder_names(best.parent) if n.startswith(".")]


def test_naming_rule_for_ensemble_and_periodic_checkpoints(tmp_path: Path):
    meta = make_checkpoint(tmp_path / "ensemble" / "meta_learner.pth", modality="ensemble")
    ep = make_checkpoint(tmp_path / "ct" / "3dcnn_epoch_15.pth", modality="ct")
    assert promote_checkpoint(meta, bump="major").path.name == "meta_learner_v1.0.0.pth"
    assert (tmp_path / "ensemble" / "meta_learner_v1.0.0.json").is_file()
    assert promote_checkpoint(ep, version="0.2.0").path.name == "3dcnn_v0.2.0_epoch_15.pth"
    assert split_checkpoint_name("resnet50_v1.10.0-rc.1_best.pth") == (
        "resnet50",
        "_best",
        SemVer.parse("1.10.0-rc.1"),
    )
    assert split_checkpoint_name("meta_learner.pth") == ("meta_learner", "", None)
    # promoting a versioned file again versions the same model, not "resnet50_v1.1.0"
    best = make_checkpoint(tmp_path / "xray" / "resnet50_best.pth")
    first = promote_checkpoint(best, version="1.1.0")
    again = promote_checkpoint(first.path, bump="patch")
    assert again.path.name == "resnet50_v1.1.1_best.pth" and again.model_name == "resnet50"


def test_existing_version_is_refused_and_left_untouched(best: Path):
    first = promote_checkpoint(best, version="1.1.0", notes="original")
    before = first.path.read_bytes(), first.metadata_path.read_text()
    make_checkpoint(best, seed=1)  # a newer best checkpoint under the same name
    for version in ("1.1.0", "1.1.0+build.7"):  # same precedence counts as the same version
        with pytest.raises(RegistryError, match="already exists"):
            promote_checkpoint(best, version=version)
    assert (first.path.read_bytes(), first.metadata_path.read_text()) == before
    assert folder_names(best.parent) == {
        "resnet50_best.pth",
        "resnet50_v1.1.0_best.pth",
        "resnet50_v1.1.0_best.json",
        "resnet50_v1.1.0_best.model_card.md",  # written beside every promoted version (issue 15)
    }


@pytest.mark.parametrize(
    "bad", ["1.0", "1", "v1.0.0", "1.0.0.0", "01.0.0", "1.0.0-", "1.0.0-01", "1.0.0+", "latest", "", "1.0.0 "]
)
def test_non_semver_is_refused(best: Path, bad: str):
    if bad == "1.0.0 ":  # surrounding blanks from a shell are tolerated, nothing else
        assert promote_checkpoint(best, version=bad).version == "1.0.0"
        return
    with pytest.raises(RegistryError, match="not a semantic version"):
        promote_checkpoint(best, version=bad)
    assert folder_names(best.parent) == {"resnet50_best.pth"}


def test_bump_from_latest_existing_version(best: Path):
    assert promote_checkpoint(best, bump="minor").version == "0.1.0"  # no version yet: bump from 0.0.0
    assert promote_checkpoint(best, bump="patch").version == "0.1.1"
    assert promote_checkpoint(best, version="1.9.0").version == "1.9.0"
    assert promote_checkpoint(best, bump="minor").version == "1.10.0"  # numeric, not lexical
    assert promote_checkpoint(best, version="2.0.0-rc.1").version == "2.0.0-rc.1"
    assert promote_checkpoint(best, bump="major").version == "2.0.0"  # releases the prerelease
    assert promote_checkpoint(best, bump="major").version == "3.0.0"
    with pytest.raises(RegistryError, match="exactly one of"):
        promote_checkpoint(best)
    with pytest.raises(RegistryError, match="exactly one of"):
        promote_checkpoint(best, version="4.0.0", bump="major")
    with pytest.raises(RegistryError, match="bump must be one of"):
        promote_checkpoint(best, bump="huge")
    assert SemVer.parse("1.2.0-rc.1").bump("minor") == SemVer.parse("1.2.0")
    assert SemVer.parse("1.2.3-rc.1").bump("minor") == SemVer.parse("1.3.0")
    assert SemVer.parse("1.2.3-rc.1").bump("patch") == SemVer.parse("1.2.3")
    assert next_version([], bump="major") == SemVer(1, 0, 0)
    assert next_version([], bump="patch") == SemVer(0, 0, 1)


def test_semver_ordering():
    spec = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2",
            "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.9.0", "1.10.0", "2.0.0"]  # fmt: skip
    shuffled = spec[::-1][1::2] + spec[::-1][0::2]
    assert [str(v) for v in sorted(map(SemVer.parse, shuffled))] == spec
    assert SemVer.parse("1.0.0+build.1") == SemVer.parse("1.0.0+build.2")  # build metadata has no precedence
    assert str(SemVer.parse("1.0.0-rc.1+build.5")) == "1.0.0-rc.1+build.5"


def test_list_versions_sorts_by_precedence(best: Path):
    for v in ("1.9.0", "1.10.0", "1.10.0-rc.1", "1.2.0"):
        promote_checkpoint(best, version=v)
    make_checkpoint(best.parent / "densenet_best.pth")
    promote_checkpoint(best.parent / "densenet_best.pth", version="5.0.0")
    assert [str(v.version) for v in list_versions(best.parent, "resnet50")] == [
        "1.2.0",
        "1.9.0",
        "1.10.0-rc.1",
        "1.10.0",
    ]
    everything = list_versions(best.parent)
    assert [(v.model_name, str(v.version)) for v in everything][-1] == ("resnet50", "1.10.0")
    assert all(v.complete for v in everything) and len(everything) == 5


def test_tampered_file_is_detected(best: Path):
    res = promote_checkpoint(best, version="1.0.0")
    expected = json.loads(res.metadata_path.read_text())["sha256"]
    data = bytearray(res.path.read_bytes())
    data[len(data) // 2] ^= 0x01
    res.path.write_bytes(bytes(data))
    actual = versioning.sha256_file(res.path)
    for check in (load_versioned, verify_versioned):
        with pytest.raises(RegistryError, match="SHA-256 mismatch") as err:
            check(res.path)
        msg = str(err.value)
        assert res.path.name in msg and expected in msg and actual in msg


def test_missing_or_broken_metadata_is_refused(best: Path):
    res = promote_checkpoint(best, version="1.0.0")
    res.metadata_path.unlink()
    with pytest.raises(RegistryError, match=r"metadata file resnet50_v1.0.0_best.json is missing"):
        load_versioned(res.path)
    res.metadata_path.write_text("{not json")
    with pytest.raises(RegistryError, match="unreadable metadata"):
        load_versioned(res.path)


def test_failed_copy_leaves_nothing(best: Path, monkeypatch):
    def half_copy(src, dst, hasher):
        dst.write(src.read(100))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(versioning, "_copy_stream", half_copy)
    with pytest.raises(OSError, match="No space left"):
        promote_checkpoint(best, version="1.0.0")
    assert folder_names(best.parent) == {"resnet50_best.pth"}  # no temp file, no copy, no metadata
    assert list_versions(best.parent) == []


def test_failed_metadata_write_removes_the_copy(best: Path, monkeypatch):
    def broken(path, doc):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(versioning, "_atomic_write_json", broken)
    with pytest.raises(OSError, match="I/O error"):
        promote_checkpoint(best, version="1.0.0")
    assert folder_names(best.parent) == {"resnet50_best.pth"}


def test_report_adds_test_metrics_only_for_the_same_checkpoint(best: Path, tmp_path: Path):
    sha = versioning.sha256_file(best)
    report = tmp_path / "metrics.json"
    report.write_text(json.dumps({"mean_auc": 0.77, "split": "test", "n_cases": 40, "checkpoint_sha256": sha,
                                  "auc": {"Mass": 0.7, "Hernia": None}}))  # fmt: skip
    meta = promote_checkpoint(best, version="1.0.0", report=report).metadata
    assert meta["performance"]["test"]["mean_auc"] == pytest.approx(0.77)
    assert meta["performance"]["test"]["auc"] == {"Mass": 0.7, "Hernia": None}
    report.write_text(json.dumps({"mean_auc": 0.9, "split": "test", "checkpoint_sha256": "0" * 64}))
    with pytest.raises(RegistryError, match="another checkpoint"):
        promote_checkpoint(best, version="1.1.0", report=report)
    assert not (best.parent / "resnet50_v1.1.0_best.pth").exists()


def test_not_a_checkpoint_is_refused(tmp_path: Path):
    bogus = tmp_path / "xray" / "resnet50_best.pth"
    bogus.parent.mkdir(parents=True)
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(RegistryError, match="cannot promote"):
        promote_checkpoint(bogus, version="1.0.0")
    with pytest.raises(RegistryError, match="not found"):
        promote_checkpoint(tmp_path / "nope_best.pth", version="1.0.0")
    assert folder_names(bogus.parent) == {"resnet50_best.pth"}
