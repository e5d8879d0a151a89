"""Vocabulary lookups give the same ids whichever path serves them: a request's few strings
(hashed in Python, remembered), up to a thousand (hashed in numpy, remembered) or a batch's many
(once per distinct value)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from feature_store.artifact import Vocabulary, string_hash64

WORDS = st.text(min_size=0, max_size=12)


def reference_ids(vocabulary: list[str], values: list[str | None]) -> tuple[list[int], list[bool]]:
    position = {value: index for index, value in enumerate(vocabulary)}
    ids = [position.get(value, len(vocabulary)) if value is not None else len(vocabulary)
           for value in values]  # fmt: skip
    return ids, [value in position for value in values]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(WORDS, min_size=1, max_size=40, unique=True),
    st.lists(st.one_of(WORDS, st.none()), min_size=1, max_size=30),
    st.sampled_from([1, 20, 1500]),
)
def test_every_lookup_path_gives_the_reference_ids(vocabulary, asked, repeat):
    values = sorted(vocabulary)
    table = Vocabulary(pa.array(values, pa.string()), oov=True, seed=12345)
    asked = (asked * repeat)[: max(len(asked), repeat)]
    for _ in range(2):  # the second time from the memo
        ids, known = table.lookup(pa.array(asked, pa.string()))
        expected_ids, expected_known = reference_ids(values, asked)
        assert ids.tolist() == expected_ids
        assert known.tolist() == expected_known


@settings(max_examples=40, deadline=None)
@given(st.lists(WORDS, min_size=1, max_size=20), st.integers(0, 2**64 - 1))
def test_the_python_hash_of_few_strings_is_the_numpy_hash(strings, seed):
    table = Vocabulary(pa.array(["x"], pa.string()), oov=True, seed=seed)
    few = table._keys(pa.array(strings, pa.string()))
    assert np.array_equal(few, string_hash64(pa.array(strings, pa.string()), seed))
