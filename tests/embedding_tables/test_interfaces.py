"""Every lookup backend and both collections implement the one lookup interface."""

from __future__ import annotations

import pytest

from embedding_tables import EmbeddingCollection, SparseOptimizerConfig, TableConfig
from embedding_tables.interfaces import EmbeddingLookup, TableGroupLookup
from embedding_tables.lookup import TableBatchedLookup
from embedding_tables.sharding import ShardableEmbeddingCollection
from embedding_tables.torch_lookup import TorchLookup

TABLES = [TableConfig("u", 100, 8, "hash", budget=0.5), TableConfig("q", 300, 8, "qr")]
FEATURES = {"a": "u", "b": "q"}


@pytest.mark.parametrize(
    ("backend", "optimizer", "expected"),
    [
        ("auto", SparseOptimizerConfig(), TableBatchedLookup),
        ("torch", SparseOptimizerConfig(), TorchLookup),
        ("auto", None, TorchLookup),
    ],
)
def test_every_lookup_group_of_a_collection_is_a_table_group_lookup(
    monkeypatch, backend, optimizer, expected
) -> None:
    monkeypatch.setenv("EMBTAB_LOOKUP", backend)
    collection = EmbeddingCollection(TABLES, FEATURES, optimizer)
    assert isinstance(collection, EmbeddingLookup)
    assert collection.tables.lookups
    for group in collection.tables.lookups:
        assert isinstance(group, expected) and isinstance(group, TableGroupLookup)
        before = group.take_touched_rows(0)
        assert before.numel() == 0


def test_the_sharded_collection_offers_the_collections_interface() -> None:
    sharded = ShardableEmbeddingCollection(TABLES, FEATURES)
    assert isinstance(sharded, EmbeddingLookup)
    assert sharded.take_touched_rows() == {}
