"""A bucket's row order (`ordering._bucket_order`) is Arrow's sort by (time, user, item, row)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from feature_store.ordering import _bucket_order


@pytest.mark.parametrize("times", [3, 50, 10_000])
def test_the_order_is_the_sort_by_time_user_item_and_row_whatever_the_ties(times):
    rng = np.random.default_rng(times)
    rows = 20_000
    table = pa.table(
        {
            "__time_key": rng.integers(0, times, rows),
            "user": rng.integers(0, 7, rows),
            "item": rng.integers(-5, 5, rows),
            "__row": np.arange(rows),
        }
    )
    keys = ["__time_key", "user", "item", "__row"]
    expected = pc.sort_indices(table, sort_keys=[(key, "ascending") for key in keys])
    np.testing.assert_array_equal(_bucket_order(table, ["user", "item"]), expected)
    without_ties = pc.sort_indices(
        table, sort_keys=[("__time_key", "ascending"), ("__row", "ascending")]
    )
    np.testing.assert_array_equal(_bucket_order(table, []), without_ties)
