"""A DataLoader that resumes mid-epoch exactly: Lightning saves its position, a restart skips what was done.

Lightning stores `state_dict()` of every stateful train loader in a checkpoint (`loops.fit_loop.state_dict
.combined_loader`) and, when a run restarts mid-epoch, calls `load_state_dict()` before it creates the
epoch's iterator. The state is (epoch, batches served this epoch). On restart the first that many
batches of that epoch are skipped as index lists only (no item is loaded), so with medens' epoch-seeded
sampler the remaining batches are exactly those an uninterrupted run would have drawn. Lightning counts
the restored batches itself, so `batch_idx` (and `BatchReseed`'s seeds) continue where they stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader


class _SkipFirstBatches:
    """The loader's batch sampler, minus the batches a restored run has already trained on."""

    def __init__(self, batch_sampler: Any, loader: ResumableDataLoader) -> None:
        self.batch_sampler = batch_sampler
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        skip = self.loader._take_skip()
        it = iter(self.batch_sampler)
        for _ in range(skip):
            if next(it, None) is None:
                break
        yield from it

    def __len__(self) -> int:
        return len(self.batch_sampler)


class ResumableDataLoader(DataLoader):
    """`DataLoader` with `state_dict`/`load_state_dict` for Lightning's mid-epoch restart (see module)."""

    _served = 0
    _epoch = 0
    _pending: tuple[int, int] | None = None

    def _sampler_epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def _take_skip(self) -> int:
        pending, self._pending = self._pending, None
        if pending is None or pending[0] != self._sampler_epoch():
            return 0
        return pending[1]

    @property
    def _index_sampler(self) -> Any:  # the batch sampler DataLoader iterators draw indices from
        base = super()._index_sampler
        return _SkipFirstBatches(base, self) if self.batch_sampler is not None else base

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._epoch = self._sampler_epoch()
        self._served = self._pending[1] if self._pending and self._pending[0] == self._epoch else 0
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and int(state.get("batches", 0)) > 0:
            self._pending = (int(state["epoch"]), int(state["batches"]))
