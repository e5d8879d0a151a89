"""The micro-batcher waits for requests that arrived and are about to be submitted, for at most
`max_wait_s`: one that is slower (a body trickling in, a large one parsed in the worker process)
must not hold the others."""

from __future__ import annotations

import asyncio
import time

from serving.batcher import MicroBatcher

MAX_WAIT_S = 0.05


def test_an_arrival_is_awaited_for_max_wait_then_no_longer_holds_the_others():
    async def scenario() -> tuple[float, float]:
        batcher = MicroBatcher(lambda jobs: jobs, lambda job: 1, max_wait_s=MAX_WAIT_S)
        batcher.start()
        try:
            slow = batcher.arrived()  # its body is still coming in
            started = time.perf_counter()
            assert await batcher.submit("first", batcher.arrived()) == "first"
            while_fresh = time.perf_counter() - started
            await asyncio.sleep(MAX_WAIT_S * 1.5)
            started = time.perf_counter()
            assert await batcher.submit("second", batcher.arrived()) == "second"
            once_late = time.perf_counter() - started
            slow.done()
        finally:
            await batcher.stop()
        return while_fresh, once_late

    while_fresh, once_late = asyncio.run(scenario())
    assert while_fresh >= MAX_WAIT_S * 0.9, "the batch did not wait for a request just arrived"
    assert once_late < MAX_WAIT_S * 0.5, f"a late request held another for {once_late:.3f} s"
