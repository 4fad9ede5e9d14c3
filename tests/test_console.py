"""The main job's console (issue 13 item 6): one line per stage, each message once, library noise filtered,
the full log's path printed, and a failing stage names its error and that log."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import cli_ok, run_cli

ENV = {"OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.slow  # the main job as a process


def _log_path(out: str) -> Path:
    match = re.search(r"full log: (\S+\.log)", out)
    assert match, out[-3000:]
    return Path(match.group(1))


def test_tiny_stage_console_is_quiet_and_each_line_once(tmp_path):
    # a fresh interpreter: warnings printed while importing the libraries are part of what the user sees
    out = cli_ok(run_cli("main.py", "pipeline=tiny", "stages=[cohort,xray]", "evaluate=false", root=tmp_path, env=ENV,
                         fresh=True))  # fmt: skip
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert [ln for ln, n in Counter(lines).items() if n > 1] == [], out
    assert not [ln for ln in lines if "][INFO] - " in ln], "INFO lines go to the log file, not the console"
    assert "💡 Tip" not in out and "LeafSpec" not in out and "exists and is not empty" not in out
    done = next(ln for ln in lines if ln.startswith("[2/2] xray: done"))
    assert re.search(r"best val/auc \d\.\d{3}(;|$)", done), done  # rounded, not 0.8557241303580148
    log = _log_path(out)
    text = log.read_text()
    assert text.count("GPU available") == 1, "Lightning's messages reach the log file once"
    assert text.count("instantiating datamodule") == 1 and "💡 Tip" not in text


def test_failing_stage_prints_its_error_and_log(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the xray stage needs a folder")
    override = f"overrides.xray=['paths.saved_models_dir={blocker}/saved_models','trainer.max_epochs=1']"
    proc = run_cli("main.py", "pipeline=tiny", "stages=[cohort,xray]", override, root=tmp_path, env=ENV)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    failed = next((ln for ln in out.splitlines() if ln.startswith("[2/2] xray: FAILED after")), None)
    assert failed is not None and "Error" in failed, out[-3000:]
    text = _log_path(out).read_text()
    assert "Traceback" in text and "failed (output folder" in text, "the traceback is in the log the line names"
    assert "failed (output folder" not in out, "the stage's logged traceback is not repeated on the console"
