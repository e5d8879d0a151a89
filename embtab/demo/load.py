"""A closed-loop scoring client: POST /score on one keep-alive connection, latency per request."""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from feature_store.offline import Dataset


def request_bodies(
    dataset: Dataset, count: int, candidates: int, with_context: bool
) -> list[bytes]:
    """`count` requests, each for a user of the train split and `candidates` distinct items of
    it. `with_context`: the request also carries every other feature of a test row (for data
    sets whose user features no online feature store holds)."""
    user_column, item_column = dataset.schema.id_columns["user"], dataset.schema.id_columns["item"]
    train = dataset.read("train", [user_column, item_column])
    users = np.unique(train.column(user_column).to_numpy())
    items = np.unique(train.column(item_column).to_numpy())
    contexts: list[dict] = [{}] * count
    if with_context:
        ids = (user_column, item_column)
        names = [spec.name for spec in dataset.schema.features if spec.name not in ids]
        test = dataset.read("test", names).slice(0, count).to_pylist()
        contexts = [test[index % len(test)] for index in range(count)]
    rng = np.random.default_rng(0)
    bodies = []
    for user, context in zip(rng.choice(users, count), contexts, strict=True):
        chosen = rng.choice(items, min(candidates, len(items)), replace=False)
        body = {"user_id": int(user), "candidates": [{"item_id": int(i)} for i in chosen]}
        if context:
            body["context"] = context
        bodies.append(json.dumps(body).encode())
    return bodies


@dataclass
class LoadClient:
    """Sends requests until stopped; `samples` holds (wall time, latency s) of every answer."""

    port: int
    bodies: list[bytes]
    samples: list[tuple[float, float]] = field(default_factory=list)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="demo-load", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def recent_p99_ms(self, seconds: float = 10.0) -> float | None:
        cutoff = time.time() - seconds
        recent = [latency for at, latency in self.samples[-5000:] if at >= cutoff]
        return float(np.percentile(recent, 99) * 1000) if recent else None

    def _run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        index = 0
        while not self._stop.is_set():
            body = self.bodies[index % len(self.bodies)]
            index += 1
            started = time.perf_counter()
            try:
                connection.request("POST", "/score", body, {"Content-Type": "application/json"})
                answer = connection.getresponse()
                answer.read()
                ok = answer.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                self._stop.wait(0.2)
            if ok:
                self.samples.append((time.time(), time.perf_counter() - started))
            else:
                self.errors += 1
        connection.close()
