"""A body gets the same answer whether it is parsed on the event loop or in the body parser's
worker process (bodies over `offload_body_bytes`): the same scores, or the same status, field
and message. Two services compared, one parsing every body on the loop, one every body in the
worker; and the worker's columns compared with the loop's for raw values through an artifact."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import numpy as np
import pytest

from feature_store.datasets import prepare_from_spec
from serving.errors import RequestError
from serving.parsing import BodyParser, Preparation, prepare_columns
from serving.raw_values import RawValueEncoder
from serving.request import RequestColumns, feature_rules, parse_request
from tests.serving.serving_helpers import ITEMS, publish, unique_name
from tests.serving.test_app import BAD_REQUESTS, good_body, running_service, wait_until
from tests.serving.test_raw_values_skew import write_raw_files

ON_THE_LOOP = {"offload_body_bytes": 2**40}
IN_THE_WORKER = {"offload_body_bytes": 0}


def encoded(body: dict | bytes) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def long_history() -> dict:
    """Valid, and large by itself: 2,000 ids of history that the model cuts to its last 5."""
    body = good_body()
    body["context"]["hist_item_id"] = [int(i) for i in np.arange(2000) * 7 % ITEMS]
    return body


CASES = [(case[0], case[1]) for case in BAD_REQUESTS] + [
    ("valid", good_body()),
    ("long history", long_history()),
]


@pytest.fixture(scope="module")
def served(redis_service, model):
    name = unique_name("bodies")
    publish(model, name, redis_service.redis_url)
    url = redis_service.redis_url
    with (
        running_service(url, name, max_candidates=300, **ON_THE_LOOP) as loop,
        running_service(url, name, max_candidates=300, **IN_THE_WORKER) as worker,
    ):
        for client in (loop, worker):
            assert wait_until(lambda client=client: client.get("/readyz").status_code == 200)
        yield loop, worker


@pytest.fixture(scope="module")
def model():
    from tests.serving.serving_helpers import tiny_model

    return tiny_model("qr")


@pytest.mark.parametrize("body", [case[1] for case in CASES], ids=[case[0] for case in CASES])
def test_a_body_gets_the_same_answer_on_the_loop_and_in_the_worker(served, body):
    loop, worker = served
    on_loop = loop.post("/score", content=encoded(body))
    in_worker = worker.post("/score", content=encoded(body))
    assert in_worker.status_code == on_loop.status_code, (on_loop.text, in_worker.text)
    if on_loop.status_code == 200:
        np.testing.assert_array_equal(in_worker.json()["scores"], on_loop.json()["scores"])
    else:
        assert in_worker.json() == on_loop.json()


def test_without_a_version_the_worker_refuses_bad_bodies_first(redis_service):
    url, name = redis_service.redis_url, unique_name("unpublished")
    with (
        running_service(url, name, **ON_THE_LOOP) as loop,
        running_service(url, name, **IN_THE_WORKER) as worker,
    ):
        for body in (b"[1, 2]", encoded(good_body())):
            on_loop = loop.post("/score", content=body)
            in_worker = worker.post("/score", content=body)
            assert (in_worker.status_code, in_worker.json()) == (
                on_loop.status_code,
                on_loop.json(),
            )
        assert on_loop.status_code == 503 and "no version loaded" in on_loop.json()["error"]


# -- raw values, through a real preprocessing artifact ---------------------------------------


def raw_body(**change) -> dict:
    body = {
        "user_id": "user-3",
        "context": {"hist_item": ["sku:1", "sku:2", "never-seen"] * 700, "user_events": 4},
        "candidates": [
            {"item_id": "sku:5", "features": {"campaign": "c3", "tags": ["a", "b"], "price": 9.5}},
            {"item_id": "new-sku", "features": {"tags": ["zz"] * 50, "price": 1}},
            {"item_id": 3, "features": {"campaign": "c-new"}},
        ],
    }
    body.update(change)
    return body


def with_candidate(index: int, **features) -> dict:
    body = raw_body()
    body["candidates"][index]["features"].update(features)
    return body


RAW_CASES = {
    "valid, long and unseen lists": raw_body(),
    "a number for a string id": with_candidate(0, campaign=2.5),
    "a bool in a list": with_candidate(1, tags=["a", True]),
    "a string for a dense feature": with_candidate(0, price="cheap"),
    "a list for a count": raw_body(context={"user_events": [1]}),
    "an unknown feature": with_candidate(2, colour="red"),
    "a bag for one id": with_candidate(0, campaign=["c1", "c2"]),
    "an id column as a feature": with_candidate(0, item="sku:1"),
    "not JSON": b'{"user_id": "u", "candidates": [',
}


@pytest.fixture(scope="module")
def preparation(tmp_path_factory, monkeypatch_module) -> Preparation:
    directory = tmp_path_factory.mktemp("raw")
    write_raw_files(directory, "csv", "string")
    monkeypatch_module.setenv("EMBTAB_DATA", str(directory / "cache"))
    dataset = prepare_from_spec(directory / "spec.yaml")
    schema = dataset.schema
    user, item = schema.id_columns["user"], schema.id_columns["item"]
    encoder = RawValueEncoder(dataset.preprocessor(), user, item, Counter())
    return Preparation(feature_rules(schema, {}, {}), user, item, encoder)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def on_the_loop(body: bytes, preparation: Preparation) -> RequestColumns | RequestError:
    try:
        return prepare_columns(parse_request(body, 1000), preparation)
    except RequestError as error:
        return error


async def in_the_worker(bodies: list[bytes], preparation: Preparation) -> list:
    parser = BodyParser("m", 1000)
    await parser.start()
    answers: list = []
    try:
        for body in bodies:
            try:
                unknown: Counter[str] = Counter()
                answers.append((await parser.prepare(body, preparation, unknown), unknown))
            except RequestError as error:
                answers.append((error, None))
    finally:
        await parser.stop()
    return answers


def test_raw_values_get_the_same_columns_or_errors_in_the_worker(preparation):
    bodies = [encoded(body) for body in RAW_CASES.values()]
    answers = asyncio.run(in_the_worker(bodies, preparation))
    for name, body, (worker, unknown) in zip(RAW_CASES, bodies, answers, strict=True):
        assert preparation.encoder is not None
        preparation.encoder.unknown.clear()
        loop = on_the_loop(body, preparation)
        assert type(worker) is type(loop), (name, worker, loop)
        if isinstance(loop, RequestError):
            assert (worker.status, worker.field, str(worker)) == (
                loop.status,
                loop.field,
                str(loop),
            ), name
            continue
        assert unknown == preparation.encoder.unknown, name
        assert worker.user_id == loop.user_id and worker.user_known == loop.user_known
        np.testing.assert_array_equal(worker.item_ids, loop.item_ids)
        np.testing.assert_array_equal(worker.known_items(), loop.known_items())
        assert list(worker.sparse) == list(loop.sparse) and list(worker.dense) == list(loop.dense)
        for feature, (jagged, mask) in loop.sparse.items():
            np.testing.assert_array_equal(worker.sparse[feature][0].values, jagged.values)
            np.testing.assert_array_equal(worker.sparse[feature][0].lengths, jagged.lengths)
            np.testing.assert_array_equal(worker.sparse[feature][1], mask)
        for feature, (values, mask) in loop.dense.items():
            np.testing.assert_array_equal(worker.dense[feature][0], values)
            np.testing.assert_array_equal(worker.dense[feature][1], mask)
    refused = [
        name
        for name, (answer, _) in zip(RAW_CASES, answers, strict=True)
        if isinstance(answer, Exception)
    ]
    assert refused == list(RAW_CASES)[1:], refused  # every bad case is bad, the valid one valid
