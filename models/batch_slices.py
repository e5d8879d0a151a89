"""Rows of a batch: a rank's slice of a global batch, and padding to a common size."""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models.batches import Batch
from models.errors import ModelConfigError


def local_slice(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rows [rank * B / N, (rank + 1) * B / N) of a batch (B divisible by N)."""
    size = batch.size // world_size
    return slice_batch(batch, rank * size, (rank + 1) * size)


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Rows [start, stop) of a batch."""
    return Batch(
        sparse=_slice_kjt(batch.sparse, start, stop),
        dense=batch.dense[start:stop],
        labels=None if batch.labels is None else batch.labels[start:stop],
    )


def pad_batch(batch: Batch, size: int) -> Batch:
    """`batch` followed by rows that read nothing (empty bags, zero dense features, label 0) up
    to `size` rows: ranks with fewer rows than others take part in a step of the same shape, and
    leave the padding out of their loss."""
    extra = size - batch.size
    if extra < 0:
        raise ModelConfigError(f"cannot pad a batch of {batch.size} rows to {size}")
    keys = batch.sparse.keys()
    lengths = batch.sparse.lengths().view(len(keys), -1)
    padding = torch.zeros(len(keys), extra, dtype=lengths.dtype)
    return Batch(
        sparse=KeyedJaggedTensor(
            keys=keys,
            values=batch.sparse.values(),
            lengths=torch.cat([lengths, padding], dim=1).flatten(),
            stride=size,
        ),
        dense=torch.cat([batch.dense, batch.dense.new_zeros(extra, batch.dense.shape[1])]),
        labels=None
        if batch.labels is None
        else torch.cat([batch.labels, batch.labels.new_zeros(extra)]),
        newest_event_time=batch.newest_event_time,
    )


def _slice_kjt(kjt: KeyedJaggedTensor, start: int, stop: int) -> KeyedJaggedTensor:
    """Rows [start, stop) of every feature of a KJT."""
    keys = kjt.keys()
    lengths = kjt.lengths().view(len(keys), -1)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.flatten().cumsum(0)])
    stride = lengths.shape[1]
    values = [
        kjt.values()[offsets[k * stride + start] : offsets[k * stride + stop]]
        for k in range(len(keys))
    ]
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.cat(values),
        lengths=lengths[:, start:stop].flatten(),
        stride=stop - start,
    )
