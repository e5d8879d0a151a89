"""The HTTP contract of the real service (uvicorn on loopback, real Redis): scores, every bad
input's status and message, health, readiness, version, metrics, micro-batching, Redis down."""

from __future__ import annotations

import contextlib
import gc
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embtab.services import free_port, start_redis
from serving.app import uvicorn_server
from serving.service import ScoringService, ServeConfig, serving_redis
from tests.serving.serving_helpers import (
    ITEMS,
    publish,
    reference_scores,
    request_body,
    tiny_model,
    unique_name,
)

ITEMS_A = np.arange(0, ITEMS, 8)


@contextlib.contextmanager
def running_service(redis_url: str, model: str, **options) -> Iterator[httpx.Client]:
    """The service on a free loopback port, in a thread; a client for it."""
    config = ServeConfig(
        model=model,
        redis=serving_redis(redis_url),
        features_redis="",
        port=free_port(),
        poll_s=0.1,
        **options,
    )
    server = uvicorn_server(ScoringService(config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    client = httpx.Client(base_url=f"http://127.0.0.1:{config.port}", timeout=10)
    try:
        yield client
    finally:
        client.close()
        server.should_exit = True
        thread.join(timeout=10)


def wait_until(check, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def model():
    return tiny_model("qr")


@pytest.fixture(scope="module")
def served(redis_service, model):
    name = unique_name("http")
    publish(model, name, redis_service.redis_url)
    with running_service(redis_service.redis_url, name, max_candidates=300) as client:
        assert wait_until(lambda: client.get("/readyz").status_code == 200)
        yield name, client


def test_scores_come_back_in_candidate_order_with_the_version(served, model):
    name, client = served
    response = client.post("/score", json=request_body(7, ITEMS_A))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["version"], body["delta"], body["degraded"]) == (name, 1, 0, False)
    np.testing.assert_allclose(body["scores"], reference_scores(model, 7, ITEMS_A), atol=1e-6)
    reversed_body = client.post(f"/models/{name}/score", json=request_body(7, ITEMS_A[::-1]))
    np.testing.assert_allclose(reversed_body.json()["scores"], body["scores"][::-1], atol=1e-6)


def good_body() -> dict:
    return request_body(3, np.array([1, 2, 3]))


def with_change(change) -> dict:
    body = good_body()
    change(body)
    return body


BAD_REQUESTS = [
    ("malformed JSON", b'{"user_id": 3, "candidates": [', 400, "body", "not valid JSON"),
    ("not an object", b"[1, 2]", 422, "body", "JSON object"),
    ("missing user_id", with_change(lambda b: b.pop("user_id")), 422, "user_id", "required"),
    ("missing candidates", with_change(lambda b: b.pop("candidates")), 422, "candidates", ""),
    ("no candidates", with_change(lambda b: b.update(candidates=[])), 422, "candidates", ""),
    (
        "item_id as text",
        with_change(lambda b: b["candidates"][1].update(item_id="7")),
        422,
        "candidates[1].item_id",
        "integer",
    ),
    ("user_id a bool", with_change(lambda b: b.update(user_id=True)), 422, "user_id", "integer"),
    (
        "unknown top-level field",
        with_change(lambda b: b.update(colour="red")),
        422,
        "colour",
        "not permitted",
    ),
    (
        "unknown feature",
        with_change(lambda b: b["candidates"][2]["features"].update(colour=1)),
        400,
        "candidates[2].features.colour",
        "not a feature",
    ),
    (
        "unknown feature value",
        with_change(lambda b: b["candidates"][0]["features"].update(release_year=999)),
        400,
        "candidates[0].features.release_year",
        "[0, 20)",
    ),
    (
        "unknown item",
        with_change(lambda b: b["candidates"][0].update(item_id=ITEMS + 5)),
        400,
        "candidates[0].item_id",
        f"[0, {ITEMS})",
    ),
    (
        "unknown user",
        with_change(lambda b: b.update(user_id=-1)),
        400,
        "user_id",
        "unknown to feature 'user_id'",
    ),
    (
        "a number for an id",
        with_change(lambda b: b["context"].update(age=2.5)),
        400,
        "context.age",
        "integer ids",
    ),
    (
        "a list for a dense feature",
        with_change(lambda b: b["context"].update(user_activity=[1])),
        422,
        "context.user_activity",
        "one number",
    ),
    (
        "too many ids in a bag",
        with_change(lambda b: b["candidates"][1]["features"].update(genres=[1, 2, 3, 4])),
        400,
        "candidates[1].features.genres",
        "at most 3",
    ),
    (
        "an id beyond int64",
        with_change(lambda b: b["context"].update(hist_item_id=[2**70])),
        400,
        "context.hist_item_id",
        "int64",
    ),
    (
        "an id column as a feature",
        with_change(lambda b: b["context"].update(item_id=3)),
        400,
        "context.item_id",
        "user_id / item_id",
    ),
    (
        "too many candidates",
        request_body(3, np.arange(301) % ITEMS),
        413,
        "candidates",
        "at most 300",
    ),
    ("another model", with_change(lambda b: b.update(model="other")), 404, "model", "other"),
]


@pytest.mark.parametrize(
    ("body", "status", "field", "message"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests_get_their_status_and_name_the_field(served, body, status, field, message):
    _, client = served
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post("/score", content=content)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["field"] == field and message in error["error"], error


def test_unknown_model_in_the_path_is_a_404_and_oversized_bodies_a_413(served):
    _, client = served
    response = client.post("/models/nope/score", json=good_body())
    assert response.status_code == 404 and "nope" in response.json()["error"]
    huge = b'{"user_id": 1, "candidates": [' + b" " * (9 * 2**20) + b"]}"
    assert client.post("/score", content=huge).status_code == 413


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "user_id": json_values,
            "context": json_values,
            "candidates": st.lists(
                st.fixed_dictionaries(
                    {}, optional={"item_id": json_values, "features": json_values}
                ),
                max_size=3,
            )
            | json_values,
            "model": json_values,
        },
    )
)
@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_arbitrary_request_bodies_never_get_a_5xx(served, body):
    _, client = served
    response = client.post("/score", content=json.dumps(body).encode())
    assert response.status_code in (200, 400, 404, 413, 422), response.text
    if response.status_code != 200:
        assert response.json()["error"]


def test_health_readiness_version_and_metrics(served):
    name, client = served
    client.post("/score", json=good_body())
    assert gc.get_freeze_count() > 0, "long-lived objects were left to the cyclic collector"
    health = client.get("/healthz").json()
    assert (health["status"], health["ready"], health["version"]) == ("ok", True, 1)
    assert client.get("/readyz").json() == {"ready": True, "model": name, "version": 1}
    version = client.get("/version").json()
    assert version["version"] == 1 and version["encoding"] == "fp32" and version["tables"]
    metrics = client.get("/metrics").text
    for family in (
        "embtab_score_latency_seconds_bucket",
        "embtab_cache_hit_rate",
        "embtab_redis_errors_total",
        f'embtab_model_version{{model="{name}"}} 1.0',
        'embtab_score_requests_total{status="200"}',
        "embtab_score_batch_requests_count",
    ):
        assert family in metrics, family


def test_concurrent_requests_are_micro_batched(served):
    _, client = served

    def one(user: int) -> list[float]:
        return client.post("/score", json=request_body(user, ITEMS_A)).json()["scores"]

    before = batch_count(client)
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(one, range(32)))
    batches = batch_count(client) - before
    assert all(len(scores) == len(ITEMS_A) for scores in results)
    assert batches < 32, "no two concurrent requests were scored together"


def batch_count(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("embtab_score_batch_requests_count"):
            return float(line.split()[-1])
    raise AssertionError("no batch histogram")


def test_a_model_not_yet_published_is_not_ready_until_it_is(redis_service, model):
    name = unique_name("late")
    with running_service(redis_service.redis_url, name) as client:
        assert client.get("/readyz").status_code == 503
        response = client.post("/score", json=good_body())
        assert response.status_code == 503 and "no version loaded" in response.json()["error"]
        publish(model, name, redis_service.redis_url)
        assert wait_until(lambda: client.get("/readyz").status_code == 200)
        assert client.post("/score", json=good_body()).status_code == 200


def test_redis_down_degrades_and_recovery_is_automatic():
    server = start_redis()
    try:
        url = f"redis://127.0.0.1:{server.port}/0"
        model = tiny_model("hash")
        name = unique_name("down")
        publish(model, name, url)
        with running_service(url, name) as client:
            assert wait_until(lambda: client.get("/readyz").status_code == 200)
            warm = client.post("/score", json=request_body(7, ITEMS_A)).json()
            server.pause()
            assert wait_until(lambda: client.get("/healthz").json()["status"] == "degraded")
            started = time.monotonic()
            down = client.post("/score", json=request_body(7, ITEMS_A)).json()
            cold = client.post("/score", json=request_body(7, ITEMS_A + 1))
            assert time.monotonic() - started < 1.0
            assert down["degraded"] and down["scores"] == warm["scores"]
            assert cold.status_code == 200 and cold.json()["degraded"]
            server.resume()
            assert wait_until(lambda: client.get("/healthz").json()["status"] == "ok")
            publish(tiny_model("hash", seed=3), name, url)
            assert wait_until(lambda: client.get("/version").json()["version"] == 2)
            fresh = client.post("/score", json=request_body(7, ITEMS_A)).json()
            assert not fresh["degraded"] and fresh["version"] == 2
    finally:
        server.stop()
