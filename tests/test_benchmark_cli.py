"""One benchmark entry point: every benchmark is a sub-command of scripts/benchmark.py, code in medens/benchmarks/."""

from __future__ import annotations

from medens.benchmarks.cli import build_parser
from tests.helpers import ROOT

SUBCOMMANDS = {"xray-throughput", "xray-data", "xray-e2e", "ct-cache", "mri-inference", "mri-cache", "export",
               "preflight", "serve-load", "gpu-check"}  # fmt: skip


def test_every_benchmark_is_a_subcommand_with_a_runner():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "name"]
    assert set(sub.choices) == SUBCOMMANDS
    assert all(callable(p.get_default("_run")) for p in sub.choices.values()), "every sub-command runs something"
    args = parser.parse_args(["xray-data", "--images", "8", "--workers", "0"])
    assert callable(args._run) and args.images == 8 and args.out.endswith("outputs/benchmarks")
    assert parser.parse_args(["ct-cache", "--net", "none"]).net == "none"


def test_scripts_are_thin_and_import_no_other_script():
    scripts = sorted((ROOT / "scripts").glob("benchmark*.py"))
    assert [p.name for p in scripts] == ["benchmark.py"]
    text = scripts[0].read_text()
    assert "medens.benchmarks.cli" in text and len(text.splitlines()) < 20


def test_xray_throughput_paired_design_times_both_loops_step_by_step(tmp_path):
    """The default design: one medens fit per repeat, a plain step inside every medens step, both timed."""
    import json

    args = build_parser().parse_args(["xray-throughput", "--arch", "resnet18", "--size", "32", "--batch", "2",
                                      "--steps", "3", "--warmup", "1", "--repeats", "2", "--out", str(tmp_path)])  # fmt: skip
    assert args.design == "paired"
    result = json.loads(args._run(args).read_text())
    assert result["design"] == "paired" and result["repeats"] == 2
    for steps in (*result["plain_step_seconds"], *result["medens_step_seconds"]):
        assert len(steps) == 3 and all(s > 0 for s in steps), steps
    assert len(result["ratio_per_repeat"]) == 2 and result["ratio_median"] > 0
