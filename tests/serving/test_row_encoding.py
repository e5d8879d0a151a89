"""Row encodings: fp32 exact, fp16 within half precision, int8 and int4 within their per-row
bounds, int4's nibbles in their documented order."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from serving.errors import EncodingError
from serving.row_encoding import (
    decode_ids,
    decode_rows,
    decode_values,
    encode_ids,
    encode_rows,
    quantised_error_bound,
    row_bytes,
)

finite_rows = arrays(
    np.float32,
    st.tuples(st.integers(1, 20), st.integers(1, 33)),
    elements=st.floats(-1e3, 1e3, width=32),
)


@pytest.mark.parametrize("encoding", ["int8", "int4"])
@given(rows=finite_rows)
@settings(max_examples=60, deadline=None)
def test_quantised_error_stays_within_half_a_step_per_row(encoding, rows):
    decoded = decode_rows(encode_rows(rows, encoding), encoding, rows.shape[1])
    error = np.abs(decoded - rows).max(axis=1)
    assert (error <= quantised_error_bound(rows, encoding)).all()


def test_int4_codes_are_nibbles_low_first_after_scale_and_bias():
    rows = np.array([[0.0, 15.0, 3.0, 7.0, 1.0]], np.float32)  # scale 1, bias 0
    encoded = encode_rows(rows, "int4")
    assert encoded.shape == (1, 8 + 3)
    assert encoded[0, :8].view("<f4").tolist() == [1.0, 0.0]
    assert encoded[0, 8:].tolist() == [0xF0, 0x73, 0x01]
    assert np.array_equal(decode_rows(encoded, "int4", 5), rows)


@given(finite_rows)
@settings(max_examples=30, deadline=None)
def test_fp32_is_exact_and_fp16_is_half_precision(rows):
    dim = rows.shape[1]
    assert np.array_equal(decode_rows(encode_rows(rows, "fp32"), "fp32", dim), rows)
    half = decode_rows(encode_rows(rows, "fp16"), "fp16", dim)
    assert np.array_equal(half, rows.astype(np.float16).astype(np.float32))


def test_encoded_sizes():
    assert [row_bytes(e, 16) for e in ("fp32", "fp16", "int8", "int4")] == [64, 32, 24, 16]
    assert row_bytes("int4", 5) == 11
    rows = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    assert encode_rows(rows, "int8").shape == (5, 24)


@pytest.mark.parametrize("encoding", ["int8", "int4"])
def test_constant_rows_encode_exactly(encoding):
    rows = np.full((3, 8), 0.5, np.float32)
    assert np.array_equal(decode_rows(encode_rows(rows, encoding), encoding, 8), rows)


def test_ids_are_8_byte_little_endian_fields():
    ids = np.array([0, 1, 2**40, -5], dtype=np.int64)
    fields = encode_ids(ids)
    assert fields[1] == (1).to_bytes(8, "little")
    assert np.array_equal(decode_ids(fields), ids)


def test_absent_values_decode_as_zeros_not_found():
    rows = np.arange(8, dtype=np.float32).reshape(2, 4)
    encoded = [line.tobytes() for line in encode_rows(rows, "fp32")]
    values, found = decode_values([encoded[0], None, encoded[1]], "fp32", 4)
    assert found.tolist() == [True, False, True]
    assert np.array_equal(values[[0, 2]], rows) and not values[1].any()


@pytest.mark.parametrize(
    ("rows", "encoding", "message"),
    [
        (np.array([[np.nan, 1.0]], np.float32), "fp32", "NaN or inf"),
        (np.array([[1e6, 1.0]], np.float32), "fp16", "fp16's range"),
        (np.zeros((2, 2), np.float32), "bf16", "accepted: fp32, fp16, int8, int4"),
    ],
)
def test_unencodable_rows_are_refused_with_the_reason(rows, encoding, message):
    with pytest.raises(EncodingError, match=message):
        encode_rows(rows, encoding)


def test_stored_rows_of_the_wrong_width_are_reported():
    with pytest.raises(EncodingError, match="manifest and the rows disagree"):
        decode_values([b"\x00" * 12], "fp32", 4)
