"""Benchmarks and checks that run as modules (`python -m medens.benchmarks.<name>`)."""
