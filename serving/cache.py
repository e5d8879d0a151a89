"""A local cache of decoded rows, bounded in bytes, least recently used rows evicted first.

Rows of each physical table live in one float32 slab (so a batch of hits is one gather) with a
dict from row id to slot; every slot records the tick of its last use, and when the cache is over
its budget the oldest `evict_fraction` of its rows (across all tables) go at once, so eviction
costs one partial sort per many inserts rather than bookkeeping on every hit.

Rows that Redis did not have (ids a collisionless table has not admitted) are cached too, as
absent, so an unknown id does not cost a round trip per request. Deltas invalidate the rows they
change. A fetch that started before an invalidation of its table must not re-insert what it
read (it may be the old value), so `put` takes the table's epoch as read before the fetch and
drops the rows if the epoch moved since.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from serving.errors import ServingError

# Estimated bytes of bookkeeping per cached row: the dict entry, its key and the slot's tick.
ENTRY_OVERHEAD_BYTES = 96
MIN_SLAB_ROWS = 256


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    rows: int
    bytes: int
    capacity_bytes: int
    evictions: int
    invalidations: int

    @property
    def hit_rate(self) -> float:
        """Hits over lookups since the cache was made (0 before any lookup)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class _TableSlab:
    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.epoch = 0
        self.reset()

    def reset(self) -> None:
        """Forget every row (the epoch goes on)."""
        self.slot_of: dict[int, int] = {}
        self.values = np.zeros((MIN_SLAB_ROWS, self.dim), dtype=np.float32)
        self.found = np.zeros(MIN_SLAB_ROWS, dtype=bool)
        self.last_used = np.zeros(MIN_SLAB_ROWS, dtype=np.int64)
        self.ids = np.zeros(MIN_SLAB_ROWS, dtype=np.int64)
        self.free: list[int] = []
        self.high_water = 0

    @property
    def row_bytes(self) -> int:
        return self.dim * 4 + ENTRY_OVERHEAD_BYTES

    def slots(self, ids: np.ndarray) -> np.ndarray:
        get = self.slot_of.get
        return np.fromiter((get(i, -1) for i in ids.tolist()), dtype=np.int64, count=len(ids))

    def allocate(self, count: int) -> np.ndarray:
        reused = [self.free.pop() for _ in range(min(count, len(self.free)))]
        fresh = count - len(reused)
        if self.high_water + fresh > len(self.values):
            self._grow(self.high_water + fresh)
        slots = np.array(reused + list(range(self.high_water, self.high_water + fresh)), np.int64)
        self.high_water += fresh
        return slots

    def _grow(self, needed: int) -> None:
        size = max(needed, 2 * len(self.values))
        for name in ("values", "found", "last_used", "ids"):
            old = getattr(self, name)
            grown = np.zeros((size, *old.shape[1:]), dtype=old.dtype)
            grown[: len(old)] = old
            setattr(self, name, grown)

    def remove(self, slots: np.ndarray) -> None:
        for slot in slots.tolist():
            del self.slot_of[int(self.ids[slot])]
        self.free.extend(slots.tolist())

    def used_slots(self) -> np.ndarray:
        if not self.slot_of:
            return np.zeros(0, dtype=np.int64)
        return np.fromiter(self.slot_of.values(), dtype=np.int64, count=len(self.slot_of))


class RowCache:
    """Decoded rows of many physical tables within `capacity_bytes`; thread-safe."""

    def __init__(self, capacity_bytes: int, evict_fraction: float = 0.1) -> None:
        if capacity_bytes < 0:
            raise ServingError(f"cache capacity must be >= 0 bytes, got {capacity_bytes}")
        if not 0.0 < evict_fraction <= 1.0:
            raise ServingError(f"evict_fraction must be in (0, 1], got {evict_fraction}")
        self.capacity_bytes = capacity_bytes
        self.evict_fraction = evict_fraction
        self._tables: dict[str, _TableSlab] = {}
        self._lock = threading.Lock()
        self._tick = 0
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._invalidations = 0

    def epoch(self, table: str) -> int:
        """The table's invalidation epoch: read it before a fetch, hand it to `put`."""
        with self._lock:
            slab = self._tables.get(table)
            return 0 if slab is None else slab.epoch

    def get(
        self, table: str, ids: np.ndarray, dim: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(values [n, dim], found [n], hit [n]) for distinct `ids`; misses are zeros, not found."""
        values = np.zeros((len(ids), dim), dtype=np.float32)
        found = np.zeros(len(ids), dtype=bool)
        with self._lock:
            slab = self._slab(table, dim)
            slots = slab.slots(ids)
            hit = slots >= 0
            hit_slots = slots[hit]
            self._tick += 1
            slab.last_used[hit_slots] = self._tick
            values[hit] = slab.values[hit_slots]
            found[hit] = slab.found[hit_slots]
            hits = int(hit.sum())
            self._hits += hits
            self._misses += len(ids) - hits
        return values, found, hit

    def put(
        self, table: str, ids: np.ndarray, values: np.ndarray, found: np.ndarray, epoch: int
    ) -> bool:
        """Insert rows read at `epoch` (distinct ids, not cached now); False if dropped because
        the table was invalidated since, or the cache has no room at all."""
        dim = values.shape[1]
        with self._lock:
            slab = self._slab(table, dim)
            if slab.epoch != epoch or slab.row_bytes > self.capacity_bytes:
                return False
            fresh = slab.slots(ids) < 0
            ids, values, found = ids[fresh], values[fresh], found[fresh]
            if not len(ids):
                return True
            limit = self.capacity_bytes // slab.row_bytes
            if len(ids) > limit:
                ids, values, found = ids[:limit], values[:limit], found[:limit]
            self._make_room(len(ids) * slab.row_bytes)
            slots = slab.allocate(len(ids))
            self._tick += 1
            slab.values[slots] = values
            slab.found[slots] = found
            slab.ids[slots] = ids
            slab.last_used[slots] = self._tick
            slab.slot_of.update(zip(ids.tolist(), slots.tolist(), strict=True))
            self._bytes += len(ids) * slab.row_bytes
        return True

    def invalidate(self, table: str, ids: np.ndarray) -> int:
        """Drop the rows of `ids` (a delta changed them); returns how many were cached."""
        with self._lock:
            slab = self._tables.get(table)
            if slab is None:
                return 0
            slab.epoch += 1
            slots = slab.slots(np.asarray(ids, dtype=np.int64))
            slots = np.unique(slots[slots >= 0])
            slab.remove(slots)
            self._bytes -= len(slots) * slab.row_bytes
            self._invalidations += len(slots)
            return len(slots)

    def clear(self) -> None:
        """Drop every row (a delta log was lost, so nothing cached can be trusted)."""
        with self._lock:
            for slab in self._tables.values():
                self._invalidations += len(slab.slot_of)
                slab.epoch += 1
                slab.reset()
            self._bytes = 0

    def hot_ids(self, table: str, limit: int) -> np.ndarray:
        """Up to `limit` cached ids of `table`, most recently used first (to warm a new version)."""
        with self._lock:
            slab = self._tables.get(table)
            if slab is None:
                return np.zeros(0, dtype=np.int64)
            slots = slab.used_slots()
            order = np.argsort(-slab.last_used[slots], kind="stable")[:limit]
            return slab.ids[slots[order]].copy()

    def tables(self) -> list[str]:
        with self._lock:
            return list(self._tables)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                rows=sum(len(slab.slot_of) for slab in self._tables.values()),
                bytes=self._bytes,
                capacity_bytes=self.capacity_bytes,
                evictions=self._evictions,
                invalidations=self._invalidations,
            )

    def _slab(self, table: str, dim: int) -> _TableSlab:
        slab = self._tables.get(table)
        if slab is None:
            slab = self._tables[table] = _TableSlab(dim)
        elif slab.dim != dim:
            raise ServingError(f"table {table!r} is cached with dim {slab.dim}, asked for {dim}")
        return slab

    def _make_room(self, incoming: int) -> None:
        """Evict least recently used rows, across tables, until `incoming` bytes fit."""
        if self._bytes + incoming <= self.capacity_bytes or self._bytes == 0:
            return
        target = min(
            self.capacity_bytes - incoming,
            int(self.capacity_bytes * (1.0 - self.evict_fraction)),
        )
        owners, ticks, slots = [], [], []
        for index, slab in enumerate(self._tables.values()):
            used = slab.used_slots()
            owners.append(np.full(len(used), index))
            ticks.append(slab.last_used[used])
            slots.append(used)
        owner, tick, slot = np.concatenate(owners), np.concatenate(ticks), np.concatenate(slots)
        slabs = list(self._tables.values())
        row_bytes = np.array([slabs[i].row_bytes for i in range(len(slabs))])[owner]
        order = np.argsort(tick, kind="stable")
        freed = np.cumsum(row_bytes[order])
        count = int(np.searchsorted(freed, self._bytes - target, side="left")) + 1
        victims = order[: min(count, len(order))]
        for index, slab in enumerate(slabs):
            mine = slot[victims[owner[victims] == index]]
            slab.remove(mine)
            self._bytes -= len(mine) * slab.row_bytes
            self._evictions += len(mine)
