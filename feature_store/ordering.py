"""The last pass of preparation: each time bucket in order is sorted by (time, user, item, source
row), gains its sequence and count features (per-user state carried across buckets) and is
written into the splits, on a background thread so that writing overlaps encoding the next."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from feature_store.artifact import Preprocessor
from feature_store.offline import SPLITS
from feature_store.raw_source import PrepareError
from feature_store.spec import DatasetSpec, FeatureDef

ROW_GROUP_ROWS = 65_536
PENDING_BUCKETS = 1
DICTIONARY_IDS = 1 << 15


def time_split_sizes(spec: DatasetSpec, rows: int) -> tuple[int, int, int]:
    """(train, valid, test) row counts of a time split, as `offline.time_split` makes them."""
    test = int(round(rows * spec.split.test))
    valid = int(round(rows * spec.split.valid))
    return rows - test - valid, valid, test


class _PerKeyState:
    """Per key (a user, an item): how many events it had and its last values, across buckets."""

    def __init__(self, history: int) -> None:
        self.history = history
        self.keys = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)
        self.last = np.zeros((0, history), dtype=np.int64)  # newest last, right-aligned
        self.lengths = np.zeros(0, dtype=np.int64)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(counts, last values, lengths) of `keys` (zeros for keys never seen)."""
        position = np.searchsorted(self.keys, keys)
        position = np.minimum(position, max(len(self.keys) - 1, 0))
        found = (self.keys[position] == keys) if len(self.keys) else np.zeros(len(keys), bool)
        counts = np.where(found, self.counts[position] if len(self.keys) else 0, 0)
        last = np.zeros((len(keys), self.history), dtype=np.int64)
        lengths = np.zeros(len(keys), dtype=np.int64)
        if len(self.keys):
            last[found] = self.last[position[found]]
            lengths[found] = self.lengths[position[found]]
        return counts, last, lengths

    def update(
        self, keys: np.ndarray, counts: np.ndarray, last: np.ndarray, lengths: np.ndarray
    ) -> None:
        merged = np.concatenate([self.keys, keys])
        order = np.argsort(merged, kind="stable")
        merged = merged[order]
        # A key present in both keeps the new entry (the later one in stable order).
        keep = np.r_[merged[1:] != merged[:-1], True]
        self.keys = merged[keep]
        self.counts = np.concatenate([self.counts, counts])[order][keep]
        self.last = np.concatenate([self.last, last])[order][keep]
        self.lengths = np.concatenate([self.lengths, lengths])[order][keep]


def _scalar_ids(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(ids, present) of a categorical column (int64, or list<int64> with empty bags)."""
    if pa.types.is_list(column.type):
        lengths = np.asarray(pc.list_value_length(column).fill_null(0), dtype=np.int64)
        flat = np.asarray(pc.list_flatten(column), dtype=np.int64)
        ids = np.zeros(len(lengths), dtype=np.int64)
        present = lengths > 0
        ids[present] = flat[np.r_[0, np.cumsum(lengths)][:-1][present]]
        return ids, present
    return np.asarray(column, dtype=np.int64), np.ones(len(column), dtype=bool)


def write_ordered_splits(
    spec: DatasetSpec,
    preprocessor: Preprocessor,
    tables: Iterator[pa.Table],
    listed: set[str],
    rows: int,
    scratch: Path,
) -> dict:
    """Order and write every bucket on a background thread (Arrow's sort, take and Parquet
    encoding release the GIL), so that one bucket is written while the next is encoded; at
    most `PENDING_BUCKETS` buckets wait."""
    splits = _OrderedSplits(spec, preprocessor, listed, rows, scratch)
    pending: list[Future] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            for table in tables:
                pending.append(pool.submit(splits.add, table))
                del table
                while len(pending) > PENDING_BUCKETS:
                    pending.pop(0).result()
            for future in pending:
                future.result()
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)
            splits.close()
    empty = [split for split in SPLITS if splits.stats[split]["rows"] == 0]
    if empty:
        raise PrepareError(
            f"split {empty[0]!r} would be empty ({rows} rows with split fractions valid "
            f"{spec.split.valid}, test {spec.split.test}); every split needs at least one row"
        )
    return {
        "splits": splits.stats,
        "rows": rows,
        "positives": sum(s["positives"] for s in splits.stats.values()),
    }


class _OrderedSplits:
    """The splits' Parquet files, fed bucket by bucket in time order: each bucket is sorted by
    (time, user, item, source row), gains its derived features and is cut into the splits."""

    def __init__(
        self,
        spec: DatasetSpec,
        preprocessor: Preprocessor,
        listed: set[str],
        rows: int,
        directory: Path,
    ) -> None:
        self.preprocessor = preprocessor
        self.directory = directory
        self.user = spec.roles.get("user")
        item = spec.roles.get("item")
        # Ties in time are broken by user, then item (those stored as int64), then source row.
        self.tie_keys = [c for c in (self.user, item) if c is not None and c not in listed]
        self.derived = [f for f in spec.features if f.kind in ("sequence", "count")]
        self.states = {
            f.name: _PerKeyState(f.max_length if f.kind == "sequence" else 0) for f in self.derived
        }
        self.sizes = time_split_sizes(spec, rows) if spec.split.by == "time" else None
        self.dictionary = _dictionary_columns(preprocessor)
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.stats = {split: {"rows": 0, "positives": 0} for split in SPLITS}
        self.written = 0
        self.output_order = [f.name for f in spec.features] + ["label", "timestamp"]

    def add(self, table: pa.Table) -> None:
        """Sort, extend and write one bucket (the buckets come in time order)."""
        order = _bucket_order(table, self.tie_keys)
        # Only the columns written (and the random split) are reordered.
        kept = [name for name in (*self.output_order, "__split") if name in table.column_names]
        table = table.select(kept)
        if not np.array_equal(order, np.arange(table.num_rows)):
            table = table.take(pa.array(order))
        for feature in self.derived:
            state = self.states[feature.name]
            table = table.append_column(
                feature.name, _derived(feature, table, self.user, state, self.preprocessor)
            )
        rows = table.num_rows
        if self.sizes is not None:
            position = np.arange(self.written, self.written + rows)
            split_of = np.where(
                position < self.sizes[0],
                0,
                np.where(position < self.sizes[0] + self.sizes[1], 1, 2),
            )
        else:
            split_of = np.asarray(table.column("__split"), dtype=np.int8)
        self.written += rows
        out = table.select(self.output_order)
        for index, split in enumerate(SPLITS):
            if self.sizes is not None:
                # A time split's rows of one split are contiguous: a slice, not a copy.
                start, stop = np.searchsorted(split_of, [index, index + 1])
                part = out.slice(start, stop - start)
            else:
                part = out.filter(pa.array(split_of == index))
            if part.num_rows == 0:
                continue
            self._write(split, part)
            self.stats[split]["rows"] += part.num_rows
            self.stats[split]["positives"] += int(
                np.count_nonzero(np.asarray(part.column("label")))
            )

    def _write(self, split: str, part: pa.Table) -> None:
        writer = self.writers.get(split)
        if writer is None:
            # Columns named but absent (a categorical stored as a list) are ignored by Parquet.
            writer = pq.ParquetWriter(
                self.directory / f"{split}.parquet", part.schema, use_dictionary=self.dictionary
            )
            self.writers[split] = writer
        writer.write_table(part, row_group_size=ROW_GROUP_ROWS)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def _bucket_order(table: pa.Table, tie_keys: list[str]) -> np.ndarray:
    """The row order by (time, tie keys, source row): a stable sort of the times (the bucket's
    rows are in source order), then the rows sharing a time sorted by the tie keys."""
    time_key = np.asarray(table.column("__time_key"), dtype=np.int64)
    order = np.argsort(time_key, kind="stable")
    sorted_time = time_key[order]
    same = sorted_time[1:] == sorted_time[:-1]
    tied = np.flatnonzero(np.r_[same, False] | np.r_[False, same])
    if len(tied):
        rows = order[tied]
        keys = [np.asarray(table.column(name), dtype=np.int64)[rows] for name in tie_keys]
        row_keys = np.asarray(table.column("__row"), dtype=np.int64)[rows]
        order[tied] = rows[np.lexsort((row_keys, *reversed(keys), sorted_time[tied]))]
    return order


def _dictionary_columns(preprocessor: Preprocessor) -> list[str]:
    """The output columns (Parquet leaf paths) worth dictionary-encoding: ids of at most
    `DICTIONARY_IDS` distinct values, and the label. Larger id columns are written plain:
    trying a dictionary on them costs time and saves little."""
    columns = ["label"]
    for feature in preprocessor.schema().features:
        if feature.kind == "dense" or feature.cardinality > DICTIONARY_IDS:
            continue
        listed = feature.kind == "sequence" or feature.max_length > 1
        columns.append(f"{feature.name}.list.element" if listed else feature.name)
    return columns


def _derived(
    feature: FeatureDef,
    table: pa.Table,
    user: str | None,
    state: _PerKeyState,
    preprocessor: Preprocessor,
) -> pa.Array:
    """A sequence (the user's previous values of `of`) or a count (earlier events of `of`)."""
    if feature.kind == "count":
        keys, present = _scalar_ids(table.column(feature.of))
        keys = np.where(present, keys, np.iinfo(np.int64).min)
        counts = _prior_counts(keys, state)
        return pa.array(preprocessor.dense_values(feature, pa.array(counts.astype(np.float64))))
    users, _ = _scalar_ids(table.column(user))
    values, present = _scalar_ids(table.column(feature.of))
    return _history(users, values, present, state)


def _prior_counts(keys: np.ndarray, state: _PerKeyState) -> np.ndarray:
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_keys)) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    carried, _, _ = state.lookup(sorted_keys)
    within = np.arange(len(order)) - group_start
    counts = np.empty(len(keys), dtype=np.int64)
    counts[order] = carried + within
    ends = np.r_[starts[1:], len(order)] - 1
    group_keys = sorted_keys[starts]
    state.update(
        group_keys,
        counts[order][ends] + 1,
        np.zeros((len(starts), 0), np.int64),
        np.zeros(len(starts), np.int64),
    )
    return counts


def _history(
    users: np.ndarray, values: np.ndarray, present: np.ndarray, state: _PerKeyState
) -> pa.ListArray:
    """For each event (in time order), the user's previous `history` values, oldest first.

    Per user the timeline is its carried values (from earlier buckets) then this bucket's
    present values; event i sees the `history` newest timeline values before its own."""
    length = state.history
    count = len(users)
    order = np.lexsort((np.arange(count), users))
    users_sorted, values_sorted, present_sorted = users[order], values[order], present[order]
    starts = np.r_[0, np.flatnonzero(np.diff(users_sorted)) + 1] if count else np.zeros(0, int)
    sizes = np.diff(np.r_[starts, count])
    group_of = np.repeat(np.arange(len(starts)), sizes)
    _, carried, carried_lengths = state.lookup(users_sorted[starts])
    own_counts = np.bincount(group_of[present_sorted], minlength=len(starts))
    totals = carried_lengths + own_counts
    timeline_start = np.r_[0, np.cumsum(totals)][:-1]
    timeline = np.zeros(int(totals.sum()), dtype=np.int64)
    carried_mask = np.arange(length)[None, :] >= (length - carried_lengths)[:, None]
    timeline[_ranges(timeline_start, carried_lengths)] = carried[carried_mask]
    timeline[_ranges(timeline_start + carried_lengths, own_counts)] = values_sorted[present_sorted]
    # How many own present values precede each event within its group.
    present_before = np.cumsum(present_sorted) - present_sorted
    seen = carried_lengths[group_of] + present_before - present_before[starts][group_of]
    first = np.maximum(seen - length, 0)
    begin_sorted = timeline_start[group_of] + first
    lengths_sorted = seen - first
    begin = np.empty(count, dtype=np.int64)
    lengths = np.empty(count, dtype=np.int64)
    begin[order], lengths[order] = begin_sorted, lengths_sorted
    flat = timeline[_ranges(begin, lengths)]
    kept = np.minimum(totals, length)
    ends = timeline_start + totals
    index = ends[:, None] - length + np.arange(length)[None, :]
    tail_mask = np.arange(length)[None, :] >= (length - kept)[:, None]
    new_last = np.where(
        tail_mask, timeline[np.clip(index, 0, max(len(timeline) - 1, 0))] if len(timeline) else 0, 0
    )
    state.update(users_sorted[starts], np.zeros(len(starts), np.int64), new_last, kept)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int64()))


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of range(start, start + length) for each pair."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.r_[0, np.cumsum(lengths)][:-1]
    return np.repeat(np.asarray(starts, dtype=np.int64) - offsets, lengths) + np.arange(total)
