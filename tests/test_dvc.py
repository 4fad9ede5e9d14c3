"""Issue 6 part 4: dvc.yaml describes the main job's stages (cohort, xray, ct, mri, ensemble, export) so
that `dvc repro` reruns only what changed. Run for real on the tiny pipeline in a copy of the project."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import PYTHON, ROOT, cli_ok

pytest.importorskip("dvc", reason="DVC is not installed (the optional `dvc` extra: pip install -e .[dvc])")
pytestmark = pytest.mark.slow  # every test reads one real `dvc repro` of the whole tiny pipeline

STAGES = ["cohort", "xray", "ct", "mri", "ensemble", "export"]
BASE_CHECKPOINTS = ["xray/resnet18_best.pth", "ct/3dcnn_best.pth", "mri/unet_best.pth"]
REPORT = Path("outputs/main/dvc/ensemble/report")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _dvc(root: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`dvc <args>` in root, as a user of the venv would run it (stage commands call `python`)."""
    env = {
        **os.environ,
        "MEDENS_ROOT": str(root),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "DVC_NO_ANALYTICS": "1",
        # keep DVC's machine-wide state and any user/system DVC config out of the test
        "DVC_SITE_CACHE_DIR": str(root / ".dvc_site"),
        "DVC_GLOBAL_CONFIG_DIR": str(root / ".dvc_global"),
        "DVC_SYSTEM_CONFIG_DIR": str(root / ".dvc_system"),
        "PATH": os.pathsep.join([str(Path(PYTHON).parent), os.environ.get("PATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _status(root: Path) -> dict:
    return json.loads(cli_ok(_dvc(root, "status", "--json")).strip().splitlines()[-1])


def _ensemble_epochs_edit(tiny: Path, new: int | None = None) -> tuple[str, str]:
    """The `trainer.max_epochs=N` item of the tiny pipeline's ensemble overrides, and its text with N
    replaced by `new` (default: N - 5)."""
    text = tiny.read_text()
    (old,) = [o for o in yaml.safe_load(text)["overrides"]["ensemble"] if o.startswith("trainer.max_epochs=")]
    n = int(old.split("=")[1])
    new_item = f"trainer.max_epochs={n - 5 if new is None else new}"
    assert text.count(f"- {old}\n") == 1, text
    return old, text.replace(f"- {old}\n", f"- {new_item}\n")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project (dvc.yaml, conf/, scripts/, medens/ as dependency sources) on the tiny
    pipeline, `dvc repro` run once; yields (root, that run's log)."""
    root = tmp_path_factory.mktemp("dvc_project")
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy2(ROOT / name, root / name)
    for name in ("conf", "scripts", "medens"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(pipeline="tiny", xray_arch="resnet18")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    if shutil.which("git"):
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
        cli_ok(_dvc(root, "init", "-q"))
    else:
        cli_ok(_dvc(root, "init", "-q", "--no-scm"))
    cli_ok(_dvc(root, "config", "core.check_update", "false"))
    out = cli_ok(_dvc(root, "repro", timeout=900))
    (root / "repro_1.log").write_text(out)
    yield root, out
    shutil.rmtree(root / ".dvc" / "cache", ignore_errors=True)  # copies of every out: the bulk of the disk


def test_first_repro_runs_every_stage_and_writes_the_outs(project):
    root, out = project
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out, stage
    assert (root / "data" / "cohort" / "manifest.csv").is_file()
    for ckpt in BASE_CHECKPOINTS:
        assert (root / "saved_models" / ckpt).is_file(), ckpt
        assert (root / "saved_models" / Path(ckpt).parent / "training_history.json").is_file()
    for name in ("meta_learner.pth", "weighted_average.json", "ensemble_history.json"):
        assert (root / "saved_models" / "ensemble" / name).is_file(), name
    for name in ("report.json", "report.md", "report.html", "roc_curves.png", "predictions.csv"):
        assert (root / REPORT / name).is_file(), name
    # medens' own stage stamps did not skip anything: each model stage trained under DVC
    for stage in ("xray", "ct", "mri", "ensemble"):
        assert f"[1/1] {stage}: done" in out, stage
    # the export stage ran on the tiny X-ray model (templated checkpoint name) and verified every target
    manifest = json.loads((root / "saved_models" / "exports" / "manifest.json").read_text())
    targets = yaml.safe_load((root / "conf" / "export.yaml").read_text())["targets"]
    assert targets and set(manifest["exports"]) == set(targets), manifest["exports"].keys()
    for name, entry in manifest["exports"].items():
        assert (root / "saved_models" / "exports" / entry["file"]).is_file(), name
    xray = [e for n, e in manifest["exports"].items() if n.startswith("xray_")]
    assert xray and all(e["source_checkpoint"]["path"].endswith("xray/resnet18_best.pth") for e in xray), xray
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert sorted(lock["stages"]) == sorted(STAGES)
    # everything went under MEDENS_ROOT=root, into the fixed run folder (no timestamped main run)
    assert not (root / "outputs" / "main" / "runs").exists()


def test_second_repro_reruns_nothing(project):
    root, _ = project
    out = cli_ok(_dvc(root, "repro"))
    assert "Running stage" not in out, out
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in out, stage
    assert _status(root) == {}


def test_status_follows_code_and_config_values_not_comments_or_bytecode(project):
    root, _ = project
    conf = root / "conf" / "experiment" / "cohort_xray.yaml"
    code = root / "medens" / "models" / "ct.py"
    conf_text, code_text = conf.read_text(), code.read_text()
    try:
        conf.write_text(conf_text + "# a comment changes no parameter\n")
        pyc = root / "medens" / "training" / "__pycache__" / "train.cpython-999.pyc"
        pyc.parent.mkdir(exist_ok=True)
        pyc.write_bytes(b"bytecode")
        assert _status(root) == {}
        code.write_text(code_text + "# an edit to the CT model code\n")
        assert _status(root) == {"ct": [{"changed deps": {"medens/models/ct.py": "modified"}}]}
        conf.write_text(conf_text.replace("max_epochs: 4", "max_epochs: 3"))
        status = _status(root)
        assert set(status) == {"xray", "ct"}, status
        assert "conf/experiment/cohort_xray.yaml" in json.dumps(status["xray"])
    finally:
        conf.write_text(conf_text)
        code.write_text(code_text)
    assert _status(root) == {}


def test_ensemble_param_reruns_only_ensemble_and_export(project):
    root, _ = project
    sm = root / "saved_models"
    base_before = {c: (_sha(sm / c), (sm / c).stat().st_mtime_ns) for c in BASE_CHECKPOINTS}
    cohort_before = (root / "data" / "cohort" / "manifest.csv").stat().st_mtime_ns
    meta_before = _sha(sm / "ensemble" / "meta_learner.pth")
    export_before = (sm / "exports" / "manifest.json").read_text()
    tiny = root / "conf" / "pipeline" / "tiny.yaml"
    original = tiny.read_text()
    old, edited = _ensemble_epochs_edit(tiny)
    tiny.write_text(edited)
    try:
        status = _status(root)
        assert set(status) == {"ensemble"}, status
        assert "overrides.ensemble" in json.dumps(status)
        out = cli_ok(_dvc(root, "repro", timeout=600))
        assert "Running stage 'ensemble'" in out and "Running stage 'export'" in out, out[-3000:]
        for stage in ("cohort", "xray", "ct", "mri"):
            assert f"Stage '{stage}' didn't change, skipping" in out, stage
        assert {c: (_sha(sm / c), (sm / c).stat().st_mtime_ns) for c in BASE_CHECKPOINTS} == base_before
        assert (root / "data" / "cohort" / "manifest.csv").stat().st_mtime_ns == cohort_before
        meta = torch.load(sm / "ensemble" / "meta_learner.pth", weights_only=True)
        assert meta["hyperparameters"]["trainer"]["max_epochs"] == int(old.split("=")[1]) - 5
        assert (sm / "exports" / "manifest.json").read_text() != export_before  # re-exported
        assert _status(root) == {}
    finally:
        tiny.write_text(original)
    # back to the first value: DVC's run-cache restores the first ensemble and export, no training
    out = cli_ok(_dvc(root, "repro"))
    for stage in ("ensemble", "export"):
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in out, out[-3000:]
    assert "Running stage" not in out
    assert _sha(sm / "ensemble" / "meta_learner.pth") == meta_before
    assert (sm / "exports" / "manifest.json").read_text() == export_before
