"""Where a `/score` request's time goes: the serving path's stages timed in the server's own code.

The same setup as `bench/serving.py` (DCN-v2 on MovieLens-1M, published to an embedded Redis with
the online feature store filled, 100 candidates per request, the row cache warm). Each request
goes through the service's own functions in the order `POST /score` runs them, in this process:
parse and validate the body (`serving.request.parse_request`), check it against the model and turn
it into columns (`Scorer.prepare`), then `Scorer.score`, whose stages are timed by wrapping them:
the online user features (one Redis round trip), the rest of feature assembly, the row plan, the
rows (`_load_rows`, warm: no Redis), the model input (`batch_from_columns`) and the model's
forward; then the answer's JSON. Medians over the requests, per stage, for prepared and raw ids.
The in-process baseline of `bench/serving.py` (features in memory, the model only) is timed in
the same run, and the service itself over HTTP at concurrency 1: what the client sees minus what
the server spends in its handler is the HTTP layer and the event loop.

    .venv/bin/python bench/serving_profile.py    # writes bench/results/serving_profile.json

Stage times are medians of wall and of CPU time (this thread's): on a shared machine the CPU
time is what a stage costs, the wall time adds its waits (Redis, other processes). The stages
of the code before a change are timed by putting that code first on the path:
`git archive REV serving | tar -x -C /tmp/before` and `PYTHONPATH=/tmp/before:.`.
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
import datetime as dt
import importlib.util
import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import numpy as np
import torch

from embtab.machine import machine_info
from embtab.services import start_redis
from models.checkpoint import load_checkpoint
from serving import scorer as scorer_module
from serving.published_model import publish_checkpoint
from serving.publisher import ParamPublisher
from serving.redis_nodes import RedisConfig, RedisNodes
from serving.request import parse_request
from serving.service import ScoringService, ServeConfig, serving_redis

RESULTS = Path(__file__).parent / "results" / "serving_profile.json"


def _bench_module():
    """bench/serving.py, whose setup (checkpoint, online store, requests, service) this reuses."""
    spec = importlib.util.spec_from_file_location(
        "serving_bench", Path(__file__).with_name("serving.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class StageTimes:
    """Wall and CPU (this thread's) seconds per stage, one entry per call: where the machine is
    shared, CPU time says what a stage costs, wall time adds the waits (Redis, other processes)."""

    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = defaultdict(list)
        self.cpu: dict[str, list[float]] = defaultdict(list)

    def time(self, stage: str, call: Callable, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return call(*args, **kwargs)
        finally:
            self.cpu[stage].append(time.thread_time() - cpu)
            self.wall[stage].append(time.perf_counter() - wall)

    def medians_ms(self) -> dict[str, dict[str, float]]:
        return {
            stage: {
                "wall": round(1000 * float(np.median(self.wall[stage])), 3),
                "cpu": round(1000 * float(np.median(self.cpu[stage])), 3),
            }
            for stage in self.wall
        }


@contextlib.contextmanager
def scorer_stages(scorer, stages: StageTimes) -> Iterator[None]:
    """Time the stages of `Scorer.score` by wrapping the functions it calls."""
    wrapped = {
        "online_features": (scorer, "_online_columns"),
        "assemble": (scorer, "_assemble"),
        "load_rows": (scorer, "_load_rows"),
        "model_input": (scorer_module, "batch_from_columns"),
    }
    originals = {stage: getattr(owner, name) for stage, (owner, name) in wrapped.items()}
    snapshot = scorer.snapshot
    plan, forward = snapshot.planner.plan, snapshot.model.forward
    try:
        for stage, (owner, name) in wrapped.items():
            setattr(
                owner,
                name,
                lambda *a, _s=stage, _f=originals[stage], **k: stages.time(_s, _f, *a, **k),
            )
        snapshot.planner.plan = lambda *a: stages.time("row_plan", plan, *a)
        snapshot.model.forward = lambda *a: stages.time("forward", forward, *a)
        yield
    finally:
        for stage, (owner, name) in wrapped.items():
            if owner is scorer:
                delattr(owner, name)
            else:
                setattr(owner, name, originals[stage])
        del snapshot.planner.plan
        del snapshot.model.forward


def profile_in_process(service: ScoringService, bodies: list[bytes]) -> dict[str, float]:
    """Median ms per stage of the service's path, in process, over `bodies` (after a warm-up)."""
    scorer = service.scorer
    for body in bodies:  # every row resident: the stages of a warm request
        scorer.score([scorer.prepare(parse_request(body, 1000))])
    stages = StageTimes()
    with scorer_stages(scorer, stages):
        for body in bodies:
            request = stages.time("parse", parse_request, body, 1000)
            columns = stages.time("prepare", scorer.prepare, request)
            result = stages.time("score", scorer.score, [columns]).split()[0]
            payload = {"model": "m", "version": 1, "delta": 0, "degraded": False}
            stages.time("answer_json", json.dumps, {**payload, "scores": result.scores.tolist()})
    medians = stages.medians_ms()
    measured = dict(medians)
    for kind in ("wall", "cpu"):
        timed = {stage: times[kind] for stage, times in measured.items()}
        parts = ("online_features", "row_plan", "load_rows", "model_input", "forward")
        medians.setdefault("assemble_without_online", {})[kind] = round(
            timed["assemble"] - timed["online_features"], 3
        )
        medians.setdefault("score_other", {})[kind] = round(
            timed["score"]
            - sum(timed[p] for p in parts)
            - (timed["assemble"] - timed["online_features"]),
            3,
        )
        medians.setdefault("sum_of_stages", {})[kind] = round(
            sum(timed[s] for s in ("parse", "prepare", "score", "answer_json")), 3
        )
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a DCN-v2 MovieLens-1M checkpoint")
    parser.add_argument("--train-rows", type=int, default=200_000)
    parser.add_argument("--requests", type=int, default=500, help="requests per case")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the HTTP case")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    arguments = parser.parse_args()
    load_at_start = round(os.getloadavg()[0], 2)
    bench = _bench_module()
    torch.set_num_threads(1)
    server = start_redis()
    url = f"redis://127.0.0.1:{server.port}/0"
    try:
        with tempfile.TemporaryDirectory(prefix="embtab-profile-") as scratch:
            path, _ = bench.checkpoint_path(arguments, Path(scratch))
            nodes = RedisNodes(RedisConfig.parse(url, socket_timeout_s=30.0))
            publish_checkpoint(ParamPublisher(nodes, bench.MODEL_NAME), str(path), num_shards=4)
            trained = load_checkpoint(path).model
            store = bench.fill_online_store(url, trained.schema)
            bodies, raw_bodies, plain = bench.request_bodies(trained.spec.preprocessing)
            bodies, raw_bodies = bodies[: arguments.requests], raw_bodies[: arguments.requests]
            baseline = bench.baseline(path, store, plain[: arguments.requests])
            service = ScoringService(ServeConfig(bench.MODEL_NAME, serving_redis(url)))
            service.scorer.refresh()
            with bench.collector_paused():
                prepared = profile_in_process(service, bodies)
                raw = profile_in_process(service, raw_bodies)
            service.nodes.close()
            http = bench.Service(url, cache_mb=256)
            try:
                http.wait_ready()
                asyncio.run(bench.load(http.port, bodies, 4, 3.0, None))  # warm-up
                over_http = bench.measured(
                    "service_warm", http.port, 1, bodies, arguments.seconds, None
                )
            finally:
                http.stop()
            nodes.close()
    finally:
        server.stop()
    report = {
        "machine": machine_info(),
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_average_1min_at_start": load_at_start,
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "requests": len(bodies),
        "in_process_baseline_p50_ms": baseline["p50_ms"],
        "stages_prepared_ids_ms": prepared,
        "stages_raw_ids_ms": raw,
        "http_c1": {
            "client_p50_ms": over_http["p50_ms"],
            "client_p99_ms": over_http["p99_ms"],
            "server_handler_mean_ms": over_http["server_mean_ms"],
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
