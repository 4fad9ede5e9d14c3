"""One benchmark entry point: every benchmark is a sub-command of scripts/benchmark.py, code in medens/benchmarks/."""

from __future__ import annotations

from medens.benchmarks.cli import build_parser
from tests.helpers import ROOT

SUBCOMMANDS = {"xray-throughput", "xray-data", "xray-e2e", "ct-cache", "mri-inference", "mri-cache", "export",
               "preflight", "serve-load"}  # fmt: skip


def test_every_benchmark_is_a_subcommand_with_a_runner():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "name"]
    assert set(sub.choices) == SUBCOMMANDS
    args = parser.parse_args(["xray-data", "--images", "8", "--workers", "0"])
    assert callable(args._run) and args.images == 8 and args.out.endswith("outputs/benchmarks")
    assert parser.parse_args(["ct-cache", "--net", "none"]).net == "none"


def test_scripts_are_thin_and_import_no_other_script():
    scripts = sorted((ROOT / "scripts").glob("benchmark*.py"))
    assert [p.name for p in scripts] == ["benchmark.py"]
    text = scripts[0].read_text()
    assert "medens.benchmarks.cli" in text and len(text.splitlines()) < 20
