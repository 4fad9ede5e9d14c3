"""CPU time of this process and its children: what a cross-validation report states as its cost, because
wall time on a shared machine says more about the neighbours than about the recipe."""

from __future__ import annotations

import resource


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children so far."""
    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime
