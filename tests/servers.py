"""Real servers for tests, all on loopback: moto's standalone S3 server, `mlflow server`, `scripts/serve.py`,
and a cuttable TCP proxy."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import start_cli

#: Credentials the moto server accepts (any); tests point every AWS lookup at them, never at ~/.aws.
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "medens-test",
    "AWS_SECRET_ACCESS_KEY": "medens-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_command() -> list[str]:
    here = Path(sys.executable).parent / "moto_server"
    cli = str(here) if here.is_file() else shutil.which("moto_server")
    return [cli] if cli else [sys.executable, "-m", "moto.server"]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    """Poll `url` until it answers (any HTTP status), or fail with the server's log."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server at {url} did not start: {log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, the server's whole process group."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def moto_server(folder: Path, port: int | None = None) -> Iterator[dict]:
    """moto's S3 server as a subprocess on a free loopback port; yields {url, proc, port}."""
    port = port or free_port()
    log_path = folder / f"moto_{port}.log"
    log = open(log_path, "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [*moto_command(), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True, env={**os.environ, **AWS_TEST_ENV},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/moto-api/", proc, log_path)
        yield {"url": url, "proc": proc, "port": port, "log": log_path}
    finally:
        stop(proc)
        log.close()


def mlflow_cli() -> str | None:
    """The `mlflow` command of this interpreter's environment (or on PATH); None where it is not installed."""
    here = Path(sys.executable).parent / "mlflow"
    return str(here) if here.is_file() else shutil.which("mlflow")


@contextlib.contextmanager
def mlflow_server(
    folder: Path, backend_store_uri: str, artifacts_destination: str, env: dict | None = None,
    timeout: float = 300.0,
) -> Iterator[dict]:  # fmt: skip
    """`mlflow server` as a subprocess on a free loopback port, answering /health; yields {uri, proc, log}.
    Callers skip first where `mlflow_cli()` is None. Start-up imports all of MLflow: minutes on a loaded CPU."""
    cli = mlflow_cli()
    if cli is None:
        raise RuntimeError("the `mlflow` command is not installed (pip install 'medens[mlflow]')")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log_path = folder / f"mlflow_{port}.log"
    log = open(log_path, "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [cli, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", backend_store_uri, "--artifacts-destination", artifacts_destination],
        cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})},
    )  # fmt: skip
    try:
        wait_http(f"{uri}/health", proc, log_path, timeout=timeout)
        yield {"uri": uri, "proc": proc, "log": log_path}
    finally:
        stop(proc)  # the server and its workers
        log.close()


def s3_client(url: str):  # noqa: ANN201 (boto3 client)
    import boto3
    from botocore.config import Config

    return boto3.session.Session(
        aws_access_key_id=AWS_TEST_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    ).client("s3", endpoint_url=url, config=Config(s3={"addressing_style": "path"}))


def make_bucket(url: str, name: str, versioned: bool = True) -> None:
    client = s3_client(url)
    client.create_bucket(Bucket=name)
    if versioned:
        client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})


class CuttableProxy:
    """A TCP proxy in front of a server; `cut()` stops it and drops every open connection, as a server
    that dies would look to its clients, while the server behind keeps its state."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.bytes_up = 0
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while not self._stop.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if up:
                    self.bytes_up += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.close()
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    c.close()


class ServeProcess:
    """`scripts/serve.py` as a process of its own on a free port (forked like `run_cli`)."""

    def __init__(self, root: Path, *args: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / f"serve_{self.port}.log"
        self.proc = start_cli(
            "serve.py", *args, f"port={self.port}", "host=127.0.0.1", "threads=1",
            "hydra.run.dir=outputs/serve_" + str(self.port), cwd=root, log=self.log,
            env={**os.environ, "MEDENS_ROOT": str(root), "OMP_NUM_THREADS": "1", **(env or {})},
        )  # fmt: skip

    def wait(self, timeout: float = 120) -> ServeProcess:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.get("/ping")[0] == 200:
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {self.log.read_text()[-4000:]}")
            time.sleep(0.3)

    def get(self, path: str) -> tuple[int, dict]:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.status, json.loads(r.read())

    def post(self, body: bytes, ctype: str | None, query: str = "", headers: dict | None = None):
        req = urllib.request.Request(self.url + "/invocations" + query, data=body, method="POST")
        if ctype:
            req.add_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                data = r.read()
                return r.status, (
                    json.loads(data) if r.headers.get_content_type() == "application/json" else data
                )
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self) -> None:
        stop(self.proc)
