"""The scoring service under load: DCN-v2 on MovieLens-1M, one user x 100 candidates per request.

What runs:

1. A DCN-v2 checkpoint on MovieLens-1M (`--checkpoint`, or trained here on the first
   `--train-rows` training rows for one epoch: latency does not depend on how well it ranks).
2. An embedded Redis; the checkpoint is published to it (fp32, 4 shards) and the online feature
   store is filled from the training split (user profiles and behaviour sequences, item
   attributes), so a request carries only the user id, 100 item ids and the two dense features.
   Dense values are raw, as a client sends them (`user_activity` / `item_popularity` are counts
   of earlier events; the service applies the artifact's log1p), and ids are prepared indices
   (the integer fast path) or, in the raw-id case, the raw strings of the artifact's
   vocabularies (user "1m_42", item the movie's title).
3. `embtab serve` in its own process; this process is the load generator: closed-loop clients
   on keep-alive HTTP/1.1 connections (a small asyncio client: httpx would spend more of the
   2 cores on the client than the server spends on a request), each sending the next request as
   soon as its answer arrives.

Cases: the in-process baseline (the same model scoring the same requests with their features
already in memory: no HTTP, no Redis), then the service with the cache warm at concurrency 1, 8
and 32, and with no row cache (every row from Redis) at concurrency 1, each `--seconds` long;
and the first `COLD_REQUESTS` requests after a start with an empty cache. At concurrency 1 the
same requests are also sent with raw string ids (`service_warm_raw_ids`); that case and the
prepared one alternate in `PAIRED_ROUNDS` slices (ABBA order), so a change in the machine's load
falls on both alike. Before it is timed, the first `PARITY_REQUESTS` requests are scored in both
forms and must get identical scores. Latency is measured
at the client, from writing the request to reading the whole answer; this process's cyclic
garbage collector is paused while it measures, so its own pauses are not counted.

Summary keys (issue 21's and 16's targets): `serving_path_overhead` (service p50 over in-process
p50, concurrency 1), `p99_over_p50_c1`, `c32_vs_in_process` (candidates/s at concurrency 32 over
the in-process baseline's, one thread each), `raw_id_overhead` (p99 with raw string ids over p99
with prepared ids, concurrency 1; `p99_ms_c1_raw_ids` is the p99 itself).

    .venv/bin/python bench/serving.py                 # writes bench/results/serving.json
"""

# ruff: noqa: E402 (the path fix below must run before the imports)
from __future__ import annotations

import sys
from pathlib import Path

# This script is named like the `serving` package: keep its own directory off the import path.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import torch

from embtab.machine import machine_info, write_results
from embtab.services import free_port, start_redis
from feature_store.artifact import Preprocessor
from feature_store.offline import open_prepared
from feature_store.online import OnlineFeatureStore
from models.batches import batch_from_columns
from models.checkpoint import load_checkpoint
from models.config import run_config_from_dict
from models.train import train
from serving.published_model import dense_state, publish_checkpoint, servable_model
from serving.publisher import ParamPublisher
from serving.redis_nodes import RedisConfig, RedisNodes

DATASET = "movielens-1m"
MODEL_NAME = "dcn-ml1m"
CANDIDATES = 100
DISTINCT_REQUESTS = 2000
COLD_REQUESTS = 300
BASELINE_REQUESTS = 2000
CONCURRENCY = (1, 8, 32)
PAIRED_ROUNDS = 4
PARITY_REQUESTS = 50
RESULTS = Path(__file__).parent / "results" / "serving.json"


def checkpoint_path(arguments: argparse.Namespace, scratch: Path) -> tuple[Path, dict]:
    if arguments.checkpoint:
        return arguments.checkpoint, {
            "checkpoint": str(arguments.checkpoint),
            "trained_here": False,
        }
    run = run_config_from_dict(
        {
            "dataset": DATASET,
            "model": {"name": "dcn"},
            "train": {"epochs": 1, "train_rows": arguments.train_rows, "eval_rows": 50_000},
        }
    )
    path = scratch / "dcn-ml1m.safetensors"
    started = time.monotonic()
    result = train(run, open_prepared(DATASET), path, progress=False)
    return path, {
        "checkpoint": "trained here",
        "trained_here": True,
        "train_rows": arguments.train_rows,
        "train_seconds": round(time.monotonic() - started, 1),
        "test_metrics": result.test,
    }


def fill_online_store(url: str, schema) -> OnlineFeatureStore:
    """User profiles, sequences and item attributes as of the end of the training split."""
    client = RedisNodes(RedisConfig.parse(url, socket_timeout_s=30.0)).meta
    dataset = open_prepared(DATASET)
    store = OnlineFeatureStore(client, schema, preprocessing=dataset.preprocessor())
    store.write_prepared(dataset.iter_batches("train", 200_000))
    return store


def request_bodies(
    preprocessing: Preprocessor, seed: int = 0
) -> tuple[list[bytes], list[bytes], list[dict]]:
    """DISTINCT_REQUESTS requests: users and items of the training split (so the online store
    knows them), 100 distinct random items each, dense features as of the end of that split as
    raw counts. Returns the bodies with prepared ids, the same bodies with raw string ids, and
    the prepared form as dicts (for the in-process baseline)."""
    dataset = open_prepared(DATASET)
    train_split = dataset.read(
        "train", columns=["user_id", "item_id", "user_activity", "item_popularity"]
    )
    users = train_split.column("user_id").to_numpy()
    items = train_split.column("item_id").to_numpy()
    activity = dict(
        zip(users.tolist(), raw_counts(train_split.column("user_activity")), strict=True)
    )
    popularity = dict(
        zip(items.tolist(), raw_counts(train_split.column("item_popularity")), strict=True)
    )
    user_names = preprocessing.vocabularies["user_id"].values
    item_names = preprocessing.vocabularies["item_id"].values
    known_users, known_items = np.unique(users), np.unique(items)
    rng = np.random.default_rng(seed)
    bodies, raw_bodies, plain = [], [], []
    for user in rng.choice(known_users, DISTINCT_REQUESTS):
        chosen = rng.choice(known_items, CANDIDATES, replace=False)
        body = {
            "user_id": int(user),
            "context": {"user_activity": activity.get(int(user), 0)},
            "candidates": [
                {
                    "item_id": int(item),
                    "features": {"item_popularity": popularity.get(int(item), 0)},
                }
                for item in chosen
            ],
        }
        raw = {
            **body,
            "user_id": user_names[int(user)].as_py(),
            "candidates": [
                {**candidate, "item_id": item_names[candidate["item_id"]].as_py()}
                for candidate in body["candidates"]
            ],
        }
        plain.append(body)
        bodies.append(json.dumps(body).encode())
        raw_bodies.append(json.dumps(raw).encode())
    return bodies, raw_bodies, plain


def raw_counts(prepared: pa.ChunkedArray) -> list[int]:
    """A count feature's raw values (events so far) from its prepared log1p(count)."""
    return [round(math.expm1(value)) for value in prepared.to_numpy().tolist()]


def baseline(checkpoint: Path, store: OnlineFeatureStore, plain: list[dict]) -> dict:
    """The same scoring in process: features already in memory, no HTTP, no Redis. The model
    is built as the service builds it (plain tables, no optimizer state) with every row loaded;
    the raw values (the online store's and the dense ones) go through the checkpoint's artifact,
    as the service applies it."""
    trained = load_checkpoint(checkpoint)
    preprocessing = trained.model.spec.preprocessing
    model = servable_model(trained.manifest, dense_state(trained.model))
    for table in trained.model.embeddings.physical_tables():
        for ids, rows in trained.model.embeddings.export_rows(table.name):
            model.embeddings.load_rows(table.name, ids, rows)
    torch.set_num_threads(1)
    prepared = []
    for body in plain[:BASELINE_REQUESTS]:
        items = np.array([c["item_id"] for c in body["candidates"]], dtype=np.int64)
        user = preprocessing.decode("user_id", pa.array([body["user_id"]]))[0].as_py()
        raw_items = preprocessing.decode("item_id", pa.array(items)).to_pylist()
        features = store.get_request(user, raw_items)
        columns = {
            name: preprocessing.encode(name, features.column(name))
            for name in features.schema.names
        }
        activity = [body["context"]["user_activity"]] * len(items)
        popularity = [c["features"]["item_popularity"] for c in body["candidates"]]
        columns["user_activity"] = model_input(preprocessing, "user_activity", activity)
        columns["item_popularity"] = model_input(preprocessing, "item_popularity", popularity)
        prepared.append(columns)
    latencies = []
    with collector_paused(), torch.inference_mode():
        for columns in prepared:
            started = time.perf_counter()
            batch = batch_from_columns(columns, model.schema, with_labels=False)
            torch.sigmoid(model(batch.sparse, batch.dense)).numpy()
            latencies.append(time.perf_counter() - started)
    return summarize("in_process_baseline", 1, latencies, sum(latencies), {"threads": 1})


def model_input(preprocessing: Preprocessor, name: str, raw: list) -> np.ndarray:
    return preprocessing.encode(name, pa.array(raw, pa.float64())).to_numpy()


class Connection:
    """One keep-alive HTTP/1.1 connection: POST a body, read the status and the whole answer."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.head = (
            f"POST /score HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def post(self, body: bytes) -> tuple[int, bytes]:
        self.writer.write(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
        status_line = await self.reader.readline()
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        payload = await self.reader.readexactly(length)
        return int(status_line.split()[1]), payload

    def close(self) -> None:
        self.writer.close()


async def load(
    port: int, bodies: list[bytes], concurrency: int, seconds: float | None, count: int | None
):
    """Closed-loop clients for `seconds` (or until `count` requests): latencies, wall time."""
    connections = [Connection(port) for _ in range(concurrency)]
    for connection in connections:
        await connection.open()
    latencies: list[float] = []
    errors = 0
    degraded = 0
    next_body = 0
    started = time.perf_counter()
    deadline = None if seconds is None else started + seconds

    async def client(connection: Connection) -> None:
        nonlocal next_body, errors, degraded
        while True:
            if deadline is not None and time.perf_counter() >= deadline:
                return
            if count is not None and next_body >= count:
                return
            body = bodies[next_body % len(bodies)]
            next_body += 1
            sent = time.perf_counter()
            status, payload = await connection.post(body)
            latencies.append(time.perf_counter() - sent)
            if status != 200:
                errors += 1
            elif b'"degraded": true' in payload:
                degraded += 1

    await asyncio.gather(*(client(connection) for connection in connections))
    wall = time.perf_counter() - started
    for connection in connections:
        connection.close()
    return latencies, wall, errors, degraded


def summarize(
    case: str, concurrency: int, latencies: list[float], wall: float, extra: dict
) -> dict:
    ordered = np.sort(np.array(latencies)) * 1000
    return {
        "case": case,
        "concurrency": concurrency,
        "requests": len(latencies),
        "seconds": round(wall, 2),
        "p50_ms": round(float(np.percentile(ordered, 50)), 3),
        "p90_ms": round(float(np.percentile(ordered, 90)), 3),
        "p99_ms": round(float(np.percentile(ordered, 99)), 3),
        "max_ms": round(float(ordered[-1]), 3),
        "requests_per_s": round(len(latencies) / wall, 1),
        "candidates_per_s": round(len(latencies) * CANDIDATES / wall, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        **extra,
    }


def server_counters(port: int) -> dict[str, float]:
    """The service's Prometheus samples, by name (with labels)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def phase_metrics(before: dict[str, float], after: dict[str, float]) -> dict:
    """What the service counted during one case: rows by source, batching, Redis errors."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    rows = {
        source: delta(f'embtab_rows_total{{source="{source}"}}')
        for source in ("resident", "cache", "redis", "default")
    }
    total = sum(rows.values())
    batches = delta("embtab_score_batch_requests_count")
    answered = delta("embtab_score_latency_seconds_count")
    return {
        "server_mean_ms": round(1000 * delta("embtab_score_latency_seconds_sum") / answered, 3)
        if answered
        else None,
        "server_local_row_rate": round((rows["resident"] + rows["cache"]) / total, 4)
        if total
        else None,
        "server_rows": rows,
        "server_batches": batches,
        "server_mean_batch_requests": round(delta("embtab_score_batch_requests_sum") / batches, 2)
        if batches
        else None,
        "server_redis_errors": delta("embtab_redis_errors_total"),
    }


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection in this process while it measures: a full pass over the
    data sets and requests it holds would be counted as the service's latency."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def measured(case: str, port: int, concurrency: int, bodies, seconds, count) -> dict:
    before = server_counters(port)
    with collector_paused():
        latencies, wall, errors, degraded = asyncio.run(
            load(port, bodies, concurrency, seconds, count)
        )
    extra = {"errors": errors, "degraded": degraded, **phase_metrics(before, server_counters(port))}
    return summarize(case, concurrency, latencies, wall, extra)


def measured_paired(port: int, cases: dict[str, list[bytes]], seconds: float) -> list[dict]:
    """Each case at concurrency 1 for `seconds` in all, in PAIRED_ROUNDS slices that alternate
    in ABBA order: the cases are compared under the same drift of the machine's load."""
    latencies: dict[str, list[float]] = {name: [] for name in cases}
    wall = dict.fromkeys(cases, 0.0)
    errors = dict.fromkeys(cases, 0)
    degraded = dict.fromkeys(cases, 0)
    counted: dict[str, dict[str, float]] = {name: {} for name in cases}
    names = list(cases)
    for round_ in range(PAIRED_ROUNDS):
        for name in names if round_ % 2 == 0 else names[::-1]:
            before = server_counters(port)
            with collector_paused():
                slice_latencies, slice_wall, slice_errors, slice_degraded = asyncio.run(
                    load(port, cases[name], 1, seconds / PAIRED_ROUNDS, None)
                )
            after = server_counters(port)
            latencies[name] += slice_latencies
            wall[name] += slice_wall
            errors[name] += slice_errors
            degraded[name] += slice_degraded
            for key, value in after.items():
                counted[name][key] = counted[name].get(key, 0.0) + value - before.get(key, 0.0)
    return [
        summarize(
            name,
            1,
            latencies[name],
            wall[name],
            {
                "errors": errors[name],
                "degraded": degraded[name],
                "slices": PAIRED_ROUNDS,
                **phase_metrics({}, counted[name]),
            },
        )
        for name in names
    ]


def check_raw_ids_score_alike(port: int, bodies: list[bytes], raw_bodies: list[bytes]) -> int:
    """The first PARITY_REQUESTS requests, each sent with prepared and with raw ids, must get
    identical scores: otherwise the raw-id case would time a different computation."""

    async def both() -> None:
        connection = Connection(port)
        await connection.open()
        try:
            for index in range(PARITY_REQUESTS):
                scores = []
                for body in (bodies[index], raw_bodies[index]):
                    status, payload = await connection.post(body)
                    if status != 200:
                        raise RuntimeError(f"request {index}: status {status}: {payload[:300]!r}")
                    scores.append(json.loads(payload)["scores"])
                if scores[0] != scores[1]:
                    gap = np.abs(np.subtract(scores[0], scores[1])).max()
                    raise RuntimeError(
                        f"request {index}: raw ids score differently from prepared ids "
                        f"(largest difference {gap:.3g})"
                    )
        finally:
            connection.close()

    asyncio.run(both())
    return PARITY_REQUESTS


class Service:
    """`embtab serve` in its own process."""

    def __init__(
        self,
        url: str,
        cache_mb: float,
        model: str = MODEL_NAME,
        extra_args: tuple[str, ...] = (),
        log: Path | None = None,
        max_open_files: int | None = None,
    ) -> None:
        """`extra_args`: more `embtab serve` flags; `log`: where its stderr goes (default: this
        process's); `max_open_files`: its descriptor limit (RLIMIT_NOFILE)."""
        import resource

        def limit_files() -> None:
            if max_open_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (max_open_files, max_open_files))

        self.port = free_port()
        stderr = None if log is None else log.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "embtab.cli",
                "serve",
                "--model",
                model,
                "--redis",
                url,
                "--port",
                str(self.port),
                "--cache-mb",
                str(cache_mb),
                *extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=limit_files,
        )
        if stderr is not None:
            stderr.close()  # the child has its own copy

    def wait_ready(self, timeout_s: float = 120) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise RuntimeError("the service did not become ready")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def run_cases(
    url: str, bodies: list[bytes], raw_bodies: list[bytes], seconds: float
) -> tuple[list[dict], int]:
    """The service's cases, and how many requests were checked to score alike in both forms."""
    results = []
    service = Service(url, cache_mb=256)
    try:
        service.wait_ready()
        results.append(measured("service_cold_start", service.port, 1, bodies, None, COLD_REQUESTS))
        asyncio.run(load(service.port, bodies, 8, 5.0, None))  # warm-up: every row local
        checked = check_raw_ids_score_alike(service.port, bodies, raw_bodies)
        paired = {"service_warm": bodies, "service_warm_raw_ids": raw_bodies}
        results += measured_paired(service.port, paired, seconds)
        for concurrency in CONCURRENCY[1:]:
            results.append(
                measured("service_warm", service.port, concurrency, bodies, seconds, None)
            )
    finally:
        service.stop()
    uncached = Service(url, cache_mb=0)
    try:
        uncached.wait_ready()
        asyncio.run(load(uncached.port, bodies, 1, 2.0, None))
        results.append(measured("service_no_cache", uncached.port, 1, bodies, seconds, None))
    finally:
        uncached.stop()
    return results, checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a DCN-v2 MovieLens-1M checkpoint")
    parser.add_argument(
        "--train-rows", type=int, default=200_000, help="rows to train on if no checkpoint"
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each load case")
    parser.add_argument("--out", type=Path, default=RESULTS)
    arguments = parser.parse_args()

    server = start_redis()
    url = f"redis://127.0.0.1:{server.port}/0"
    try:
        with tempfile.TemporaryDirectory(prefix="embtab-bench-") as scratch:
            path, model_info = checkpoint_path(arguments, Path(scratch))
            nodes = RedisNodes(RedisConfig.parse(url, socket_timeout_s=30.0))
            published = publish_checkpoint(
                ParamPublisher(nodes, MODEL_NAME), str(path), num_shards=4
            )
            trained = load_checkpoint(path).model
            store = fill_online_store(url, trained.schema)
            bodies, raw_bodies, plain = request_bodies(trained.spec.preprocessing)
            results = [baseline(path, store, plain)]
            service_results, parity_checked = run_cases(url, bodies, raw_bodies, arguments.seconds)
            results += service_results
            redis_version = nodes.meta.info("server")["redis_version"]
            nodes.close()
    finally:
        server.stop()

    by_case = {(r["case"], r["concurrency"]): r for r in results}
    base = by_case[("in_process_baseline", 1)]
    warm_c1 = by_case[("service_warm", 1)]
    raw_c1 = by_case[("service_warm_raw_ids", 1)]
    summary = {
        "p50_ms_c1": warm_c1["p50_ms"],
        "p99_ms_c1": warm_c1["p99_ms"],
        "candidates_per_s_c32": by_case[("service_warm", 32)]["candidates_per_s"],
        "serving_path_overhead": round(warm_c1["p50_ms"] / base["p50_ms"], 2),
        "p99_over_p50_c1": round(warm_c1["p99_ms"] / warm_c1["p50_ms"], 2),
        "c32_vs_in_process": round(
            by_case[("service_warm", 32)]["candidates_per_s"] / base["candidates_per_s"], 3
        ),
        "p99_ms_c1_no_cache": by_case[("service_no_cache", 1)]["p99_ms"],
        "p99_ms_c1_cold_start": by_case[("service_cold_start", 1)]["p99_ms"],
        "in_process_p50_ms": base["p50_ms"],
        "p50_ms_c1_raw_ids": raw_c1["p50_ms"],
        "p99_ms_c1_raw_ids": raw_c1["p99_ms"],
        "raw_id_overhead": round(raw_c1["p99_ms"] / warm_c1["p99_ms"], 3),
        "raw_id_overhead_p50": round(raw_c1["p50_ms"] / warm_c1["p50_ms"], 3),
    }
    write_results(
        arguments.out,
        machine_info(**{"redis-server": redis_version}),
        results,
        summary,
        setup={
            "dataset": DATASET,
            "model": "dcn (DCN-v2 defaults of models.config.DCNConfig, full tables, dim 16)",
            **model_info,
            "published": {
                "version": published.version,
                "rows": published.rows_written,
                "encoding": "fp32",
                "shards": 4,
                "dense_bytes": published.dense_bytes,
            },
            "candidates_per_request": CANDIDATES,
            "distinct_requests": DISTINCT_REQUESTS,
            "seconds_per_case": arguments.seconds,
            "raw_id_case": (
                "the same requests with user and item ids as the raw strings of the artifact's "
                f"vocabularies; alternated with the prepared case in {PAIRED_ROUNDS} slices; "
                f"{parity_checked} requests checked to get identical scores in both forms"
            ),
            "dense_values": "raw counts; the service (and the baseline) apply the artifact's log1p",
            "client": "asyncio keep-alive HTTP/1.1, closed loop, in the bench process",
            "server": "embtab serve (uvicorn, 1 process, torch threads 1, max wait 2 ms)",
        },
        baseline="in_process_baseline: same model and requests, features in memory",
    )


if __name__ == "__main__":
    main()
