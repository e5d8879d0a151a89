"""Clients that send large valid bodies, or trickle theirs in, must not hold up the others.

Issue 23 asks for at most 2x a light client's p99. `embtab serve` runs in its own process. A heavy
load, a process of its own as another program would be, runs two clients: a huge one posting 4 MB
bodies back to back (100 candidates, an ordinary request's worth of scoring, each with an 8,000-id
history the model cuts to its last 5: its cost is in the parsing), and a slow one sending an
ordinary body a few bytes at a time, back to back. Meanwhile a light client scores 10 candidates at
a time. Windows with and without the heavy load alternate, and each round's p99 with the load is
compared with its p99 without, so that the machine's other load (2 cores shared with other jobs)
falls on both alike; the median over the rounds is compared with the limit. Parsed on the event
loop, each huge body stalled every other request for its whole parse (hundreds of ms, 18x); parsed
in a worker process but awaited by the batcher from its headers on, every light request waited out
`max_wait_ms` while a huge or slow body was coming in (2.1x, the p50 from 3.2 to 5.4 ms, at a load
average of 2-3). With the machine loaded past 5 by other jobs, that code measured 1.6x-1.8x here:
their scheduling delays enter both p99s and bring the ratio toward 1;
`bench/serving_large_bodies.py --before` compares the two codes in one run. On the quiet machine of
a CI run (load average below 1) the median was 2.02x, rounds 1.36x to 2.09x: the issue's 2x is not
met yet, so the test holds 3x, the limit main had before, which the 18x of parsing on the loop
cannot pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import numpy as np

from bench.serving import Service
from tests.serving.serving_helpers import ITEMS, publish, request_body, tiny_model, unique_name

WINDOW_S = 2.0
ROUNDS = 6
LIMIT = 3.0
CANDIDATES = 100
HISTORY = 8000


def heavy_body() -> bytes:
    body = request_body(1, np.arange(CANDIDATES) % ITEMS)
    history = [int(item) for item in (np.arange(HISTORY) * 7 + 100) % ITEMS]
    for candidate in body["candidates"]:
        candidate["features"]["hist_item_id"] = history
    return json.dumps(body).encode()


# The heavy load: its own process, since in this one its sends and answers would take the
# interpreter lock from the light client being measured. It prints each answer's status, "huge"
# or "slow" first.
HEAVY_LOAD = """
import socket, sys, threading, time, urllib.request
port, huge_path, slow_path, seconds = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
deadline = time.monotonic() + seconds
url = f"http://127.0.0.1:{port}/score"
headers = {"content-type": "application/json"}

def huge():
    body = open(huge_path, "rb").read()
    while time.monotonic() < deadline:
        request = urllib.request.Request(url, data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
            print("huge", response.status, flush=True)

def slow():  # 50 bytes every 20 ms
    body = open(slow_path, "rb").read()
    with socket.create_connection(("127.0.0.1", port)) as connection:
        reader = connection.makefile("rb")
        while time.monotonic() < deadline:
            connection.sendall(
                b"POST /score HTTP/1.1\\r\\nhost: x\\r\\ncontent-type: application/json\\r\\n"
                + f"content-length: {len(body)}\\r\\n\\r\\n".encode()
            )
            for start in range(0, len(body), 50):
                time.sleep(0.02)
                connection.sendall(body[start : start + 50])
            status = int(reader.readline().split()[1])
            length = 0
            while (line := reader.readline()) != b"\\r\\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
            print("slow", status, flush=True)

threads = [threading.Thread(target=huge), threading.Thread(target=slow)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
"""


def light_latencies(client: httpx.Client, body: bytes, seconds: float) -> list[float]:
    latencies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        response = client.post("/score", content=body)
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
    return latencies


def test_huge_and_slow_bodies_do_not_raise_a_light_clients_p99_past_3x(redis_service, tmp_path):
    name = unique_name("large-bodies")
    publish(tiny_model("hash"), name, redis_service.redis_url)
    service = Service(redis_service.redis_url, 16, name)
    heavy = heavy_body()
    assert 3 * 2**20 < len(heavy) < 8 * 2**20  # within --max-body-mb's default of 8
    light = json.dumps(request_body(2, np.arange(10))).encode()
    (tmp_path / "huge.json").write_bytes(heavy)
    (tmp_path / "slow.json").write_bytes(light)
    try:
        service.wait_ready(timeout_s=90)
        base = f"http://127.0.0.1:{service.port}"
        with (
            httpx.Client(base_url=base, timeout=30) as client,
            httpx.Client(base_url=base, timeout=30) as heavy_client,
        ):
            first = heavy_client.post("/score", content=heavy)  # the parsing path warmed up
            assert first.status_code == 200, first.text
            assert len(first.json()["scores"]) == CANDIDATES
            light_latencies(client, light, 1.0)
            rounds = []
            for _ in range(ROUNDS):
                alone = light_latencies(client, light, WINDOW_S)
                load = subprocess.Popen(
                    [sys.executable, "-c", HEAVY_LOAD, str(service.port)]
                    + [str(tmp_path / "huge.json"), str(tmp_path / "slow.json")]
                    + [str(WINDOW_S + 0.3)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                time.sleep(0.3)  # the first huge body is on its way, the first slow one started
                loaded = light_latencies(client, light, WINDOW_S)
                output, _ = load.communicate(timeout=60)
                answers = [tuple(line.split()) for line in output.splitlines()]
                rounds.append((alone, loaded, answers))
    finally:
        service.stop()
    ratios = []
    for alone, loaded, answers in rounds:
        alone_p99 = float(np.percentile(alone, 99)) * 1000
        loaded_p99 = float(np.percentile(loaded, 99)) * 1000
        ratios.append(loaded_p99 / alone_p99)
        huge, slow = (sum(kind == which for kind, _ in answers) for which in ("huge", "slow"))
        print(
            f"light client p99 alone {alone_p99:.1f} ms ({len(alone)} requests), with the heavy "
            f"load {loaded_p99:.1f} ms ({len(loaded)} requests; {huge} huge and {slow} slow "
            f"bodies answered): {ratios[-1]:.2f}x"
        )
        assert {status for _, status in answers} == {"200"}, answers
        assert {kind for kind, _ in answers} == {"huge", "slow"}, "a heavy client got no answer"
    median = float(np.median(ratios))
    print(f"median over {ROUNDS} rounds: {median:.2f}x")
    assert median <= LIMIT, f"the light client's p99 rose {median:.2f}x (median of {ratios})"
