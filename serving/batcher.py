"""Micro-batching: concurrent requests are scored together, with a bounded wait.

Requests are queued as they arrive; one worker thread scores a batch at a time. While it scores,
new requests queue up, and the next batch takes all of them (up to `max_rows` candidates). A
batch waits for more only while a request that arrived (`arrived`) within the last `max_wait_s`
is not yet submitted, i.e. is still being read or parsed, and never longer than `max_wait_s`
after its first request: a lone request (concurrency 1) is scored at once, on the event loop's
own thread, and a burst is scored together on the scoring thread. A request not submitted
`max_wait_s` after it arrived (a body that trickles in, or a large one parsed in the worker
process) is not waited for: counted until it is submitted, it would hold every other request for
`max_wait_s` (and a hand-off to the scoring thread) all that time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from serving.errors import ServingError

Job = TypeVar("Job")


class Arrival:
    """A request that arrived and is awaited, until it is submitted, abandoned or too late."""

    def __init__(self, batcher: MicroBatcher, loop: asyncio.AbstractEventLoop) -> None:
        self._batcher = batcher
        self._timer: asyncio.TimerHandle | None = loop.call_later(batcher.max_wait_s, self.done)

    def done(self) -> None:
        """No longer awaited (idempotent)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._batcher._awaited -= 1


class MicroBatcher(Generic[Job]):
    """`score(jobs) -> results` (one per job, in order) runs on a dedicated thread."""

    def __init__(
        self,
        score: Callable[[list[Job]], Sequence[Any]],
        rows_of: Callable[[Job], int],
        *,
        max_wait_s: float = 0.002,
        max_rows: int = 8192,
    ) -> None:
        if max_wait_s < 0 or max_rows < 1:
            raise ServingError(
                f"max_wait_s must be >= 0 and max_rows >= 1, got {max_wait_s}, {max_rows}"
            )
        self.score = score
        self.rows_of = rows_of
        self.max_wait_s = max_wait_s
        self.max_rows = max_rows
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embtab-scorer")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._awaited = 0  # arrivals not yet submitted, abandoned or late
        self.batches = 0

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    def arrived(self) -> Arrival:
        """A request came in and will be submitted (or abandoned: `Arrival.done`) soon; it is
        awaited for at most `max_wait_s`."""
        self._awaited += 1
        return Arrival(self, asyncio.get_running_loop())

    async def submit(self, job: Job, arrival: Arrival | None) -> Any:
        """Score `job`; `arrival` is its `arrived` (None for a request that was not awaited)."""
        if self._queue is None:
            raise ServingError("the batcher is not started")
        if arrival is not None:
            arrival.done()
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((job, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        while True:
            batch = [await queue.get()]
            rows = self.rows_of(batch[0][0])
            deadline = loop.time() + self.max_wait_s
            while rows < self.max_rows:
                if not queue.empty():
                    item = queue.get_nowait()
                elif self._awaited > 0 and loop.time() < deadline:
                    try:
                        item = await asyncio.wait_for(queue.get(), deadline - loop.time())
                    except TimeoutError:
                        break
                else:
                    break
                batch.append(item)
                rows += self.rows_of(item[0])
            jobs = [job for job, _ in batch]
            try:
                if len(batch) == 1 and self._awaited == 0 and queue.empty():
                    # A lone request: scoring it right here saves two thread hand-offs, and
                    # there is nobody whose parsing it could hold up.
                    results = self.score(jobs)
                else:
                    results = await loop.run_in_executor(self._executor, self.score, jobs)
            except Exception as error:  # handed to every waiting request, which reports it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
            else:
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
            finally:
                self.batches += 1
