"""Dynamic batching: concurrent requests gathered into one model call.

Requests wait in a bounded queue; one worker thread takes the first, then whatever else of the same kind arrives
within ``max_wait`` seconds, up to ``max_batch``, and runs them as one call. The models run in that one thread only,
so no two calls ever share the pipeline's state at once, and each request gets back its own result.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence


class QueueFull(RuntimeError):
    """The batcher's queue is at its bound: the server is overloaded; retry later."""


@dataclass
class _Job:
    kind: Hashable
    payload: Any
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """Gathers jobs of one kind into batches for ``handlers[kind](payloads) -> results``.

    Args:
        handlers: per kind, a function of a list of payloads returning one result per payload, in order.
        max_batch: most jobs in one call.
        max_wait: seconds the worker waits for more jobs of the first job's kind.
        max_queue: most jobs waiting; beyond it :meth:`submit` raises :class:`QueueFull`.
        on_batch: called with (kind, batch size, seconds) after each call (metrics).

    Example:
        >>> b = DynamicBatcher({"double": lambda xs: [2 * x for x in xs]}, max_batch=4, max_wait=0.01)
        >>> b.submit("double", 21).result(timeout=5)
        42
        >>> b.close()
    """

    def __init__(self, handlers: dict[Hashable, Callable[[Sequence[Any]], Sequence[Any]]], max_batch: int = 16,
                 max_wait: float = 0.005, max_queue: int = 256,
                 on_batch: Callable[[Hashable, int, float], None] | None = None) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait < 0:
            raise ValueError("max_batch and max_queue must be at least 1 and max_wait at least 0")
        self.handlers, self.max_batch, self.max_wait = handlers, max_batch, max_wait
        self.on_batch = on_batch
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._held: list[_Job] = []  # jobs taken while gathering a batch of another kind: served next
        self._thread = threading.Thread(target=self._run, name="genret-batcher", daemon=True)
        self._thread.start()

    def submit(self, kind: Hashable, payload: Any) -> Future:
        """Queue one job; its :class:`~concurrent.futures.Future` holds the result (or the handler's error)."""
        if kind not in self.handlers:
            raise KeyError(f"no handler for {kind!r}")
        job = _Job(kind, payload)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are waiting; retry later") from None
        return job.future

    async def run(self, kind: Hashable, payload: Any, timeout: float | None = None) -> Any:
        """Submit and await the result from an event loop (``asyncio.TimeoutError`` past ``timeout``)."""
        return await asyncio.wait_for(asyncio.wrap_future(self.submit(kind, payload)), timeout)

    @property
    def waiting(self) -> int:
        """Jobs queued and not yet taken."""
        return self._queue.qsize() + len(self._held)

    def close(self) -> None:
        """Stop the worker after the jobs already queued."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _next(self, timeout: float | None) -> _Job | None:
        if self._held:
            return self._held.pop(0)
        return self._queue.get(timeout=timeout) if timeout is not None else self._queue.get()

    def _run(self) -> None:
        while True:
            first = self._next(None)
            if first is None:
                return
            batch, held, stop = [first], [], False
            deadline = time.perf_counter() + self.max_wait
            while len(batch) < self.max_batch:
                left = deadline - time.perf_counter()
                try:
                    job = self._next(left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                (batch if job.kind == first.kind else held).append(job)
            self._held = held + self._held
            self._call(first.kind, [j for j in batch if not j.future.cancelled()])
            if stop:
                for job in self._held:
                    self._call(job.kind, [job])
                return

    def _call(self, kind: Hashable, jobs: list[_Job]) -> None:
        if not jobs:
            return
        start = time.perf_counter()
        try:
            results = list(self.handlers[kind]([j.payload for j in jobs]))
            if len(results) != len(jobs):
                raise RuntimeError(f"handler {kind!r} returned {len(results)} results for {len(jobs)} jobs")
        except Exception as err:
            if len(jobs) > 1:  # one bad job must not fail the others: each alone, so only it hears of its error
                for job in jobs:
                    self._call(kind, [job])
                return
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)
        else:
            for job, result in zip(jobs, results):
                if not job.future.done():
                    job.future.set_result(result)
        if self.on_batch is not None:
            self.on_batch(kind, len(jobs), time.perf_counter() - start)
