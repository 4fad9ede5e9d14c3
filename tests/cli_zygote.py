"""A fork server for the tests' CLI runs: imports the training stack once, then forks one child per run.

Each `scripts/<name>.py` run of the tests would otherwise spend ~10 s of CPU importing torch, Lightning,
MONAI and medens before doing a second of work, and the suite runs ~80 of them. The child is still a real
process of its own (its own pid, environment, working directory, stdout/stderr files, exit status, atexit
handlers); only the interpreter start-up and the imports are shared. Tests that watch interpreter start-up
itself (warnings printed while importing) ask `run_cli(..., fresh=True)`, and `MEDENS_TEST_FRESH_CLI=1`
runs every CLI in a fresh interpreter.

Protocol, one JSON object per line: the client writes a request {id, script, args, cwd, env, stdout,
stderr}; the server answers {"id", "pid"} once the child exists and {"id", "returncode"} when it ended.
Children run concurrently (a test may hold four servers and start a training beside them): the server
forks on each request and reaps whichever child ends.
"""

from __future__ import annotations

import json
import os
import select
import sys

#: Imported once before forking: the libraries every script needs, then all of medens (a CLI run reaches
#: models, data modules and callbacks through Hydra targets), then Hydra's plugins (sweepers, launchers).
PRELOAD = ("hydra", "omegaconf", "torch", "lightning", "monai", "medens")


def _preload() -> None:
    import importlib
    import pkgutil

    for name in PRELOAD:
        importlib.import_module(name)
    import medens

    for info in pkgutil.walk_packages(medens.__path__, "medens."):
        try:
            importlib.import_module(info.name)
        except Exception:  # an optional extra that is not installed: the child imports (and fails) as usual
            pass
    from hydra.core.plugins import Plugins

    Plugins.instance()


def _reap(running: dict[int, str], proto_out) -> None:  # noqa: ANN001
    """Answer {"id", "returncode"} for every child that has ended."""
    while running:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        rid = running.pop(pid, None)
        if rid is not None:
            proto_out.write(json.dumps({"id": rid, "returncode": os.waitstatus_to_exitcode(status)}) + "\n")


def _serve() -> dict:
    """Answer requests until stdin closes; in a forked child, return that child's request instead."""
    _preload()
    proto_in = os.dup(0)
    proto_out = os.fdopen(os.dup(1), "w", buffering=1)
    proto_out.write("ready\n")
    running: dict[int, str] = {}  # pid -> request id
    pending = b""
    while True:
        # with children alive, wake every 50 ms to reap them; otherwise sleep until the next request
        readable = select.select([proto_in], [], [], 0.05 if running else None)[0]
        _reap(running, proto_out)
        if not readable:
            continue
        chunk = os.read(proto_in, 1 << 16)
        if not chunk:
            raise SystemExit(0)
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                os.close(proto_in)
                proto_out.close()
                return request
            running[pid] = request["id"]
            proto_out.write(json.dumps({"id": request["id"], "pid": pid}) + "\n")


def _become(request: dict) -> None:
    """Turn this forked child into `python <script> <args>` run from `cwd` with exactly `env`."""
    os.setsid()  # its own process group, like a fresh process started by the test
    devnull = os.open(os.devnull, os.O_RDONLY)
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    # one file for both (2>&1) shares one offset, so neither stream overwrites the other
    same = request["stderr"] == request["stdout"]
    err = os.dup(out) if same else os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for fd, target in ((devnull, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:  # read by OpenMP when the library loaded (in the server): apply it as a fresh process would
        import torch

        torch.set_num_threads(int(threads))
    script = request["script"]
    sys.argv = [script, *request["args"]]
    sys.path[0] = os.path.dirname(script)


if __name__ == "__main__":
    child_request = _serve()
    _become(child_request)
    import runpy

    runpy.run_path(child_request["script"], run_name="__main__")
