"""The batch codec: round trips, and a typed error (never anything else) for invalid bytes."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from online_training import messages
from online_training.messages import Batch, MessageError


def _impressions(rows: int = 5) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {
            "request_id": pa.array(np.arange(rows), pa.int64()),
            "event_time": pa.array(np.linspace(100, 200, rows)),
            "produced_at": pa.array(np.full(rows, 1.7e9)),
            "user_id": pa.array(np.arange(rows) % 3, pa.int64()),
            "genres": pa.array([[1, 2]] * rows, pa.list_(pa.int64())),
            "user_activity": pa.array(np.ones(rows, np.float32)),
        }
    )


def _actions(**overrides) -> pa.RecordBatch:
    columns = {
        "request_id": pa.array([1, 2], pa.int64()),
        "user_id": pa.array([3, 4], pa.int64()),
        "item_id": pa.array([5, 6], pa.int64()),
        "click": pa.array([1, 0], pa.int8()),
        "impression_time": pa.array([10.0, 11.0]),
        "event_time": pa.array([12.0, 11.0]),
        "produced_at": pa.array([1.7e9, 1.7e9]),
    }
    columns.update(overrides)
    return pa.RecordBatch.from_pydict(columns)


@pytest.mark.parametrize("compression", [None, "lz4", "zstd"])
def test_a_batch_round_trips_with_its_metadata(compression):
    batch = Batch(messages.FEATURE_LOG, _impressions(), watermark=150.5, dataset="movielens-1m")
    decoded = messages.decode(messages.encode(batch, compression), messages.FEATURE_LOG)
    assert decoded.rows.equals(batch.rows)
    assert decoded.watermark == 150.5 and decoded.dataset == "movielens-1m"
    assert not decoded.end_of_stream
    assert decoded.feature_names == ["user_id", "genres", "user_activity"]


def test_an_end_marker_has_no_rows_and_an_infinite_watermark():
    marker = messages.heartbeat(messages.ACTIONS, 5.0, end_of_stream=True)
    decoded = messages.decode(messages.encode(marker), messages.ACTIONS)
    assert decoded.num_rows == 0 and decoded.end_of_stream and decoded.watermark == math.inf


def test_the_wrong_kind_is_refused():
    data = messages.encode(Batch(messages.FEATURE_LOG, _impressions(), watermark=0))
    with pytest.raises(MessageError) as raised:
        messages.decode(data, messages.ACTIONS)
    assert raised.value.reason == "wrong-kind" and "feature-log" in str(raised.value)


@pytest.mark.parametrize(
    ("rows", "reason", "says"),
    [
        (_impressions().drop_columns(["request_id"]), "missing-column", "request_id"),
        (
            _impressions().set_column(0, "request_id", pa.array(np.arange(5), pa.int32())),
            "wrong-type",
            "int64",
        ),
        (
            _impressions().append_column("name", pa.array(["a"] * 5)),
            "wrong-type",
            "signed integers, floats",
        ),
        (
            _impressions().set_column(3, "user_id", pa.array([1, None, 2, 3, 4], pa.int64())),
            "nulls",
            "user_id",
        ),
        (
            _impressions().set_column(1, "event_time", pa.array([1.0, 2, math.nan, 4, 5])),
            "invalid-value",
            "finite",
        ),
    ],
)
def test_invalid_rows_are_refused_with_a_reason(rows, reason, says):
    with pytest.raises(MessageError) as raised:
        messages.encode(Batch(messages.FEATURE_LOG, rows, watermark=0))
    assert raised.value.reason == reason and says in str(raised.value)


def test_an_action_before_its_impression_or_a_click_of_two_is_refused():
    with pytest.raises(MessageError, match="impression_time"):
        messages.validate(Batch(messages.ACTIONS, _actions(event_time=pa.array([9.0, 11])), 0))
    with pytest.raises(MessageError, match="0 or 1"):
        clicks = pa.array([2, 0], pa.int8())
        messages.validate(Batch(messages.ACTIONS, _actions(click=clicks), 0))


def test_metadata_without_a_watermark_is_refused():
    rows = _impressions().replace_schema_metadata(
        {"embtab.kind": "feature-log", "embtab.version": "1"}
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_batch(rows)
    with pytest.raises(MessageError) as raised:
        messages.decode(sink.getvalue().to_pybytes(), messages.FEATURE_LOG)
    assert raised.value.reason == "metadata" and "watermark" in str(raised.value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes_raise_only_message_errors(data):
    with pytest.raises(MessageError):
        messages.decode(data, messages.FEATURE_LOG)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_damaged_messages_decode_or_raise_a_message_error(data):
    """Flipped bytes and truncations of a real message: never a crash, never another error."""
    encoded = bytearray(messages.encode(Batch(messages.FEATURE_LOG, _impressions(50), 1.0)))
    for _ in range(data.draw(st.integers(1, 8))):
        encoded[data.draw(st.integers(0, len(encoded) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(encoded)))
    try:
        decoded = messages.decode(bytes(encoded[:cut]), messages.FEATURE_LOG)
    except MessageError:
        return
    messages.validate(decoded)
