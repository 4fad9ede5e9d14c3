"""The S3 model store against a real S3 server (moto's standalone server on loopback, over HTTP)."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from medens.registry import promote_checkpoint
from medens.registry.object_store import MARKER_NAME, ModelStore, StoreError, StoreSettings
from tests.helpers import cli_ok, make_checkpoint, run_cli
from tests.servers import AWS_TEST_ENV, CuttableProxy, make_bucket, moto_server, s3_client

pytest.importorskip("boto3", reason="the serve extra (boto3) is not installed")
pytest.importorskip("moto", reason="moto[server] (dev extra) is not installed")


@pytest.fixture(autouse=True)
def _aws_env(monkeypatch):
    for key, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def bucket(s3) -> str:
    name = f"models-{uuid.uuid4().hex[:10]}"
    make_bucket(s3["url"], name)
    return name


def settings(url: str, bucket: str, **kw) -> StoreSettings:
    base = dict(bucket=bucket, endpoint_url=url, addressing_style="path", multipart_threshold_mb=5,
                multipart_chunksize_mb=5, max_concurrency=2, max_attempts=1, connect_timeout_s=2,
                read_timeout_s=20)  # fmt: skip
    base.update(kw)
    return StoreSettings(**base)


def promoted(root: Path, version: str = "1.1.0", pad_mb: float = 0.0, seed: int = 0) -> Path:
    """A promoted X-ray checkpoint (optionally padded to a size that needs multipart) and an export of it."""
    best = make_checkpoint(root / "saved_models" / "xray" / "resnet50_best.pth", seed=seed)
    if pad_mb:
        ckpt = torch.load(best, weights_only=True)
        ckpt["model_state_dict"]["pad"] = torch.randn(
            int(pad_mb * (1 << 20) / 4), generator=torch.Generator().manual_seed(1)
        )
        torch.save(ckpt, best)
    res = promote_checkpoint(best, version=version, notes="store test")
    exports = root / "saved_models" / "exports"
    exports.mkdir(parents=True, exist_ok=True)
    (exports / "xray_torchscript.pt").write_bytes(b"not really torchscript " + version.encode())
    from medens.utils.hashing import sha256_file

    def entry(f: str, src: str) -> dict:
        return {"file": f, "sha256": sha256_file(exports / f), "source_checkpoint": {"sha256": src}}

    (exports / "ct_onnx.onnx").write_bytes(b"another model's export")
    manifest = {"format": "medens-exports/1", "exports": {
        "xray_torchscript": entry("xray_torchscript.pt", res.metadata["sha256"]),
        "ct_onnx": entry("ct_onnx.onnx", "0" * 64)}}  # fmt: skip
    (exports / "manifest.json").write_text(json.dumps(manifest))
    return res.path


def test_push_list_pull_verify_round_trip(s3, bucket, tmp_path):
    path = promoted(tmp_path)
    store = ModelStore(settings(s3["url"], bucket))
    sv = store.push(path, tmp_path / "saved_models" / "exports")
    assert sv.prefix == "medens/xray/resnet50_v1.1.0/"
    names = sorted(o.name for o in sv.objects)
    assert names == [
        "exports/manifest.json",
        "exports/xray_torchscript.pt",
        "resnet50_v1.1.0_best.json",
        "resnet50_v1.1.0_best.pth",
    ]  # fmt: skip  (ct_onnx came from another checkpoint)
    keys = {o["Key"] for o in s3_client(s3["url"]).list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {sv.prefix + n for n in [*names, MARKER_NAME]}

    (listed,) = store.list_versions("xray")
    assert str(listed.version) == "1.1.0" and listed.performance["val_auc"] == pytest.approx(0.81)
    assert listed.marker["exports"] == ["xray_torchscript"] and listed.marker["notes"] == "store test"

    dest = tmp_path / "pulled"
    files = store.pull("xray", "resnet50", "1.1.0", dest)
    assert files["resnet50_v1.1.0_best.pth"].read_bytes() == path.read_bytes()
    assert (dest / "resnet50_v1.1.0_exports" / "xray_torchscript.pt").read_bytes().endswith(b"1.1.0")
    pulled_manifest = json.loads((dest / "resnet50_v1.1.0_exports" / "manifest.json").read_text())
    assert list(pulled_manifest["exports"]) == ["xray_torchscript"]
    from medens.registry import load_versioned

    assert load_versioned(files["resnet50_v1.1.0_best.pth"])["epoch"] == 7  # the local SHA-256 check passes
    assert store.pull("xray", "resnet50", "1.1.0", dest)  # idempotent: same bytes already there
    assert store.verify("xray", "resnet50", "1.1.0")["ok"] is True

    with pytest.raises(StoreError, match="already published"):
        store.push(path, tmp_path / "saved_models" / "exports")
    with pytest.raises(
        StoreError, match=r"version 9.9.9 of xray/resnet50 does not exist .*published versions: 1.1.0"
    ):
        store.pull("xray", "resnet50", "9.9.9", dest)


def test_large_file_goes_up_multipart(s3, bucket, tmp_path):
    path = promoted(tmp_path, pad_mb=11)  # > 2 parts of 5 MB
    store = ModelStore(settings(s3["url"], bucket))
    sv = store.push(path, None)
    ckpt = sv.checkpoint
    assert ckpt.size > 11 * (1 << 20) and ckpt.multipart and ckpt.etag.strip('"').endswith("-3")
    head = s3_client(s3["url"]).head_object(Bucket=bucket, Key=ckpt.key)
    assert head["ETag"].strip('"').endswith("-3") and head["Metadata"]["sha256"] == ckpt.sha256
    meta = next(o for o in sv.objects if o.name.endswith(".json"))
    assert not meta.multipart  # small files go up in one PUT
    dest = tmp_path / "pulled"
    store.pull("xray", "resnet50", "1.1.0", dest)
    assert (dest / path.name).read_bytes() == path.read_bytes()


def test_overwritten_object_is_pulled_at_its_published_version_and_verify_flags_it(s3, bucket, tmp_path):
    path = promoted(tmp_path)
    store = ModelStore(settings(s3["url"], bucket))
    sv = store.push(path, None)
    client = s3_client(s3["url"])
    key = sv.checkpoint.key
    client.put_object(Bucket=bucket, Key=key, Body=b"tampered weights")  # versioning keeps both
    versions = client.list_object_versions(Bucket=bucket, Prefix=key)["Versions"]
    assert len(versions) == 2
    # pull reads the recorded VersionId: the published bytes, not the overwrite
    files = store.pull("xray", "resnet50", "1.1.0", tmp_path / "a")
    assert files[path.name].read_bytes() == path.read_bytes()
    report = store.verify("xray", "resnet50", "1.1.0")
    bad = [r for r in report["objects"] if not r["ok"]]
    assert not report["ok"] and [r["name"] for r in bad] == [path.name]
    assert "overwritten after publishing" in bad[0]["problem"]
    # the published version deleted: nothing to fall back on, refused
    client.delete_object(Bucket=bucket, Key=key, VersionId=sv.checkpoint.version_id)
    with pytest.raises(StoreError, match=f"{sv.checkpoint.version_id} is gone"):
        store.pull("xray", "resnet50", "1.1.0", tmp_path / "b")
    assert not (tmp_path / "b" / path.name).exists()


def test_object_failing_its_sha256_is_refused(s3, bucket, tmp_path):
    path = promoted(tmp_path)
    store = ModelStore(settings(s3["url"], bucket))
    sv = store.push(path, None)
    client = s3_client(s3["url"])
    marker_key = sv.prefix + MARKER_NAME
    marker = json.loads(client.get_object(Bucket=bucket, Key=marker_key)["Body"].read())
    marker["objects"][0]["sha256"] = "f" * 64  # the recorded digest no longer matches the bytes
    client.put_object(Bucket=bucket, Key=marker_key, Body=json.dumps(marker).encode())
    with pytest.raises(
        StoreError, match=r"SHA-256 mismatch: the commit marker records f{64}, the object has"
    ):
        store.pull("xray", "resnet50", "1.1.0", tmp_path / "dest")
    assert [p.name for p in (tmp_path / "dest").iterdir()] == []  # nothing landed, staging removed
    assert store.verify("xray", "resnet50", "1.1.0")["ok"] is False


def test_unversioned_bucket_refused_or_enabled_by_config(s3, tmp_path):
    name = f"plain-{uuid.uuid4().hex[:10]}"
    make_bucket(s3["url"], name, versioned=False)
    path = promoted(tmp_path)
    with pytest.raises(StoreError, match=f"bucket '{name}' .* has object versioning never enabled"):
        ModelStore(settings(s3["url"], name)).push(path, None)
    assert "Contents" not in s3_client(s3["url"]).list_objects_v2(Bucket=name)
    store = ModelStore(settings(s3["url"], name, versioning="enable"))
    store.push(path, None)
    assert s3_client(s3["url"]).get_bucket_versioning(Bucket=name)["Status"] == "Enabled"
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        ModelStore(settings(s3["url"], "no-such-bucket")).list_versions()


def _push_in_thread(store: ModelStore, path: Path) -> dict:
    result: dict = {}

    def run():
        try:
            result["value"] = store.push(path, None)
        except BaseException as exc:  # noqa: BLE001 (reported to the test)
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    result["thread"] = thread
    return result


def _wait_for_upload(client, bucket: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not client.list_multipart_uploads(Bucket=bucket).get("Uploads"):
        assert time.monotonic() < deadline, "the multipart upload never started"
        time.sleep(0.05)


@pytest.mark.slow
def test_server_stopping_mid_upload_publishes_nothing_and_repush_works(s3, bucket, tmp_path):
    """The endpoint dies while the parts of a large checkpoint are going up (a proxy in front of the
    server is cut, so the server's state survives to be inspected): nothing is listed, re-push works."""
    path = promoted(tmp_path, pad_mb=24)
    proxy = CuttableProxy(s3["port"])
    store = ModelStore(settings(proxy.url, bucket, max_concurrency=1, read_timeout_s=5))
    direct = s3_client(s3["url"])
    run = _push_in_thread(store, path)
    _wait_for_upload(direct, bucket)
    while proxy.bytes_up < 6 * (1 << 20):  # at least one part is through
        time.sleep(0.02)
    proxy.cut()
    run["thread"].join(60)
    assert isinstance(run.get("error"), StoreError), run
    assert proxy.url in str(run["error"]) and "uploading" in str(run["error"])
    fresh = ModelStore(settings(s3["url"], bucket))
    assert fresh.list_versions() == []  # no commit marker: not published
    keys = [o["Key"] for o in direct.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert not any(k.endswith(MARKER_NAME) for k in keys)
    with pytest.raises(StoreError, match="does not exist"):
        fresh.pull("xray", "resnet50", "1.1.0", tmp_path / "dest")
    sv = fresh.push(path, None)  # the same version publishes fine afterwards
    assert [str(v.version) for v in fresh.list_versions("xray")] == ["1.1.0"]
    assert sv.checkpoint.multipart


@pytest.mark.slow
def test_server_process_killed_mid_upload(tmp_path):
    """The S3 server process itself is killed during a multipart upload: push fails naming the endpoint,
    and a restarted server (fresh state) accepts the version."""
    path = promoted(tmp_path, pad_mb=24)
    with moto_server(tmp_path) as server:
        make_bucket(server["url"], "models")
        store = ModelStore(settings(server["url"], "models", max_concurrency=1, read_timeout_s=5))
        run = _push_in_thread(store, path)
        _wait_for_upload(s3_client(server["url"]), "models")
        os.killpg(server["proc"].pid, 9)
        run["thread"].join(60)
        port = server["port"]
    assert isinstance(run.get("error"), StoreError) and server["url"] in str(run["error"])
    with moto_server(tmp_path, port=port) as again:
        make_bucket(again["url"], "models")
        store = ModelStore(settings(again["url"], "models"))
        assert store.list_versions() == []
        store.push(path, None)
        assert [str(v.version) for v in store.list_versions()] == ["1.1.0"]


@pytest.mark.slow
def test_cli_promote_publishes_and_store_lists_pulls_verifies(s3, bucket, tmp_path):
    make_checkpoint(tmp_path / "saved_models" / "xray" / "resnet50_best.pth")
    env = {**AWS_TEST_ENV, "AWS_ENDPOINT_URL": s3["url"], "MLFLOW_DISABLE_TELEMETRY": "true"}
    common = [f"store.bucket={bucket}", "store.addressing_style=path"]
    out = cli_ok(run_cli("promote.py", "ckpt_path=saved_models/xray/resnet50_best.pth", "version=1.0.0",
                         "registry.enabled=false", "store.enabled=true", *common, root=tmp_path, env=env))  # fmt: skip
    assert f"published to s3://{bucket}/medens/xray/resnet50_v1.0.0/" in out
    proc = run_cli("store.py", "action=list", "format=json", *common, root=tmp_path, env=env)
    cli_ok(proc)
    rows = json.loads(proc.stdout[proc.stdout.index("[\n") :])
    assert [(r["model_name"], r["version"]) for r in rows] == [("resnet50", "1.0.0")]
    assert rows[0]["performance"]["best_metric"] == pytest.approx(0.81)
    out = cli_ok(run_cli("store.py", "action=pull", "model=xray/resnet50", "version=1.0.0", "dest=pulled",
                         *common, root=tmp_path, env=env))  # fmt: skip
    assert "every SHA-256 verified" in out and (tmp_path / "pulled" / "resnet50_v1.0.0_best.pth").is_file()
    out = cli_ok(run_cli("store.py", "action=verify", "model=xray/resnet50", "version=1.0.0", *common,
                         root=tmp_path, env=env))  # fmt: skip
    assert "ok   resnet50_v1.0.0_best.pth" in out
    # a second promotion of the same version is refused locally; a push of it to the store as well
    proc = run_cli("store.py", "action=push", "path=saved_models/xray/resnet50_v1.0.0_best.pth", *common,
                   root=tmp_path, env=env)  # fmt: skip
    assert proc.returncode != 0 and "already published" in proc.stderr
    # no credentials: a clear error, nothing secret in the config
    bare = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = run_cli("store.py", "action=list", *common, root=tmp_path,
                   env={**bare, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                        "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_EC2_METADATA_DISABLED": "true"})  # fmt: skip
    assert proc.returncode != 0 and "no AWS credentials found" in proc.stderr


@pytest.mark.slow
def test_mlflow_server_with_its_artifact_store_on_the_bucket(s3, bucket, tmp_path):
    """`mlflow server --artifacts-destination s3://<bucket>/mlflow`: a promotion logs a run (the versioned
    checkpoint and its metadata as artifacts) and registers a model; the artifacts are objects in the bucket."""
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from medens.registry import MlflowRegistry
    from tests.servers import mlflow_cli, mlflow_server

    if mlflow_cli() is None:
        pytest.skip("the `mlflow` command is not installed (pip install 'medens[mlflow]')")
    env = {**AWS_TEST_ENV, "MLFLOW_S3_ENDPOINT_URL": s3["url"], "MLFLOW_DISABLE_TELEMETRY": "true"}
    with mlflow_server(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", f"s3://{bucket}/mlflow", env=env) as server:
        uri = server["uri"]
        # the first API call creates the tables: wait for it here, not inside the registry's 10 s check
        import urllib.request

        with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=180):
            pass
        best = make_checkpoint(tmp_path / "saved_models" / "xray" / "resnet50_best.pth")
        res = promote_checkpoint(
            best,
            version="1.0.0",
            registry=MlflowRegistry(tracking_uri=uri, experiment_name="s3-test", timeout_s=120),
        )
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        mv = client.get_model_version("medens-xray-resnet50", res.registry["model_version"])
        assert mv.tags["medens.sha256"] == res.metadata["sha256"]
        objects = s3_client(s3["url"]).list_objects_v2(Bucket=bucket, Prefix="mlflow/")["Contents"]
        ckpts = [o for o in objects if o["Key"].endswith("/resnet50_v1.0.0_best.pth")]
        assert len(ckpts) == 1 and ckpts[0]["Size"] == res.path.stat().st_size
        body = s3_client(s3["url"]).get_object(Bucket=bucket, Key=ckpts[0]["Key"])["Body"].read()
        assert body == res.path.read_bytes()
