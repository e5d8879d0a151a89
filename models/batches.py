"""Columns -> (KeyedJaggedTensor, dense tensor, labels), and a prefetching Parquet batch loader.

`batch_from_columns` is the one conversion used by the batch trainer, the streaming trainer and
the scorer: it takes a pyarrow RecordBatch / Table or a dict of numpy columns and is vectorised
per column (no per-row Python). The KJT carries the schema's categorical and sequence features
in schema order; the dense tensor its dense features in schema order. The KJT is checked here,
once (`embedding_tables.checked.CheckedKJT`), so that model forwards need not check it again.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embedding_tables.checked import check_kjt
from feature_store.offline import Dataset
from feature_store.schema import FeatureSpec, Schema
from models.errors import BatchError

Columns = pa.RecordBatch | pa.Table | Mapping[str, Any]


@dataclass
class Batch:
    """One mini-batch: ids as a KJT, dense features [B, n_dense] float32, labels [B] (or None),
    and the event time of its newest row when the rows carried the schema's time column."""

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    labels: torch.Tensor | None
    newest_event_time: float | None = None

    @property
    def size(self) -> int:
        return self.dense.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            sparse=self.sparse.to(device),
            dense=self.dense.to(device),
            labels=None if self.labels is None else self.labels.to(device),
            newest_event_time=self.newest_event_time,
        )


def sparse_features(schema: Schema) -> list[FeatureSpec]:
    """The features that go into the KJT, in KJT key order."""
    return [spec for spec in schema.features if spec.kind != "dense"]


def batch_from_columns(data: Columns, schema: Schema, with_labels: bool = True) -> Batch:
    """Convert one batch of rows to tensors.

    Single-id categorical columns are int arrays; bags and sequences are list<int> arrays (pyarrow)
    or `(values, lengths)` pairs of numpy arrays. With `with_labels`, the schema's label column is
    required; without it, labels are None (serving).
    """
    rows = _num_rows(data)
    keys, values, lengths = [], [], []
    for spec in sparse_features(schema):
        feature_values, feature_lengths = _ids(_column(data, spec.name, schema), spec, rows)
        keys.append(spec.name)
        values.append(feature_values)
        lengths.append(feature_lengths)
    sparse = check_kjt(
        KeyedJaggedTensor(
            keys=keys,
            values=torch.from_numpy(np.concatenate(values) if values else np.zeros(0, np.int64)),
            lengths=torch.from_numpy(np.concatenate(lengths) if lengths else np.zeros(0, np.int32)),
            stride=rows,
        )
    )
    dense_columns = [
        _floats(_column(data, spec.name, schema), spec.name, rows) for spec in schema.dense
    ]
    dense = (
        torch.from_numpy(np.stack(dense_columns, axis=1))
        if dense_columns
        else torch.zeros(rows, 0, dtype=torch.float32)
    )
    labels = None
    if with_labels:
        labels = torch.from_numpy(_floats(_column(data, schema.label, schema), schema.label, rows))
    return Batch(sparse=sparse, dense=dense, labels=labels, newest_event_time=_newest(data, schema))


def empty_batch(schema: Schema) -> Batch:
    """A batch of no rows with the schema's features and label."""
    keys = [spec.name for spec in sparse_features(schema)]
    return Batch(
        sparse=check_kjt(
            KeyedJaggedTensor(
                keys=keys,
                values=torch.zeros(0, dtype=torch.int64),
                lengths=torch.zeros(0, dtype=torch.int32),
                stride=0,
            )
        ),
        dense=torch.zeros(0, len(schema.dense), dtype=torch.float32),
        labels=torch.zeros(0, dtype=torch.float32),
    )


def _newest(data: Columns, schema: Schema) -> float | None:
    """The largest value of the schema's time column, None when the rows do not carry it."""
    names = data.schema.names if isinstance(data, pa.RecordBatch | pa.Table) else data.keys()
    if schema.time_column not in names or _num_rows(data) == 0:
        return None
    return float(np.max(np.asarray(data[schema.time_column])))


def _num_rows(data: Columns) -> int:
    if isinstance(data, pa.RecordBatch | pa.Table):
        return data.num_rows
    if not data:
        raise BatchError("a batch needs at least one column")
    first = next(iter(data.values()))
    if isinstance(first, tuple):
        return len(first[1])
    return len(first)


def _column(data: Columns, name: str, schema: Schema) -> Any:
    if isinstance(data, pa.RecordBatch | pa.Table):
        present = name in data.schema.names
        column = data.column(name) if present else None
    else:
        present = name in data
        column = data.get(name)
    if not present:
        needed = [spec.name for spec in schema.features]
        raise BatchError(f"batch has no column {name!r}; the schema needs: {', '.join(needed)}")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column


def _ids(column: Any, spec: FeatureSpec, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(int64 values, int32 lengths) of one sparse feature."""
    if isinstance(column, tuple):
        values, lengths = (np.asarray(part) for part in column)
    elif isinstance(column, pa.Array) and (
        pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
    ):
        lengths = pc.list_value_length(column).fill_null(0).to_numpy()
        values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    else:
        if isinstance(column, pa.Array):
            if column.null_count:
                raise BatchError(f"feature {spec.name!r} has null ids; every row needs an id")
            column = column.to_numpy(zero_copy_only=False)
        values = np.asarray(column)
        lengths = np.ones(len(values), dtype=np.int32)
    if values.dtype.kind not in "iu":
        raise BatchError(
            f"feature {spec.name!r}: ids must be integers, got dtype {values.dtype}; "
            "accepted: int arrays, or list<int> / (values, lengths) for bags and sequences"
        )
    if len(lengths) != rows or int(lengths.sum()) != len(values):
        raise BatchError(
            f"feature {spec.name!r}: {len(lengths)} rows and {len(values)} ids for lengths "
            f"summing to {int(lengths.sum())}; the batch has {rows} rows"
        )
    return values.astype(np.int64, copy=False), lengths.astype(np.int32, copy=False)


def _floats(column: Any, name: str, rows: int) -> np.ndarray:
    if isinstance(column, pa.Array):
        column = column.fill_null(0).to_numpy(zero_copy_only=False)
    values = np.asarray(column)
    if values.dtype.kind not in "iufb" or values.ndim != 1 or len(values) != rows:
        raise BatchError(
            f"column {name!r} must be a 1-D numeric array of {rows} rows, "
            f"got dtype {values.dtype} shape {values.shape}"
        )
    return values.astype(np.float32, copy=False)


class BatchLoader:
    """Batches of one split, converted on a background thread `prefetch` batches ahead.

    With `shuffle`, the split is read into memory once and each epoch takes rows in a fresh
    permutation (seeded by `seed` and the epoch); otherwise it streams the Parquet file in order.
    `rows` keeps only the first that many rows of the split.
    """

    def __init__(
        self,
        dataset: Dataset,
        split: str,
        schema: Schema,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        prefetch: int = 4,
        rows: int | None = None,
    ) -> None:
        self.dataset = dataset
        self.split = split
        self.schema = schema
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.prefetch = prefetch
        self.columns = [spec.name for spec in schema.features] + [schema.label]
        if schema.time_column in pq.read_schema(dataset.path(split)).names:
            self.columns.append(schema.time_column)
        available = dataset.info["splits"][split]["rows"]
        self.rows = available if rows is None else min(rows, available)
        self._table: pa.Table | None = None
        self.epoch = 0

    def __len__(self) -> int:
        return -(-self.rows // self.batch_size)

    def table(self) -> pa.Table:
        """The split's columns in memory (read once)."""
        if self._table is None:
            self._table = self.dataset.read(self.split, columns=self.columns).slice(0, self.rows)
        return self._table

    def _record_batches(self, epoch: int) -> Iterator[pa.RecordBatch | pa.Table]:
        if self.shuffle:
            table = self.table()
            order = np.random.default_rng([self.seed, epoch]).permutation(self.rows)
            for start in range(0, self.rows, self.batch_size):
                yield table.take(order[start : start + self.batch_size])
            return
        if self._table is not None:
            for start in range(0, self.rows, self.batch_size):
                yield self._table.slice(start, self.batch_size)
            return
        remaining = self.rows
        for batch in self.dataset.iter_batches(self.split, self.batch_size, columns=self.columns):
            if remaining <= 0:
                return
            yield batch.slice(0, remaining)
            remaining -= batch.num_rows

    def __iter__(self) -> Iterator[Batch]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return prefetched(
            (batch_from_columns(data, self.schema) for data in self._record_batches(epoch)),
            self.prefetch,
        )


_DONE = object()


def prefetched(source: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run `source` on a daemon thread, `depth` items ahead; its exceptions re-raise here."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as error:  # handed to the consumer, which re-raises it
            put(error)

    worker = threading.Thread(target=produce, name="embtab-batch-loader", daemon=True)
    worker.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join(timeout=5)
