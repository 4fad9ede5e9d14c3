"""Evaluation of a saved checkpoint on a data split: metrics JSON, per-case CSV, curves PNG."""
