"""Item attributes from the online feature store, kept locally for a short time.

A request carries up to 1000 candidates; reading and decoding their attributes (release year,
genres, ...) from Redis for every request would cost a round trip and most of the decoding time
of a batch, while those attributes change rarely. Entries are read again once older than
`ttl_s`, so a change in the store shows within that time. Items the store does not know are kept
as unknown (empty bags, 0.0). With Redis down, whatever is held is used, however old.

The store holds raw values keyed by raw item ids; the cache is keyed by the raw id too and holds
the values as this version's artifact encodes them (`model_column`), so a cache serves one
artifact: a version with another one gets a cache of its own.

Storage is one padded array per feature (row = item slot, up to the feature's `max_length` ids),
so a batch's columns are one gather each, with no per-item Python. Not thread-safe: the one
scoring thread owns it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from feature_store.artifact import Preprocessor
from feature_store.online import OnlineFeatureStore, RawId
from feature_store.schema import FeatureSpec
from serving.jagged import Jagged


def model_column(
    preprocessing: Preprocessor | None, spec: FeatureSpec, column: pa.Array
) -> Jagged | np.ndarray:
    """One online column (raw values read from the store, null where the store knows nothing)
    as the model takes it: a Jagged column of ids, or float32 numbers for a dense feature;
    null rows stay empty bags and 0.0. Raw values go through the artifact's `encode`, as a
    request's raw values do; without an artifact the store holds prepared ids already."""
    if preprocessing is None:
        if spec.kind == "dense":
            values = column.fill_null(0).to_numpy(zero_copy_only=False)
            return np.asarray(values, dtype=np.float32)
        return Jagged.from_arrow(column)[0]
    if not column.null_count:
        encoded = preprocessing.encode(spec.name, column)
        if spec.kind == "dense":
            return np.asarray(encoded.to_numpy(zero_copy_only=False), dtype=np.float32)
        return Jagged.from_arrow(encoded)[0]
    present = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    encoded = preprocessing.encode(spec.name, column.filter(pa.array(present)))
    if spec.kind == "dense":
        numbers = np.zeros(len(column), dtype=np.float32)
        numbers[present] = encoded.to_numpy(zero_copy_only=False)
        return numbers
    rows = Jagged.from_arrow(encoded)[0]
    lengths = np.zeros(len(column), dtype=np.int64)
    lengths[present] = rows.lengths
    return Jagged(rows.values, lengths)


class ItemFeatureCache:
    def __init__(
        self,
        store: OnlineFeatureStore,
        specs: list[FeatureSpec],
        ttl_s: float = 30.0,
        max_items: int = 1_000_000,
    ) -> None:
        self.store = store
        self.specs = specs
        self.ttl_s = ttl_s
        self.max_items = max_items
        self._reset()

    def _reset(self) -> None:
        self._slot_of: dict[RawId, int] = {}
        self._fetched_at = np.zeros(0, dtype=np.float64)
        self._ids: dict[str, np.ndarray] = {}
        self._lengths: dict[str, np.ndarray] = {}
        self._dense: dict[str, np.ndarray] = {}

    def columns(self, item_ids: Sequence[RawId], may_fetch: bool) -> dict[str, Jagged | np.ndarray]:
        """Every cached feature for each of `item_ids` (raw ids, one row per id, repeats
        allowed), reading absent or expired items from the store first if `may_fetch`. Raises
        the store's errors (OnlineStoreUnavailable, ...) when a read fails."""
        position_of: dict[RawId, int] = {}
        inverse = np.fromiter(
            (position_of.setdefault(item, len(position_of)) for item in item_ids),
            dtype=np.int64,
            count=len(item_ids),
        )
        distinct = list(position_of)
        slots = self._slots(distinct)
        if may_fetch:
            now = time.monotonic()
            fetched_at = np.full(len(slots), -np.inf)
            fetched_at[slots >= 0] = self._fetched_at[slots[slots >= 0]]
            stale = np.flatnonzero(fetched_at < now - self.ttl_s)
            if len(stale):
                # An item without a raw id (a prepared OOV id) has nothing in the store.
                wanted = [distinct[index] for index in stale.tolist()]
                wanted = [item for item in wanted if item is not None]
                if wanted:
                    self._insert(wanted, self.store.get_items(wanted), now)
                slots = self._slots(distinct)
        known = slots >= 0
        if not known.any():
            return {spec.name: _unknown(spec, len(item_ids)) for spec in self.specs}
        rows = np.where(known, slots, 0)[inverse]
        present = known[inverse]
        columns: dict[str, Jagged | np.ndarray] = {}
        for spec in self.specs:
            if spec.kind == "dense":
                columns[spec.name] = np.where(present, self._dense[spec.name][rows], 0.0).astype(
                    np.float32
                )
                continue
            lengths = np.where(present, self._lengths[spec.name][rows], 0)
            padded = self._ids[spec.name][rows]
            keep = np.arange(padded.shape[1]) < lengths[:, None]
            columns[spec.name] = Jagged(padded[keep], lengths.astype(np.int64))
        return columns

    def _slots(self, distinct: Sequence[RawId]) -> np.ndarray:
        get = self._slot_of.get
        return np.fromiter(
            (get(item, -1) for item in distinct), dtype=np.int64, count=len(distinct)
        )

    def _insert(self, item_ids: list[RawId], batch: pa.RecordBatch, now: float) -> None:
        if len(self._slot_of) + len(item_ids) > self.max_items:
            self._reset()
        slots = self._slots(item_ids)
        new = np.flatnonzero(slots < 0)
        start = len(self._slot_of)
        slots[new] = np.arange(start, start + len(new))
        self._slot_of.update((item_ids[index], int(slots[index])) for index in new.tolist())
        size = start + len(new)
        self._fetched_at = _grown(self._fetched_at, size)
        self._fetched_at[slots] = now
        preprocessing = self.store.preprocessing
        for spec in self.specs:
            column = model_column(preprocessing, spec, batch.column(spec.name))
            if isinstance(column, np.ndarray):
                values = column
                self._dense[spec.name] = _grown(
                    self._dense.get(spec.name, np.zeros(0, np.float32)), size
                )
                self._dense[spec.name][slots] = values
                continue
            rows = column
            width = spec.max_length
            lengths = np.minimum(rows.lengths, width)
            padded = np.zeros((len(item_ids), width), dtype=np.int64)
            starts = rows.offsets[:-1]
            for position in range(width):
                has = lengths > position
                padded[has, position] = rows.values[starts[has] + position]
            self._ids[spec.name] = _grown(
                self._ids.get(spec.name, np.zeros((0, width), np.int64)), size
            )
            self._ids[spec.name][slots] = padded
            self._lengths[spec.name] = _grown(
                self._lengths.get(spec.name, np.zeros(0, np.int64)), size
            )
            self._lengths[spec.name][slots] = lengths


def _unknown(spec: FeatureSpec, rows: int) -> Jagged | np.ndarray:
    return np.zeros(rows, np.float32) if spec.kind == "dense" else Jagged.empty(rows)


def _grown(array: np.ndarray, size: int) -> np.ndarray:
    """`array` with at least `size` rows (doubling, zeros in the new rows)."""
    if len(array) >= size:
        return array
    grown = np.zeros((max(size, 2 * len(array)), *array.shape[1:]), dtype=array.dtype)
    grown[: len(array)] = array
    return grown
