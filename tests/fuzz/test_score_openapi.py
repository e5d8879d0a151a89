"""`/score` fuzzed from its own OpenAPI schema with schemathesis, against the real service
(uvicorn on loopback, the model in the session's real Redis).

Schemathesis generates bodies that fit the schema and bodies that do not (wrong types, missing
and extra fields, out-of-range values, other media types) for both score routes, and runs its
checks on every answer: never a 5xx, status codes and bodies as documented, invalid input
refused. On top of them, every 4xx must explain itself: a JSON body with a non-empty `error`.
"""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

from serving.app import create_app
from serving.service import ScoringService, ServeConfig, serving_redis
from tests.serving.serving_helpers import publish, tiny_model, unique_name
from tests.serving.test_app import running_service

EXAMPLES = 150  # per route and generation mode (positive, negative): up to 600 requests

MODEL = unique_name("fuzz")
# Reading the schema needs no Redis: the service connects only when it starts.
SCHEMA = create_app(
    ScoringService(ServeConfig(model=MODEL, redis=serving_redis("redis://127.0.0.1:9/0")))
).openapi()
schema = schemathesis.openapi.from_dict(SCHEMA).include(path_regex="score$")
schema.config.generation.update(max_examples=EXAMPLES)


@schema.hook
def flatmap_path_parameters(context, path_parameters):
    """Half the cases of the named route ask for the served model, so they reach scoring too."""
    if not path_parameters:
        return st.just(path_parameters)
    return st.sampled_from([path_parameters, {**path_parameters, "model": MODEL}])


# The schema types the body; whether a feature name or an id is one the model takes cannot be
# said in it, so bodies that fit the schema may still get a 400: that check does not apply.
EXCLUDED = [positive_data_acceptance]
SEEN: Counter[tuple[str, int]] = Counter()  # (route, status) of every fuzzed request


@pytest.fixture(scope="module")
def base_url(redis_service):
    publish(tiny_model("hash"), MODEL, redis_service.redis_url)
    with running_service(redis_service.redis_url, MODEL, max_candidates=300) as client:
        yield str(client.base_url)


@schema.parametrize()
def test_score_fuzzed_from_its_openapi_schema(case, base_url):
    response = case.call_and_validate(base_url=base_url, timeout=10, excluded_checks=EXCLUDED)
    SEEN[case.path, response.status_code] += 1
    assert response.status_code in (200, 400, 404, 405, 413, 415, 422), response.text
    if response.status_code == 200:
        assert len(response.json()["scores"]) == len(case.body["candidates"])
    elif response.status_code != 405:  # a wrong method is FastAPI's own answer
        body = response.json()
        error = body.get("error") or body.get("detail")
        assert error, f"a {response.status_code} that does not say why: {response.text}"


def test_the_fuzz_scored_and_was_refused_in_every_documented_way():
    """The schema states the body, and the fuzz above reached scoring as well as each refusal."""
    assert SCHEMA["paths"]["/score"]["post"]["requestBody"]["required"]
    if not SEEN:
        pytest.skip("run with the fuzz test above")
    statuses = {status for _, status in SEEN}
    assert {200, 400, 404, 422} <= statuses, SEEN
    assert ("/models/{model}/score", 200) in SEEN, SEEN
