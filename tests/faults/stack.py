"""The serving side of the fault tests: `embtab serve` in its own process (bench/serving.py's
`Service`) under closed-loop load from a background thread (bench/serving.py's clients), and
the checks every fault ends with."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import numpy as np

from bench.serving import Service, load
from feature_store.offline import Dataset
from serving.reader import ParamReader
from serving.request import ScoreRequest
from serving.service import ScoringService, ServeConfig, serving_redis

CANDIDATES = 20
SLICE_S = 0.5


def score_bodies(movielens: Dataset, count: int = 200, seed: int = 0) -> list[bytes]:
    """Requests of a known user and CANDIDATES items each; the features they leave out come
    from the online store or are the defaults."""
    schema = movielens.schema
    users = schema.feature("user_id").cardinality
    items = schema.feature("item_id").cardinality
    rng = np.random.default_rng(seed)
    return [
        json.dumps(
            {
                "user_id": int(rng.integers(users)),
                "candidates": [
                    {"item_id": int(item)} for item in rng.choice(items, CANDIDATES, replace=False)
                ],
            }
        ).encode()
        for _ in range(count)
    ]


@dataclass
class LoadSlice:
    """What the clients saw in one short slice of the load."""

    started: float
    answered: int
    errors: int
    degraded: int
    max_ms: float
    failure: str = ""


@dataclass
class Load:
    """Closed-loop clients on the service, slice after slice, until stopped."""

    port: int
    bodies: list[bytes]
    concurrency: int = 4
    slices: list[LoadSlice] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-load", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                latencies, _, errors, degraded = asyncio.run(
                    asyncio.wait_for(
                        load(self.port, self.bodies, self.concurrency, SLICE_S, None), 30
                    )
                )
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as error:
                self.slices.append(LoadSlice(started, 0, 1, 0, 0.0, repr(error)))
                self._stop.wait(SLICE_S)
                continue
            longest = 1000 * max(latencies, default=0.0)
            self.slices.append(LoadSlice(started, len(latencies), errors, degraded, longest))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def between(self, start: float, end: float) -> list[LoadSlice]:
        return [piece for piece in self.slices if start <= piece.started < end]

    def describe(self) -> str:
        """Answers, degraded answers, errors and the slowest answer, for the test's log."""
        answered = sum(piece.answered for piece in self.slices)
        degraded = sum(piece.degraded for piece in self.slices)
        errors = sum(piece.errors for piece in self.slices)
        slowest = max((piece.max_ms for piece in self.slices), default=0.0)
        return (
            f"{answered} answers ({degraded} degraded, {errors} errors), slowest {slowest:.0f} ms"
        )

    def assert_answered_throughout(self, max_ms: float) -> None:
        """Every slice got answers, all of them 200, none slower than `max_ms`."""
        assert self.slices, "no load ran"
        for piece in self.slices:
            assert piece.errors == 0 and not piece.failure, piece
            assert piece.answered > 0, f"no answer in a {SLICE_S} s slice: {piece}"
            assert piece.max_ms < max_ms, piece


@contextlib.contextmanager
def served(redis_url: str, model: str) -> Iterator[tuple[Service, httpx.Client]]:
    """`embtab serve` for `model` in its own process, ready; and an HTTP client for it."""
    service = Service(redis_url, cache_mb=64, model=model)
    client = httpx.Client(base_url=f"http://127.0.0.1:{service.port}", timeout=10)
    try:
        service.wait_ready(timeout_s=90)
        yield service, client
    finally:
        client.close()
        service.stop()


def wait_for(check, seconds: float, what: str) -> float:
    """Poll `check` until it is true; returns the seconds it took."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, f"{what}: not within {seconds} s"
        time.sleep(0.05)
    return time.monotonic() - started


def assert_serves_what_redis_holds(
    client: httpx.Client, redis_url: str, model: str, bodies: list[bytes]
) -> None:
    """The long-running service is on the live version and head delta, and scores like a
    service started now, which reads every row fresh from Redis: nothing stale is cached."""
    fresh = ScoringService(ServeConfig(model=model, redis=serving_redis(redis_url)))
    try:
        reader = ParamReader(fresh.nodes, model)
        live = reader.live_version()
        head = reader.head(live)
        wait_for(
            lambda: client.get("/version").json()["delta"] == head.delta,
            10,
            f"the service to reach delta {head.delta}",
        )
        assert client.get("/version").json()["version"] == live
        fresh.scorer.refresh()
        for body in bodies[:20]:
            answer = client.post("/score", content=body).json()
            request = ScoreRequest.model_validate_json(body)
            expected = fresh.scorer.score([fresh.scorer.prepare(request)]).per_request[0]
            assert (answer["version"], answer["delta"]) == (live, head.delta)
            assert not answer["degraded"]
            np.testing.assert_allclose(answer["scores"], expected, rtol=0, atol=1e-6)
    finally:
        fresh.nodes.close()
