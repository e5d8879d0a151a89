"""HTTP clients that hurt others: connections whose headers never finish, at a descriptor limit.

`embtab serve` runs in its own process with RLIMIT_NOFILE at 256; 300 connections send half a
request's headers and wait. Before the header timeout and connection cap, they held every
descriptor: no client, `/healthz` included, got an answer until they left.
"""

from __future__ import annotations

import socket
import time

import httpx
import numpy as np

from bench.serving import Service
from tests.serving.serving_helpers import publish, request_body, tiny_model, unique_name

SLOW_CONNECTIONS = 300
HEADER_TIMEOUT_S = 2.0


def test_connections_whose_headers_never_finish_lock_no_one_out(redis_service, tmp_path):
    name = unique_name("slow-headers")
    publish(tiny_model("hash"), name, redis_service.redis_url)
    log = tmp_path / "serve.log"
    flags = ("--header-timeout-s", str(HEADER_TIMEOUT_S))
    service = Service(redis_service.redis_url, 16, name, flags, log=log, max_open_files=256)
    slow: list[socket.socket] = []
    try:
        service.wait_ready(timeout_s=90)
        base = f"http://127.0.0.1:{service.port}"
        for _ in range(SLOW_CONNECTIONS):
            connection = socket.create_connection(("127.0.0.1", service.port), timeout=5)
            connection.sendall(b"POST /score HTTP/1.1\r\nhost: 127.0.0.1\r\n")
            slow.append(connection)
        started = time.monotonic()
        while time.monotonic() - started < HEADER_TIMEOUT_S + 1:
            asked = time.monotonic()
            assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
            assert time.monotonic() - asked < 1.0, "/healthz waited on the slow connections"
        body = request_body(1, np.arange(10))
        assert httpx.post(f"{base}/score", json=body, timeout=5).status_code == 200
        for connection in slow:
            connection.settimeout(HEADER_TIMEOUT_S + 5)
            try:
                while connection.recv(4096):  # a refused one gets its 503 first
                    pass
            except ConnectionResetError:
                pass
    finally:
        for connection in slow:
            connection.close()
        service.stop()
    lines = log.read_text(errors="replace").splitlines()
    assert len(lines) < 20, f"{len(lines)} log lines, the first: {lines[:5]}"


def test_every_worker_closes_connections_whose_headers_never_finish(redis_service):
    """`--workers N`: each uvicorn worker runs the same header deadline as one process."""
    name = unique_name("slow-headers-workers")
    publish(tiny_model("hash"), name, redis_service.redis_url)
    flags = ("--header-timeout-s", str(HEADER_TIMEOUT_S), "--workers", "2")
    service = Service(redis_service.redis_url, 16, name, flags)
    slow: list[socket.socket] = []
    try:
        service.wait_ready(timeout_s=120)
        for _ in range(8):
            connection = socket.create_connection(("127.0.0.1", service.port), timeout=5)
            connection.sendall(b"POST /score HTTP/1.1\r\nhost: 127.0.0.1\r\n")
            slow.append(connection)
        started = time.monotonic()
        for connection in slow:
            connection.settimeout(HEADER_TIMEOUT_S + 10)
            try:
                while connection.recv(4096):
                    pass
            except ConnectionResetError:
                pass
        waited = time.monotonic() - started
    finally:
        for connection in slow:
            connection.close()
        service.stop()
    assert waited < HEADER_TIMEOUT_S + 5, f"slow connections held for {waited:.1f} s"
