"""A published model served from a 3-node Redis Cluster by several uvicorn workers on one port."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import redis

from embtab.cli import main
from embtab.cluster import embedded_cluster, start_redis_cluster
from embtab.services import ServiceError, free_port
from models.checkpoint import save_checkpoint
from tests.serving.serving_helpers import reference_scores, request_body, tiny_model, unique_name

WORKERS = 2
SHARDS = 12
# Each worker imports torch and the models before it answers: ~10 s alone, several times
# that on a 2-core CI machine running other tests.
READY_S = 120
SHARD_TAG = re.compile(rb"\{[^}]*:(\d+)\}$")


def test_a_cluster_serves_a_published_model_from_several_workers(tmp_path, capsys):
    model = tiny_model("qr")
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", model)
    name = unique_name("cluster")
    with embedded_cluster(3) as cluster:
        argv = ["publish", str(checkpoint), "--model", name, "--redis", cluster.url]
        argv += ["--redis-cluster", "--shards", str(SHARDS), "--json"]
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out)["shards"] == SHARDS

        # Every shard's rows (of every table) on exactly one node; the shards on all nodes.
        owners: dict[bytes, set[int]] = {}
        for node, port in enumerate(cluster.ports):
            client = redis.Redis(port=port, socket_timeout=2)
            for key in client.scan_iter(match=f"embtab:{name}:*:rows:*".encode(), count=1000):
                owners.setdefault(SHARD_TAG.search(key).group(1), set()).add(node)
            client.close()
        assert len(owners) == SHARDS and all(len(nodes) == 1 for nodes in owners.values())
        assert set().union(*owners.values()) == {0, 1, 2}

        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "embtab.cli", "serve", "--model", name]
            + ["--redis", cluster.url, "--redis-cluster", "--features-redis", "none"]
            + ["--port", str(port), "--workers", str(WORKERS)],
            stdout=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_ready(base, server)
            items = np.arange(0, 400, 7)
            expected = reference_scores(model, 3, items)

            def score(_: int) -> tuple[str, float]:
                # A fresh connection per request, so the kernel hands each to any worker.
                response = httpx.post(f"{base}/score", json=request_body(3, items), timeout=10)
                assert response.status_code == 200, response.text
                error = np.abs(np.array(response.json()["scores"]) - expected).max()
                return response.headers["x-embtab-worker"], float(error)

            workers: set[str] = set()
            deadline = time.monotonic() + READY_S
            with ThreadPoolExecutor(8) as pool:
                # Until every worker has answered: accept is not round-robin, and a worker
                # still importing torch answers nothing yet.
                while len(workers) < WORKERS and time.monotonic() < deadline:
                    answers = list(pool.map(score, range(16)))
                    assert max(error for _, error in answers) < 2e-3
                    workers |= {worker for worker, _ in answers}
            assert len(workers) == WORKERS and str(server.pid) not in workers
        finally:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=10)


def _wait_ready(base: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        assert server.poll() is None, "the service exited before it was ready"
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the service did not become ready within {READY_S} s")


def test_a_cluster_needs_three_masters():
    with pytest.raises(ServiceError, match="at least 3 masters"):
        start_redis_cluster(2)
