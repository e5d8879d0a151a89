"""serving.jagged against plain Python lists of rows."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.jagged import Jagged

row_lists = st.lists(st.lists(st.integers(-5, 5), max_size=4), min_size=1, max_size=8)


def jagged(rows: list[list[int]]) -> Jagged:
    values = np.array([v for row in rows for v in row], dtype=np.int64)
    return Jagged(values, np.array([len(row) for row in rows], dtype=np.int64))


def as_rows(column: Jagged) -> list[list[int]]:
    offsets = column.offsets
    return [column.values[offsets[i] : offsets[i + 1]].tolist() for i in range(len(column))]


@settings(max_examples=200, deadline=None)
@given(row_lists, st.data())
def test_take_repeat_and_where_give_the_rows_lists_give(rows, data):
    column = jagged(rows)
    assert as_rows(column) == rows
    picked = data.draw(st.lists(st.integers(0, len(rows) - 1), max_size=10))
    assert as_rows(column.take(np.array(picked, dtype=np.int64))) == [rows[i] for i in picked]
    row = data.draw(st.integers(0, len(rows) - 1))
    times = data.draw(st.integers(0, 6))
    repeated = column.repeat(row, times)
    assert as_rows(repeated) == [rows[row]] * times
    assert repeated.values.dtype == repeated.lengths.dtype == np.int64
    other = data.draw(
        st.lists(st.lists(st.integers(-5, 5), max_size=4), min_size=len(rows), max_size=len(rows))
    )
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=len(rows), max_size=len(rows))))
    expected = [
        mine if keep else theirs for mine, theirs, keep in zip(rows, other, mask, strict=True)
    ]
    assert as_rows(column.where(mask, jagged(other))) == expected
