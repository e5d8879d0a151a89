"""KJTs checked once where they enter: what check_kjt refuses, and that forwards trust it."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import embedding_tables.collection as collection_module
from embedding_tables import EmbeddingCollection, SparseOptimizerConfig
from embedding_tables.checked import CheckedKJT, check_kjt
from embedding_tables.errors import IdError, OffsetsError
from tests.embedding_tables.helpers import method_case, random_kjt


def kjt(values, lengths, weights=None) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(
        keys=["a", "b"],
        values=torch.tensor(values),
        lengths=torch.tensor(lengths),
        weights=None if weights is None else torch.tensor(weights),
    )


def test_check_kjt_marks_the_same_tensors_and_caches_counts() -> None:
    given = kjt([1, 2, 3], [2, 0, 1, 0], weights=[1.0, 2.0, 3.0])
    checked = check_kjt(given)
    assert isinstance(checked, CheckedKJT)
    assert checked.values() is given.values() and checked.lengths() is given.lengths()
    assert checked.weights() is given.weights()
    assert checked.length_per_key() == [2, 1]
    assert check_kjt(checked) is checked
    moved = checked.to(torch.device("cpu"))
    assert isinstance(moved, CheckedKJT) and moved.length_per_key() == [2, 1]


@pytest.mark.parametrize(
    ("values", "lengths", "weights", "error", "message"),
    [
        ([1, 2, 3], [2, -1, 1, 1], None, OffsetsError, "lengths must be >= 0, got -1"),
        ([1, 2, 3], [2, 0, 1, 1], None, OffsetsError, "add up to 4 ids but there are 3"),
        ([1, 2, 3], [2, 0, 1], None, OffsetsError, "3 lengths for 2 features x batch 1"),
        ([1, 2], [1, 0, 1, 0], [1.0], OffsetsError, "1 weights for 2 ids"),
        ([1.0, 2.0], [1, 0, 1, 0], None, IdError, "ids must be integers"),
    ],
)
def test_check_kjt_refuses_bad_layouts(values, lengths, weights, error, message) -> None:
    given = KeyedJaggedTensor(
        keys=["a", "b"],
        values=torch.tensor(values),
        lengths=torch.tensor(lengths),
        weights=None if weights is None else torch.tensor(weights),
        stride=2 if len(lengths) != 3 else 1,
    )
    with pytest.raises(error, match=message):
        check_kjt(given)


@pytest.mark.parametrize("grad", [False, True])
def test_forward_of_a_checked_kjt_skips_the_layout_check(
    grad: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    tables, feature_to_table = method_case("mixed")
    ec = EmbeddingCollection(
        tables, feature_to_table, optimizer=SparseOptimizerConfig("rowwise_adagrad", lr=0.1)
    )
    given = random_kjt(tables, feature_to_table, batch=6)
    checked = check_kjt(given)
    with torch.set_grad_enabled(grad):
        expected = ec(given).values()

    def refuse(*args: object) -> None:
        raise AssertionError("the layout was checked again")

    monkeypatch.setattr(collection_module, "check_layout", refuse)
    with torch.set_grad_enabled(grad):
        assert torch.equal(ec(checked).values(), expected)
        assert set(ec.sequence(checked)) == set(feature_to_table)
        with pytest.raises(AssertionError, match="checked again"):
            ec(given)
