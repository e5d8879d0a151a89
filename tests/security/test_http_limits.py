"""The scoring service's limits on what one request may cost: body size (also when it streams in
without a Content-Length), candidate count and time, each configurable (ServeConfig and `embtab
serve` flags) and each answered with its status and a message that names the limit."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import numpy as np
import pytest

from embtab.cli import main
from serving.errors import ServingError
from serving.service import ServeConfig, serving_redis
from tests.serving.serving_helpers import publish, request_body, tiny_model, unique_name
from tests.serving.test_app import running_service


@pytest.fixture(scope="module")
def published(redis_service) -> tuple[str, str]:
    name = unique_name("limits")
    publish(tiny_model("hash"), name, redis_service.redis_url)
    return redis_service.redis_url, name


def _wait_ready(client) -> None:
    deadline = time.monotonic() + 10
    while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)


def test_body_size_candidate_count_and_time_are_limited(published):
    url, name = published
    limits = {"max_body_bytes": 20_000, "max_candidates": 50, "request_timeout_s": 0.5}
    with running_service(url, name, **limits) as client:
        _wait_ready(client)
        assert client.post("/score", json=request_body(1, np.arange(50))).status_code == 200

        too_many = client.post("/score", json=request_body(1, np.arange(51)))
        assert too_many.status_code == 413
        assert too_many.json() == {
            "error": "candidates: 51 candidates; at most 50 per request",
            "field": "candidates",
        }

        big = json.dumps(request_body(1, np.arange(400))).encode()
        assert len(big) > 20_000
        declared = client.post("/score", content=big)
        assert declared.status_code == 413 and "at most 20000" in declared.json()["error"]

        def streamed(chunks: int, pause_s: float = 0.0) -> Iterator[bytes]:
            """A chunked upload: no Content-Length, so the size is known only as it arrives."""
            for start in range(0, min(len(big), chunks * 4096), 4096):
                time.sleep(pause_s)
                yield big[start : start + 4096]

        chunked = client.post("/score", content=streamed(chunks=100))
        assert chunked.status_code == 413, chunked.text
        assert (
            chunked.json()["error"]
            == "body: more than 20000 bytes; a request may carry at most 20000"
        )

        started = time.monotonic()
        slow = client.post("/score", content=streamed(chunks=4, pause_s=0.3))
        assert slow.status_code == 503, slow.text
        assert "not answered within 0.5 s" in slow.json()["error"]
        assert time.monotonic() - started < 1.5
        assert client.post("/score", json=request_body(1, np.arange(5))).status_code == 200


@pytest.mark.parametrize(
    "limits",
    [
        {"request_timeout_s": 0},
        {"max_candidates": 0},
        {"max_body_bytes": 0},
        {"header_timeout_s": 0},
        {"max_connections": 0},
    ],
)
def test_limits_that_cannot_work_are_refused(limits):
    with pytest.raises(ServingError, match="must be > 0|>= 1"):
        ServeConfig(model="m", redis=serving_redis("redis://127.0.0.1:1/0"), **limits)


def test_serve_flags_set_the_limits(monkeypatch, capsys):
    seen: list[ServeConfig] = []
    monkeypatch.setattr("serving.app.serve", seen.append)
    flags = ["--max-candidates", "7", "--max-body-mb", "0.5", "--request-timeout-s", "1.5"]
    flags += ["--header-timeout-s", "3", "--max-connections", "50"]
    assert main(["serve", "--model", "m", "--redis", "redis://127.0.0.1:1/0", *flags]) == 0
    (config,) = seen
    assert (config.header_timeout_s, config.max_connections) == (3.0, 50)
    assert (config.max_candidates, config.max_body_bytes, config.request_timeout_s) == (
        7,
        2**19,
        1.5,
    )
    assert "serving m" in capsys.readouterr().out
