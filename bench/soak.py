"""Soak: sustained load on `/score` while online training pushes deltas into the served version.

What runs, all on this machine:

1. The serving benchmark's setup (bench/serving.py): a DCN-v2 MovieLens-1M checkpoint (trained
   here on `--train-rows` training rows unless `--checkpoint` is given), published to an
   embedded Redis (fp32, 4 shards), the online feature store filled from the training split,
   `embtab serve` in its own process, and the same requests (one user x 100 candidates).
2. `embtab stream run` in its own process against an embedded Kafka-compatible broker: it
   replays the validation split, paced to last the whole soak, joins clicks and trains the model
   online, pushing a delta into the live version every `--sync-interval` seconds (and writing
   users' online features to Redis as the traffic goes). The service picks up every delta
   (cache invalidation, dense revisions) while it answers.
3. This process: `--concurrency` closed-loop keep-alive clients (bench/serving.py's), first for
   `--warmup` seconds, then for `--seconds` seconds in windows of `--window` seconds. After each
   window it reads the service's resident memory (VmRSS) and the delta it serves.

Summary: `requests` and `errors` (answers other than 200) over the whole run, warm-up included;
`p99_ms` over every request after warm-up; `rss_growth_pct`, the service's RSS at the end over
its RSS at the end of warm-up; the per-window p99s and, as the baseline of the same run, the last
window's p99 over the first one's.

    .venv/bin/python bench/soak.py --threads 1      # 600 s; writes bench/results/soak.json
"""

# ruff: noqa: E402 (the path fixes below must run before the imports)
from __future__ import annotations

import sys
from pathlib import Path

# Like bench/serving.py: keep bench/ off the import path (its serving.py shadows the package),
# and put the repository on it so that bench.serving's helpers can be imported.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import asyncio
import json
import os
import signal
import subprocess
import tempfile
import urllib.request
from typing import Any

import numpy as np
import torch

from bench.serving import (
    DATASET,
    MODEL_NAME,
    Service,
    checkpoint_path,
    collector_paused,
    fill_online_store,
    load,
    phase_metrics,
    request_bodies,
    server_counters,
    summarize,
)
from embtab.machine import machine_info, write_results
from embtab.services import embedded_services
from feature_store.offline import open_prepared
from models.checkpoint import load_checkpoint
from serving.published_model import publish_checkpoint
from serving.publisher import ParamPublisher
from serving.redis_nodes import RedisConfig, RedisNodes

RESULTS = Path(__file__).parent / "results" / "soak.json"
REPLAY_SPLIT = "valid"
# Seconds the replay outlasts the load, so that deltas keep coming until the last window ends.
REPLAY_MARGIN_S = 30.0


def resident_bytes(pid: int) -> int:
    """A process's resident set size (VmRSS), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def served_version(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=5) as answer:
        return json.loads(answer.read())


class Stream:
    """`embtab stream run` in its own process: replay, join, train, push deltas."""

    def __init__(
        self, kafka: str, redis_url: str, checkpoint: Path, speedup: float, sync_s: float, log: Path
    ) -> None:
        command = [sys.executable, "-m", "embtab.cli", "stream", "run", "--json"]
        command += ["--kafka", kafka, "--redis", redis_url, "--topic-prefix", "soak."]
        command += ["--checkpoint", str(checkpoint), "--name", MODEL_NAME]
        command += ["--split", REPLAY_SPLIT, "--speedup", f"{speedup:.1f}"]
        command += ["--sync-interval", str(sync_s)]
        self.command = command
        self.log = log
        with log.open("wb") as errors:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors)

    def stop(self, timeout_s: float = 90.0) -> dict[str, Any]:
        """Interrupt it (it pushes a last delta and commits) and return its JSON result."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            stdout, _ = self.process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            raise RuntimeError(f"the stream did not stop; log:\n{self.log_tail()}") from None
        if self.process.returncode != 0:
            raise RuntimeError(
                f"the stream failed ({self.process.returncode}); log:\n{self.log_tail()}"
            )
        return json.loads(stdout)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def replay_speedup(seconds: float) -> float:
    """Event seconds per second that make the replayed split last `seconds`."""
    dataset = open_prepared(DATASET)
    times = dataset.read(REPLAY_SPLIT, [dataset.schema.time_column]).column(0).to_numpy()
    return float(times.max() - times.min()) / seconds


def window(
    case: str, service: Service, bodies: list[bytes], concurrency: int, seconds: float
) -> tuple[dict[str, Any], list[float]]:
    """One window of closed-loop load: its summary (with the service's RSS and served delta
    at its end) and its latencies."""
    before = server_counters(service.port)
    with collector_paused():
        latencies, wall, errors, degraded = asyncio.run(
            load(service.port, bodies, concurrency, seconds, None)
        )
    extra = {
        "errors": errors,
        "degraded": degraded,
        **phase_metrics(before, server_counters(service.port)),
        "rss_bytes": resident_bytes(service.process.pid),
        "served_delta": served_version(service.port)["delta"],
    }
    return summarize(case, concurrency, latencies, wall, extra), latencies


def soak(arguments: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    path, model_info = checkpoint_path(arguments, scratch)
    with embedded_services() as services:
        nodes = RedisNodes(RedisConfig.parse(services.redis_url, socket_timeout_s=30.0))
        published = publish_checkpoint(ParamPublisher(nodes, MODEL_NAME), str(path), num_shards=4)
        model = load_checkpoint(path).model
        fill_online_store(services.redis_url, model.schema)
        redis_version = nodes.meta.info("server")["redis_version"]
        nodes.close()
        bodies, _, _ = request_bodies(model.spec.preprocessing)
        service = Service(services.redis_url, cache_mb=arguments.cache_mb)
        stream = None
        try:
            service.wait_ready()
            speedup = replay_speedup(arguments.warmup + arguments.seconds + REPLAY_MARGIN_S)
            stream = Stream(
                services.kafka_bootstrap,
                services.redis_url,
                path,
                speedup,
                arguments.sync_interval,
                scratch / "stream.log",
            )
            warm, _ = window("warmup", service, bodies, arguments.concurrency, arguments.warmup)
            print(json.dumps(warm), flush=True)
            windows, latencies = [], []
            remaining = arguments.seconds
            while remaining > 1e-6:
                length = min(arguments.window, remaining)
                measured, seen = window("soak", service, bodies, arguments.concurrency, length)
                measured["window"] = len(windows)
                windows.append(measured)
                latencies += seen
                remaining -= length
                print(json.dumps(measured), flush=True)
                if stream.process.poll() is not None:
                    raise RuntimeError(f"the stream ended early; log:\n{stream.log_tail()}")
            trained = stream.stop()
        finally:
            if stream is not None and stream.process.poll() is None:
                stream.process.kill()
            service.stop()
    return {
        "model_info": model_info,
        "published": published,
        "redis_version": redis_version,
        "speedup": speedup,
        "stream_command": stream.command,
        "warmup": warm,
        "windows": windows,
        "latencies": latencies,
        "trained": trained,
    }


def summary_of(run: dict[str, Any]) -> dict[str, Any]:
    warm, windows, trained = run["warmup"], run["windows"], run["trained"]["trainer"]
    p99s = [w["p99_ms"] for w in windows]
    baseline_rss = warm["rss_bytes"]
    return {
        "requests": warm["requests"] + sum(w["requests"] for w in windows),
        "errors": warm["errors"] + sum(w["errors"] for w in windows),
        "p99_ms": round(float(np.percentile(np.array(run["latencies"]) * 1000, 99)), 3),
        "rss_growth_pct": round(100 * (windows[-1]["rss_bytes"] / baseline_rss - 1), 2),
        "rss_max_growth_pct": round(
            100 * (max(w["rss_bytes"] for w in windows) / baseline_rss - 1), 2
        ),
        "p99_ms_window_min": min(p99s),
        "p99_ms_window_max": max(p99s),
        "p99_last_over_first_window": round(p99s[-1] / p99s[0], 3),
        "requests_per_s": round(
            sum(w["requests"] for w in windows) / sum(w["seconds"] for w in windows), 1
        ),
        "degraded": warm["degraded"] + sum(w["degraded"] for w in windows),
        "deltas_served": windows[-1]["served_delta"] - warm["served_delta"],
        "trainer_deltas": trained["deltas"],
        "trainer_examples": trained["examples"],
        "trainer_sync_failures": trained["sync_failures"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="measured load, after warm-up")
    parser.add_argument("--warmup", type=float, default=60.0, help="load before measuring RSS")
    parser.add_argument("--window", type=float, default=60.0, help="seconds per p99 window")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop clients")
    parser.add_argument("--sync-interval", type=float, default=10.0, help="seconds between deltas")
    parser.add_argument("--cache-mb", type=float, default=256.0, help="the service's row cache")
    parser.add_argument("--checkpoint", type=Path, help="a DCN-v2 MovieLens-1M checkpoint")
    parser.add_argument(
        "--train-rows", type=int, default=200_000, help="rows to train on if no checkpoint"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--out", type=Path, default=RESULTS)
    arguments = parser.parse_args()
    if min(arguments.seconds, arguments.warmup, arguments.window) <= 0:
        parser.error("--seconds, --warmup and --window must be > 0")
    # The stream and service processes read it when torch starts.
    os.environ["OMP_NUM_THREADS"] = str(arguments.threads)
    torch.set_num_threads(arguments.threads)
    host = machine_info()
    with tempfile.TemporaryDirectory(prefix="embtab-soak-") as scratch:
        run = soak(arguments, Path(scratch))
    host["versions"]["redis-server"] = run["redis_version"]
    host["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    summary = summary_of(run)
    published = run["published"]
    write_results(
        arguments.out,
        host,
        [run["warmup"], *run["windows"], {"case": "stream", **run["trained"]}],
        summary,
        setup={
            "dataset": DATASET,
            "model": "dcn (DCN-v2 defaults of models.config.DCNConfig, full tables, dim 16)",
            **run["model_info"],
            "published": {"version": published.version, "rows": published.rows_written},
            "concurrency": arguments.concurrency,
            "warmup_s": arguments.warmup,
            "seconds": arguments.seconds,
            "window_s": arguments.window,
            "sync_interval_s": arguments.sync_interval,
            "replay": f"{REPLAY_SPLIT} split at speedup {run['speedup']:.1f}",
            "stream_command": " ".join(run["stream_command"][1:]).replace(
                str(run["stream_command"][run["stream_command"].index("--checkpoint") + 1]),
                "<checkpoint>",
            ),
            "server": "embtab serve (uvicorn, 1 process, torch threads 1, max wait 2 ms)",
            "client": "asyncio keep-alive HTTP/1.1, closed loop, in the bench process",
        },
        baseline="the first window after warm-up: p99_last_over_first_window",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
