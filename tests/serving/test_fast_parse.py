"""The fast parse of `POST /score` bodies (`serving.request.parse_request`) against the schema's
own validation (`validate_request`, ScoreRequest): on many generated bodies, valid and not, the
same values (types included: 1, 1.0 and true are told apart) or the same error (class, status,
field and message)."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.errors import RequestError
from serving.request import _FAST_BODY, RequestValues, parse_request, validate_request

MAX_CANDIDATES = 6

ids = st.one_of(
    st.integers(-(2**70), 2**70),
    st.text(max_size=4),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.none(),
)
values = st.one_of(
    ids,
    st.lists(ids, max_size=4),
    st.floats(allow_nan=False),
    st.dictionaries(st.text(max_size=2), ids, max_size=2),
)
feature_maps = st.dictionaries(
    st.sampled_from(["age", "genres", "user_activity", "x"]), values, max_size=3
)
candidates = st.fixed_dictionaries(
    {"item_id": ids},
    optional={"features": st.one_of(feature_maps, values), "extra": ids},
)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.none(), st.text(max_size=3), st.integers()),
        "user_id": ids,
        "context": st.one_of(feature_maps, values),
        "candidates": st.one_of(st.lists(candidates, max_size=MAX_CANDIDATES + 2), values),
        "unknown": values,
    },
)
well_typed_ids = st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=4))
well_typed_values = st.one_of(
    well_typed_ids, st.lists(well_typed_ids, max_size=3), st.floats(allow_nan=False)
)
valid_bodies = st.fixed_dictionaries(
    {
        "user_id": well_typed_ids,
        "candidates": st.lists(
            st.fixed_dictionaries(
                {"item_id": well_typed_ids},
                optional={"features": st.dictionaries(st.text(max_size=3), well_typed_values)},
            ),
            min_size=1,
            max_size=MAX_CANDIDATES,
        ),
    },
    optional={
        "model": st.one_of(st.none(), st.text(max_size=3)),
        "context": st.dictionaries(st.text(max_size=3), well_typed_values, max_size=3),
    },
)


@st.composite
def one_value_wrong(draw) -> dict:
    """A valid body with one place changed to any value (often of a wrong type): an id, a
    feature value, a map of features, a key removed or one added."""
    body = draw(valid_bodies)
    where = draw(st.sampled_from(["user_id", "item_id", "feature", "context", "drop", "add"]))
    anything = draw(values)
    candidate = draw(st.sampled_from(body["candidates"]))
    if where in ("user_id", "context"):
        body[where] = anything if where == "user_id" else {"age": anything}
    elif where == "item_id":
        candidate["item_id"] = anything
    elif where == "feature":
        candidate["features"] = draw(st.one_of(values, st.just({"genres": anything})))
    elif where == "drop":
        target = draw(st.sampled_from([body, candidate]))
        target.pop(draw(st.sampled_from(sorted(target))))
    else:
        draw(st.sampled_from([body, candidate]))[draw(st.text(max_size=3))] = anything
    return body


def outcome(parse, body: bytes) -> tuple:
    """What a parse gives: the values, typed (repr), or the error."""
    try:
        return ("values", repr(parse(body)))
    except RequestError as error:
        return ("error", type(error).__name__, error.status, error.field, str(error))


def reference(body: bytes) -> RequestValues:
    return RequestValues.of(validate_request(body))


def assert_alike(body: bytes) -> None:
    expected = outcome(reference, body)
    got = outcome(lambda raw: parse_request(raw, MAX_CANDIDATES), body)
    if expected[0] == "values" and len(json.loads(body)["candidates"]) > MAX_CANDIDATES:
        assert got[:4] == ("error", "TooManyCandidatesError", 413, "candidates")
    else:
        assert got == expected


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_generated_bodies_parse_as_the_schema_parses_them(body):
    assert_alike(json.dumps(body).encode())


@settings(max_examples=600, deadline=None)
@given(one_value_wrong())
def test_bodies_with_one_value_wrong_parse_as_the_schema_parses_them(body):
    assert_alike(json.dumps(body).encode())


@settings(max_examples=300, deadline=None)
@given(valid_bodies)
def test_valid_bodies_take_the_fast_path_and_give_the_schemas_values(body):
    raw = json.dumps(body).encode()
    _FAST_BODY.validate_json(raw)  # the fast path accepts it: no fallback to the schema
    assert outcome(lambda b: parse_request(b, MAX_CANDIDATES), raw) == outcome(reference, raw)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40) | st.text(max_size=40).map(str.encode))
def test_bytes_that_are_not_a_body_get_the_schemas_error(raw):
    assert_alike(raw)


def test_a_body_the_fast_path_refuses_gets_the_schemas_values_or_error():
    too_many = [{"item_id": i} for i in range(MAX_CANDIDATES + 1)]
    parse = lambda raw: parse_request(raw, MAX_CANDIDATES)  # noqa: E731
    body = json.dumps({"user_id": 1, "candidates": too_many}).encode()
    assert outcome(parse, body)[:4] == ("error", "TooManyCandidatesError", 413, "candidates")
    body = json.dumps({"user_id": True, "candidates": too_many}).encode()
    assert outcome(parse, body)[:4] == ("error", "RequestShapeError", 422, "user_id")


def test_a_body_naming_the_user_and_item_by_their_columns_is_told_where_they_go():
    # A data set whose user column is `customer` and item column `sku`: the body still says
    # user_id / item_id, and a body that uses the column names is told so.
    body = json.dumps({"customer": "c-1", "candidates": [{"item_id": "sku-1"}]}).encode()
    kind, name, status, field, message = outcome(
        lambda raw: parse_request(raw, MAX_CANDIDATES), body
    )[:5]
    assert (kind, name, status, field) == ("error", "RequestShapeError", 422, "user_id")
    assert "the user's id goes in 'user_id', whatever the data set's column is called" in message
    body = json.dumps({"user_id": "c-1", "candidates": [{"sku": "sku-1"}]}).encode()
    kind, _, status, field, message = outcome(validate_request, body)[:5]
    assert (kind, status, field) == ("error", 422, "candidates[0].item_id")
    assert "each candidate's item id goes in 'item_id'" in message
