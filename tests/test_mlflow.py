"""MLflow against real stores: a SQLite store in tmp_path and an `mlflow server` started here."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from medens.errors import RegistryError
from medens.registry import MlflowRegistry, list_versions, promote_checkpoint, versioning
from tests import servers
from tests.helpers import TINY_XRAY, cli_ok, folder_names, make_checkpoint, run_cli
from tests.servers import free_port, mlflow_cli

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
from mlflow.tracking import MlflowClient  # noqa: E402

QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    for key, value in QUIET.items():
        monkeypatch.setenv(key, value)


def sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture
def best(tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "saved_models" / "xray" / "resnet50_best.pth")


# --- (a) training with logger=mlflow into the embedded SQLite store ---------------------------------------


@pytest.mark.slow
def test_training_logs_params_metrics_and_artifacts(compose_train, tmp_path, monkeypatch):
    from medens.training.train import train

    monkeypatch.chdir(tmp_path)  # a stray ./mlruns would land here
    cfg = compose_train(*TINY_XRAY, "trainer.max_epochs=2", "trainer.limit_train_batches=2", "test=false",
                        "logger=mlflow")  # fmt: skip
    assert cfg.logger.mlflow.tracking_uri == f"sqlite:///{tmp_path}/outputs/mlflow.db"
    report = tmp_path / "run" / "evaluation" / "metrics.json"  # a report already in the run folder
    report.parent.mkdir(parents=True)
    report.write_text('{"mean_auc": 0.5}')
    metrics, objects = train(cfg)
    client = MlflowClient(cfg.logger.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.task_name)
    (run,) = client.search_runs([exp.experiment_id])
    params = run.data.params
    assert params["trainer/max_epochs"] == "2" and params["seed"] == "42"
    assert params["model/net/arch"] == "resnet18" and params["data/image_size"] == "32"
    assert params["callbacks/history/path"] == f"{tmp_path}/saved_models/xray/training_history.json"
    assert not [k for k, v in params.items() if "${" in v], "params must be the resolved config"
    for name in ("train/loss", "val/loss", "val/auc"):
        history = client.get_metric_history(run.info.run_id, name)
        assert len(history) == 2, (name, history)  # one value per epoch
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"training_history.json", "checkpoints", "config"} <= files
    ckpts = [f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert ckpts == ["checkpoints/resnet18_best.pth"]
    art_dir = Path(run.info.artifact_uri.removeprefix("file://"))
    assert art_dir.is_relative_to(tmp_path / "outputs" / "mlartifacts"), art_dir
    logged = art_dir / "checkpoints" / "resnet18_best.pth"
    assert logged.read_bytes() == Path(objects["best_checkpoint"]).read_bytes()
    assert '"epochs"' in (art_dir / "training_history.json").read_text()
    assert "max_epochs: 2" in (art_dir / "config" / "config.yaml").read_text()
    assert (art_dir / "reports" / "evaluation" / "metrics.json").read_text() == '{"mean_auc": 0.5}'
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()


def test_artifact_callback_is_a_no_op_without_mlflow_logger(compose_train, tmp_path):
    from medens.training.train import train

    cfg = compose_train(*TINY_XRAY, "trainer.max_epochs=1", "trainer.limit_train_batches=1", "test=false",
                        "logger=csv")  # fmt: skip
    assert "mlflow_artifacts" in cfg.callbacks
    train(cfg)
    assert not (tmp_path / "outputs" / "mlflow.db").exists()
    assert not (tmp_path / "outputs" / "mlartifacts").exists()


# --- promotion registered in the local SQLite store, through the real CLI ----------------------------------


@pytest.mark.slow
def test_promote_cli_registers_in_default_sqlite_store(tmp_path: Path):
    best = make_checkpoint(tmp_path / "saved_models" / "xray" / "resnet50_best.pth")
    out = cli_ok(run_cli("promote.py", "ckpt_path=saved_models/xray/resnet50_best.pth", "version=1.1.0",
                         "notes=first release", root=tmp_path, env=QUIET))  # fmt: skip
    assert "resnet50 1.1.0" in out and "medens-xray-resnet50 version 1" in out
    versioned = best.parent / "resnet50_v1.1.0_best.pth"
    meta = versioning.read_metadata(versioned)
    assert meta["notes"] == "first release" and meta["registry"]["model_version"] == "1"
    client = MlflowClient(sqlite_uri(tmp_path / "outputs" / "mlflow.db"))
    mv = client.get_model_version("medens-xray-resnet50", "1")
    assert mv.tags["medens.version"] == "1.1.0" and mv.tags["medens.sha256"] == meta["sha256"]
    assert mv.tags["medens.hyperparameters_sha256"] == meta["hyperparameters_sha256"]
    assert mv.source.startswith(str(tmp_path / "outputs" / "mlartifacts"))
    out = cli_ok(
        run_cli("promote.py", "action=list", "ckpt_path=saved_models/xray", root=tmp_path, env=QUIET)
    )
    assert "resnet50  1.1.0  resnet50_v1.1.0_best.pth" in out
    proc = run_cli("promote.py", "ckpt_path=saved_models/xray/resnet50_best.pth", "version=1.1",
                   "registry.enabled=false", root=tmp_path, env=QUIET)  # fmt: skip
    assert proc.returncode != 0 and "'1.1' is not a semantic version" in proc.stderr


# --- (b) a real tracking server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    if mlflow_cli() is None:
        pytest.skip("the `mlflow` command is not installed (pip install 'medens[mlflow]')")
    root = tmp_path_factory.mktemp("mlflow_server")
    with servers.mlflow_server(root, sqlite_uri(root / "server.db"), str(root / "artifacts"), env=QUIET) as server:
        yield {"uri": server["uri"], "root": root}


@pytest.mark.slow
def test_promote_registers_on_server(mlflow_server, best: Path, tmp_path: Path):
    uri = mlflow_server["uri"]
    registry = MlflowRegistry(tracking_uri=uri, experiment_name="medens-registry-test")
    first = promote_checkpoint(best, version="1.0.0", notes="baseline", registry=registry)
    second = promote_checkpoint(best, bump="minor", registry=registry)
    assert second.version == "1.1.0"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert client.get_registered_model("medens-xray-resnet50").name == "medens-xray-resnet50"
    for res, mlflow_version in ((first, "1"), (second, "2")):
        mv = client.get_model_version("medens-xray-resnet50", mlflow_version)
        assert mv.tags["medens.version"] == res.version
        assert mv.tags["medens.sha256"] == res.metadata["sha256"] == versioning.sha256_file(res.path)
        assert mv.run_id == res.registry["run_id"] and res.registry["model_version"] == mlflow_version
    assert client.get_model_version("medens-xray-resnet50", "1").tags["medens.notes"] == "baseline"
    # the artifact on the server is the versioned file itself, with its metadata beside it
    dst = tmp_path / "download"
    dst.mkdir()
    got = Path(client.download_artifacts(first.registry["run_id"], "checkpoint", str(dst)))
    assert versioning.sha256_file(got / "resnet50_v1.0.0_best.pth") == first.metadata["sha256"]
    assert (got / "resnet50_v1.0.0_best.json").is_file()
    assert (mlflow_server["root"] / "artifacts").is_dir()
    # the registry remembers versions even when the local files are gone: refused, nothing written
    first.path.unlink()
    first.metadata_path.unlink()
    with pytest.raises(RegistryError, match="already has medens version 1.0.0"):
        promote_checkpoint(best, version="1.0.0", registry=registry)
    assert not first.path.exists() and not first.metadata_path.exists()


# --- (d) bad input: unreachable server, failing registration ----------------------------------------------


def test_unreachable_server_fails_fast_and_writes_nothing(best: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    def no_copy(*args):
        raise AssertionError("the checkpoint was copied before the registry was checked")

    monkeypatch.setattr(versioning, "_atomic_copy", no_copy)
    t0 = time.monotonic()
    with pytest.raises(RegistryError, match=f"MLflow tracking server {uri} is unreachable"):
        promote_checkpoint(best, version="1.0.0", registry=MlflowRegistry(tracking_uri=uri))
    assert time.monotonic() - t0 < 15
    assert folder_names(best.parent) == {"resnet50_best.pth"}
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the environment is restored


@pytest.mark.slow
def test_failed_registration_rolls_back(best: Path, tmp_path: Path, monkeypatch):
    uri = sqlite_uri(tmp_path / "outputs" / "mlflow.db")
    registry = MlflowRegistry(tracking_uri=uri)

    def refuse(self, *args, **kwargs):
        raise mlflow.exceptions.MlflowException("registry is read-only today")

    monkeypatch.setattr(MlflowClient, "create_model_version", refuse)
    with pytest.raises(RegistryError, match=r"registering resnet50_v1.0.0_best.pth .* failed .*read-only"):
        promote_checkpoint(best, version="1.0.0", registry=registry)
    assert folder_names(best.parent) == {"resnet50_best.pth"} and list_versions(best.parent) == []
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert client.search_registered_models() == []
    exp = client.get_experiment_by_name("medens-registry")
    runs = client.search_runs([exp.experiment_id], run_view_type=mlflow.entities.ViewType.ALL)
    assert [r.info.lifecycle_stage for r in runs] == ["deleted"]
    monkeypatch.undo()
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    ok = promote_checkpoint(best, version="1.0.0", registry=registry)  # a retry works
    assert ok.registry["model_version"] == "1"


@pytest.mark.slow
def test_failed_metadata_write_removes_registration(best: Path, tmp_path: Path, monkeypatch):
    uri = sqlite_uri(tmp_path / "outputs" / "mlflow.db")

    def broken(path, doc):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(versioning, "_atomic_write_json", broken)
    with pytest.raises(OSError, match="No space left"):
        promote_checkpoint(best, version="1.0.0", registry=MlflowRegistry(tracking_uri=uri))
    assert folder_names(best.parent) == {"resnet50_best.pth"}
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert client.search_registered_models() == []
