"""A column of variable-length id lists (values + lengths), with the few vectorised operations
the scorer needs to merge request values, online features and defaults without per-row Python."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class Jagged:
    """Row i is values[offsets[i]:offsets[i + 1]]. Values are writable numpy arrays (never
    views of Arrow buffers), so torch can take them without a copy."""

    values: np.ndarray  # int64
    lengths: np.ndarray  # int64, one per row

    @property
    def offsets(self) -> np.ndarray:
        offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        return offsets

    def __len__(self) -> int:
        return len(self.lengths)

    @classmethod
    def empty(cls, rows: int) -> Jagged:
        return cls(np.zeros(0, np.int64), np.zeros(rows, np.int64))

    @classmethod
    def from_arrow(cls, column: pa.Array) -> tuple[Jagged, np.ndarray]:
        """(rows, present mask) of an int or list<int> column; a null row is empty, not present."""
        is_list = pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
        if column.null_count == 0:
            present = np.ones(len(column), dtype=bool)
            if not is_list:
                values = np.array(column.to_numpy(zero_copy_only=False), dtype=np.int64)
                return cls(values, present.astype(np.int64)), present
            offsets = column.offsets.to_numpy().astype(np.int64)
            flat = column.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
            return cls(np.array(flat, dtype=np.int64), np.diff(offsets)), present
        present = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        if is_list:
            lengths = np.asarray(
                pc.list_value_length(column).fill_null(0).to_numpy(), dtype=np.int64
            )
            flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
            return cls(np.array(flat, dtype=np.int64), lengths), present
        values = np.asarray(column.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
        return cls(values[present], present.astype(np.int64)), present

    def repeat(self, row: int, times: int) -> Jagged:
        """Row `row`, `times` times (a user's features on each of its candidates)."""
        start, length = int(self.lengths[:row].sum()), int(self.lengths[row])
        values = np.tile(self.values[start : start + length], times)
        return Jagged(values, np.full(times, length, dtype=np.int64))

    def take(self, rows: np.ndarray) -> Jagged:
        """Rows in the order of `rows` (repeats allowed)."""
        lengths = self.lengths[rows]
        starts = self.offsets[:-1][rows]
        return Jagged(self.values[_ranges(starts, lengths)], lengths)

    def where(self, mask: np.ndarray, other: Jagged) -> Jagged:
        """Row i from self where mask[i], else from other."""
        lengths = np.where(mask, self.lengths, other.lengths)
        starts = np.where(mask, self.offsets[:-1], other.offsets[:-1] + len(self.values))
        combined = np.concatenate([self.values, other.values])
        return Jagged(combined[_ranges(starts, lengths)], lengths)

    @classmethod
    def concat(cls, parts: Sequence[Jagged]) -> Jagged:
        return cls(
            np.concatenate([part.values for part in parts]),
            np.concatenate([part.lengths for part in parts]),
        )


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices starts[0]..starts[0]+lengths[0]-1, starts[1]..., concatenated."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    run_starts = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return run_starts + np.arange(total)
