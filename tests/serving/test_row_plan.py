"""serving.row_plan's helpers against numpy."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.row_plan import distinct_sorted


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(0, 20), max_size=60))
def test_distinct_sorted_is_numpys_unique(ids):
    array = np.array(ids, dtype=np.int64)
    got = distinct_sorted(array)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, np.unique(array))
