"""Dynamic batching: concurrent requests wait up to `max_wait_ms` to share one forward pass.

Requests carry a key (their input shapes); only requests with the same key are stacked. One worker
thread runs the model, so the network never sees two batches at once and torch's intra-op threads are
not oversubscribed; the event loop only queues and wakes.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Item:
    key: Hashable
    inputs: Any
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """`await batcher.submit(key, inputs)` -> that request's output from `run_batch(key, [inputs, ...])`.

    `run_batch` receives up to `max_batch_size` inputs sharing one key and returns one output per input,
    in order. A batch starts when it is full or its oldest request has waited `max_wait_ms`.
    """

    def __init__(
        self,
        run_batch: Callable[[Hashable, Sequence[Any]], Sequence[Any]],
        max_batch_size: int = 8,
        max_wait_ms: float = 5.0,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.run_batch = run_batch
        self.max_batch_size = int(max_batch_size)
        self.max_wait = max(float(max_wait_ms), 0.0) / 1000.0
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._pending: list[_Item] = []
        self.batches = 0
        self.requests = 0
        self.batch_sizes: dict[int, int] = {}
        self._thread = threading.Thread(target=self._loop, name="medens-batcher", daemon=True)
        self._thread.start()

    async def submit(self, key: Hashable, inputs: Any) -> Any:
        item = _Item(key, inputs)
        self._queue.put(item)
        return await asyncio.wrap_future(item.future)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _take(self, timeout: float | None) -> _Item | None | bool:
        try:
            return (
                self._queue.get(timeout=timeout)
                if timeout is None or timeout > 0
                else self._queue.get_nowait()
            )
        except queue.Empty:
            return False

    def _loop(self) -> None:
        while True:
            if not self._pending:
                got = self._take(None)
                if got is None:
                    return
                self._pending.append(got)  # type: ignore[arg-type]
            head = self._pending[0]
            same = [p for p in self._pending if p.key == head.key]
            deadline = head.enqueued + self.max_wait
            while len(same) < self.max_batch_size:
                got = self._take(deadline - time.perf_counter())
                if got is False:
                    break
                if got is None:
                    self._queue.put(None)  # finish what is queued, then stop
                    break
                self._pending.append(got)  # type: ignore[arg-type]
                if got.key == head.key:  # type: ignore[union-attr]
                    same.append(got)  # type: ignore[arg-type]
            batch = same[: self.max_batch_size]
            ids = {id(b) for b in batch}
            self._pending = [p for p in self._pending if id(p) not in ids]
            self._run(batch)

    def _run(self, batch: list[_Item]) -> None:
        self.batches += 1
        self.requests += len(batch)
        self.batch_sizes[len(batch)] = self.batch_sizes.get(len(batch), 0) + 1
        try:
            outputs = self.run_batch(batch[0].key, [b.inputs for b in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"run_batch returned {len(outputs)} outputs for {len(batch)} inputs")
        except BaseException as exc:  # every waiting request learns why
            for b in batch:
                if not b.future.done():
                    b.future.set_exception(exc)
            return
        for b, out in zip(batch, outputs, strict=True):
            b.future.set_result(out)

    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches, "requests": self.requests,
                "batch_sizes": dict(sorted(self.batch_sizes.items()))}  # fmt: skip
