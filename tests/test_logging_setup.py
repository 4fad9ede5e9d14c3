"""medens.logging_setup.quiet_console: what reaches the console while a main-job stage runs."""

from __future__ import annotations

import logging
import sys

from medens.logging_setup import quiet_console


def test_quiet_console_keeps_warnings_but_sends_named_loggers_and_tracebacks_to_the_log(capsys, tmp_path):
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    log_file = logging.FileHandler(tmp_path / "run.log")
    old_level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(console)
    root.addHandler(log_file)
    wait, other = logging.getLogger("medens.callbacks.data_wait"), logging.getLogger("medens.pipeline_test")
    try:
        with quiet_console(log_only=("medens.callbacks.data_wait",)):
            wait.warning("71% waited")
            other.warning("shown on the console")
            other.info("an INFO line")
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                other.exception("stage failed")
        wait.warning("after the stage")
    finally:
        root.removeHandler(console)
        root.removeHandler(log_file)
        log_file.close()
        root.setLevel(old_level)
    err = capsys.readouterr().err
    assert "shown on the console" in err and "after the stage" in err
    assert "71% waited" not in err and "an INFO line" not in err and "stage failed" not in err
    text = (tmp_path / "run.log").read_text()
    for line in ("71% waited", "shown on the console", "an INFO line", "stage failed", "RuntimeError: boom"):
        assert line in text, "the log file gets everything"
