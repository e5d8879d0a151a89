"""A light client's latency while huge and slow bodies come in (issue 23 item 7), against the
code before a change in the same run.

The setup of `tests/faults/test_large_bodies.py` (its heavy load: a huge client posting 4 MB
bodies back to back and a slow one trickling an ordinary body in, a process of their own; a
light client scoring 10 candidates at a time; the test's tiny DCN published to an embedded
Redis), with each round's window alone and with the heavy load. With `--before DIR` (the code
before, `git archive REV serving | tar -x -C DIR`), a second `embtab serve` runs that code, and
the rounds alternate between the two services, so that the machine's other load falls on both.
Per service: each round's p50 and p99 alone and loaded, and the medians over the rounds of the
p99 ratio (loaded over alone) and of the p50s.

    .venv/bin/python bench/serving_large_bodies.py --before /tmp/before
"""

# ruff: noqa: E402 (the path fix below must run before the imports)
from __future__ import annotations

import sys
from pathlib import Path

# This script is named like the `serving` package: keep its own directory off the import path.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse
import json
import os
import subprocess
import tempfile
import time

import httpx
import numpy as np

from bench.serving import Service
from embtab.machine import machine_info, write_results
from embtab.services import start_redis
from tests.faults.test_large_bodies import HEAVY_LOAD, heavy_body, light_latencies
from tests.serving.serving_helpers import publish, request_body, tiny_model, unique_name

RESULTS = Path(__file__).parent / "results" / "serving_large_bodies.json"


def started(url: str, name: str, code: Path | None) -> Service:
    """`embtab serve` for `name`, running the serving code in `code` (None: this checkout's)."""
    path = os.environ.get("PYTHONPATH", "")
    if code is not None:
        os.environ["PYTHONPATH"] = f"{code}:{Path.cwd()}"
    try:
        return Service(url, 16, name)
    finally:
        os.environ["PYTHONPATH"] = path


def one_round(port: int, files: tuple[Path, Path], light: bytes, window_s: float) -> dict:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        alone = light_latencies(client, light, window_s)
        load = subprocess.Popen(
            [sys.executable, "-c", HEAVY_LOAD, str(port), *map(str, files), str(window_s + 0.3)],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.3)
        loaded = light_latencies(client, light, window_s)
        output, _ = load.communicate(timeout=60)
    answers = [line.split() for line in output.splitlines()]
    p50_alone, p99_alone = (float(x) * 1000 for x in np.percentile(alone, [50, 99]))
    p50_loaded, p99_loaded = (float(x) * 1000 for x in np.percentile(loaded, [50, 99]))
    return {
        "alone": {"requests": len(alone), "p50_ms": p50_alone, "p99_ms": p99_alone},
        "loaded": {"requests": len(loaded), "p50_ms": p50_loaded, "p99_ms": p99_loaded},
        "p99_ratio": p99_loaded / p99_alone,
        "huge_answered": sum(kind == "huge" for kind, _ in answers),
        "slow_answered": sum(kind == "slow" for kind, _ in answers),
        "statuses": sorted({status for _, status in answers}),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="the serving code before, to compare with")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--window-s", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    arguments = parser.parse_args()
    load_at_start = round(os.getloadavg()[0], 2)
    server = start_redis()
    url = f"redis://127.0.0.1:{server.port}/0"
    name = unique_name("large-bodies")
    publish(tiny_model("hash"), name, url)
    codes = {"after": None} | ({"before": arguments.before} if arguments.before else {})
    services = {case: started(url, name, code) for case, code in codes.items()}
    light = json.dumps(request_body(2, np.arange(10))).encode()
    results: dict[str, list[dict]] = {case: [] for case in services}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            files = (Path(scratch) / "huge.json", Path(scratch) / "slow.json")
            files[0].write_bytes(heavy_body())
            files[1].write_bytes(light)
            for service in services.values():
                service.wait_ready(timeout_s=120)
                with httpx.Client(base_url=f"http://127.0.0.1:{service.port}", timeout=30) as c:
                    assert c.post("/score", content=files[0].read_bytes()).status_code == 200
                    light_latencies(c, light, 1.0)
            for round_index in range(arguments.rounds):
                order = list(services) if round_index % 2 == 0 else list(services)[::-1]
                for case in order:
                    outcome = one_round(services[case].port, files, light, arguments.window_s)
                    results[case].append(outcome)
                    print(case, json.dumps(outcome), flush=True)
    finally:
        for service in services.values():
            service.stop()
        server.stop()
    summary = {
        case: {
            "p99_ratio_median": float(np.median([r["p99_ratio"] for r in rounds])),
            "p50_ms_alone_median": float(np.median([r["alone"]["p50_ms"] for r in rounds])),
            "p50_ms_loaded_median": float(np.median([r["loaded"]["p50_ms"] for r in rounds])),
        }
        for case, rounds in results.items()
    }
    write_results(
        arguments.out,
        machine_info(),
        results,
        summary,
        load_average_1min_at_start=load_at_start,
        load_average_1min_at_end=round(os.getloadavg()[0], 2),
        rounds=arguments.rounds,
        window_s=arguments.window_s,
    )


if __name__ == "__main__":
    main()
