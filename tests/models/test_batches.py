"""Columns -> KJT + dense + labels, from Arrow and from numpy, and the prefetching loader."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from embedding_tables.checked import CheckedKJT
from models.batches import BatchLoader, batch_from_columns, empty_batch, prefetched
from models.errors import BatchError


def test_arrow_and_numpy_columns_give_the_same_batch(tiny_dataset):
    schema = tiny_dataset.schema
    record = tiny_dataset.read("train").slice(0, 50)
    from_arrow = batch_from_columns(record, schema)
    genres, history = record.column("genres").combine_chunks(), record.column("hist_item_id")
    history = history.combine_chunks()
    columns = {
        name: record.column(name).to_numpy()
        for name in record.column_names
        if name not in ("genres", "hist_item_id")
    }
    columns["genres"] = (genres.flatten().to_numpy(), np.diff(genres.offsets.to_numpy()))
    columns["hist_item_id"] = (history.flatten().to_numpy(), np.diff(history.offsets.to_numpy()))
    from_numpy = batch_from_columns(columns, schema)

    keys = from_arrow.sparse.keys()
    assert keys == ["user_id", "item_id", "age", "genres", "hist_item_id"]
    for key in keys:
        assert torch.equal(from_arrow.sparse[key].values(), from_numpy.sparse[key].values())
        assert torch.equal(from_arrow.sparse[key].lengths(), from_numpy.sparse[key].lengths())
    assert torch.equal(from_arrow.dense, from_numpy.dense)
    assert torch.equal(from_arrow.labels, from_numpy.labels)
    assert from_arrow.dense.shape == (50, 2) and from_arrow.dense.dtype == torch.float32
    assert torch.equal(
        from_arrow.sparse["genres"].lengths(),
        torch.from_numpy(np.diff(genres.offsets.to_numpy()).astype(np.int32)),
    )


def test_batches_carry_kjts_checked_where_they_are_built(tiny_dataset):
    """The KJT is checked once here, so that model forwards skip the check (and its sync)."""
    batch = batch_from_columns(tiny_dataset.read("train").slice(0, 20), tiny_dataset.schema)
    assert isinstance(batch.sparse, CheckedKJT)
    keys = batch.sparse.keys()
    counts = [batch.sparse[key].values().numel() for key in keys]
    assert batch.sparse.length_per_key() == counts
    assert isinstance(batch.to("cpu").sparse, CheckedKJT)
    assert isinstance(empty_batch(tiny_dataset.schema).sparse, CheckedKJT)


def test_serving_batches_need_no_label(tiny_dataset):
    record = tiny_dataset.read("test").drop_columns(["label"]).slice(0, 8)
    batch = batch_from_columns(record, tiny_dataset.schema, with_labels=False)
    assert batch.labels is None and batch.size == 8


def test_bad_columns_are_typed_errors_that_say_what_is_accepted(tiny_dataset):
    schema = tiny_dataset.schema
    record = tiny_dataset.read("train").slice(0, 4)
    with pytest.raises(BatchError, match="no column 'age'.*needs: user_id"):
        batch_from_columns(record.drop_columns(["age"]), schema)
    floats = record.set_column(0, "user_id", pa.array([0.5, 1.0, 2.0, 3.0]))
    with pytest.raises(BatchError, match="ids must be integers"):
        batch_from_columns(floats, schema)


def test_loader_shuffles_by_seed_and_covers_every_row(tiny_dataset):
    def labels_in_order(seed):
        loader = BatchLoader(
            tiny_dataset, "train", tiny_dataset.schema, 256, shuffle=True, seed=seed
        )
        return torch.cat([batch.sparse["user_id"].values() for batch in loader])

    first, again, other = labels_in_order(1), labels_in_order(1), labels_in_order(2)
    assert torch.equal(first, again) and not torch.equal(first, other)
    in_order = BatchLoader(tiny_dataset, "train", tiny_dataset.schema, 256)
    streamed = torch.cat([batch.sparse["user_id"].values() for batch in in_order])
    assert torch.equal(torch.sort(first).values, torch.sort(streamed).values)
    assert len(in_order) == -(-len(streamed) // 256)


def test_prefetch_reraises_the_producer_error():
    def source():
        yield 1
        raise RuntimeError("disk gone")

    items = prefetched(source(), depth=2)
    assert next(items) == 1
    with pytest.raises(RuntimeError, match="disk gone"):
        next(items)
