"""Monolith's collisionless embedding table: every admitted id owns a row, no collisions.

Liu et al., "Monolith: Real Time Recommendation System With Collisionless Embedding Table" (2022).
An id is tracked from its first sighting (count, last-seen time); it gets a row of its own once
it has been seen `min_count` times, and loses it when it is not seen for `ttl_seconds` or when
the table is at `capacity` and the eviction policy (LRU or LFU) picks it. Until it has a row an id
reads the shared default row (or zeros) and gets no update of its own.

The sparse update is fused into backward: the lookup is a custom autograd Function whose
backward applies row-wise Adagrad (or SGD) to the touched rows in place, so the table's storage
can grow and be reused without a dense optimizer ever holding it.

Row 0 is the default row: it belongs to no id. Rows 1.. belong to admitted ids. Time is read from
an injectable clock (seconds) and kept as int64 microseconds, so that a `.half()` of the model
cannot round the last-seen times.

Bookkeeping is kept lean, about 32 bytes per tracked id with the id map: counts are int32
(saturating at 2^31 - 1), the entry -> row map int32 (row -> entry is derived from it when
needed: delta sync, export, eviction at capacity), and an entry's last-seen time is an int32
index into the table's list of distinct last-seen times (one int64 per training step that is
still some entry's last sighting), so times stay exact to the microsecond. Checkpoints keep the
int64 layout of version 1 (counts, microsecond times, rows), so old ones load unchanged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from embedding_tables.config import TableConfig
from embedding_tables.errors import BudgetError, ConfigError, EmbeddingTableError, IdError
from embedding_tables.hashing import bucket, hash64
from embedding_tables.idmap import EMPTY, IdSlotMap, SlotAllocator, check_ids
from embedding_tables.methods import Collisionless
from embedding_tables.optimizer import SparseOptimizerConfig

DEFAULT_ROW = 0
CHECKPOINT_VERSION = 1
STAT_NAMES = (
    "lookups",  # ids looked up in training mode
    "default_lookups",  # of those, ids served by the default row (not admitted)
    "admitted",  # ids that got a row
    "evicted_capacity",  # admitted ids evicted by LRU/LFU to make room
    "rejected",  # ids ready for a row that lost to the eviction policy (capacity full)
    "expired",  # admitted ids expired by ttl_seconds
    "expired_pending",  # not-yet-admitted ids forgotten by ttl_seconds
    "forgotten_pending",  # not-yet-admitted ids dropped to keep within max_pending
)
_US_PER_SECOND = 1_000_000
_MAX_COUNT = torch.iinfo(torch.int32).max
_MIN_SEEN_TIMES = 1024  # distinct last-seen times kept before the list is first compacted
# Bucket load of the id map: higher than the map's default to keep its bytes per id down; with
# linear probing a lookup still resolves in about 2.5 probe rounds.
_MAP_MAX_LOAD = 0.75


class CapacityError(EmbeddingTableError):
    """More ids to load than the table's capacity holds."""


class CheckpointError(EmbeddingTableError):
    """A state dict that does not describe a collisionless table of this config."""


def resolve_capacity(config: TableConfig) -> int | None:
    """The most rows ids may own: `capacity`, else the budget's rows, else unbounded (None)."""
    budget_rows = config.budget_rows() if config.budget is not None else None
    if budget_rows is not None and budget_rows < 1:
        minimum = 1 / config.num_embeddings
        raise BudgetError(
            f"table {config.name!r}: budget {config.budget} buys {budget_rows} rows of "
            f"{config.num_embeddings}; collisionless needs at least 1 row, so the minimum "
            f"budget is {minimum:.3g} (or an int number of rows >= 2)"
        )
    capacity = config.method.capacity
    if capacity is None:
        return budget_rows
    if budget_rows is not None and capacity > budget_rows:
        raise ConfigError(
            f"table {config.name!r}: capacity {capacity} exceeds the {budget_rows} rows its "
            f"budget {config.budget} buys; set one of them, or capacity <= the budget's rows"
        )
    return capacity


class CollisionlessTable(nn.Module):
    """A dynamic id -> row table with frequency admission, time expiry and capacity eviction.

    In training mode a lookup counts its ids, expires stale ones, admits those seen `min_count`
    times (evicting by LRU/LFU when at capacity) and its backward updates the rows it read. In eval
    mode a lookup never changes the table: unknown or not-yet-admitted ids read the default row.

    Storage grows by whole chunks of `chunk_rows` rows, at least 1.5x at a time, up to capacity
    (+1 for the default row), so rows are copied O(log n) times in all, never on every insert.
    Ids still counting towards `min_count` (or rejected at capacity) are tracked up to
    `max_pending` (default: the capacity; unbounded without one), so memory stays bounded.
    """

    def __init__(
        self,
        config: TableConfig,
        optimizer_config: SparseOptimizerConfig | None = None,
        *,
        chunk_rows: int = 65536,
        cms_depth: int = 4,
        cms_width: int | None = None,
        max_pending: int | None = None,
        clock: Callable[[], float] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config.method, Collisionless):
            raise ConfigError(
                f"table {config.name!r}: CollisionlessTable needs method='collisionless', "
                f"got {config.method.name!r}"
            )
        if chunk_rows < 1:
            raise ConfigError(f"table {config.name!r}: chunk_rows must be >= 1, got {chunk_rows}")
        if max_pending is not None and max_pending < 0:
            raise ConfigError(f"table {config.name!r}: max_pending must be >= 0, got {max_pending}")
        optimizer_config = optimizer_config or SparseOptimizerConfig()
        if optimizer_config.kind is None:
            raise ConfigError(
                f"table {config.name!r}: a collisionless table updates its rows in its own "
                "backward and needs a sparse optimizer kind (rowwise_adagrad or sgd), not None"
            )
        self.config = config
        self.optimizer_config = optimizer_config
        self.capacity = resolve_capacity(config)
        self.max_pending = self.capacity if max_pending is None else max_pending
        self._chunk_rows = chunk_rows
        self._clock: Callable[[], float] = clock or time.time
        self._ttl_us = (
            None
            if config.method.ttl_seconds is None
            else round(config.method.ttl_seconds * _US_PER_SECOND)
        )
        self._dtype = torch.float32 if config.dtype == "fp32" else torch.float16
        self._init_bound = math.sqrt(1.0 / config.num_embeddings)
        use_cms = config.method.admission == "cms" and config.method.min_count > 1
        if use_cms:
            if cms_depth < 1:
                raise ConfigError(f"table {config.name!r}: cms_depth must be >= 1")
            width = cms_width or _default_cms_width(self.capacity or config.num_embeddings)
            if width < 1 or width & (width - 1):
                raise ConfigError(
                    f"table {config.name!r}: cms_width must be a power of two, got {width}"
                )
            self._cms: torch.Tensor | None = torch.zeros(
                (cms_depth, width), dtype=torch.int32, device=device
            )
        else:
            self._cms = None

        self._map = IdSlotMap(seed=config.seed, max_load=_MAP_MAX_LOAD, device=device)
        self._rows = SlotAllocator(device)
        self._rows.allocate(1)  # row 0: the default row, never released
        initial_rows = min(chunk_rows, (self.capacity or chunk_rows) + 1)
        self.weight = torch.zeros((initial_rows, config.dim), dtype=self._dtype, device=device)
        self._momentum = torch.full(
            (initial_rows,),
            self.optimizer_config.initial_accumulator_value,
            dtype=torch.float32,
            device=device,
        )
        self._touched = torch.zeros(initial_rows, dtype=torch.bool, device=device)
        self._entry_count = torch.zeros(0, dtype=torch.int32, device=device)
        self._entry_seen = torch.zeros(0, dtype=torch.int32, device=device)
        self._entry_row = torch.zeros(0, dtype=torch.int32, device=device)
        self._seen_times_us = torch.zeros(_MIN_SEEN_TIMES, dtype=torch.int64, device=device)
        self._num_seen_times = 0
        self._evicted: list[torch.Tensor] = []
        self._stats = dict.fromkeys(STAT_NAMES, 0)

    # -- public API ----------------------------------------------------------------------------

    def set_clock(self, clock: Callable[[], float]) -> None:
        """Read time (seconds) from `clock`: event time in streaming, a movable clock in tests."""
        self._clock = clock

    def pooled(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pool the rows of each bag (sum or mean, per config.pooling): [B, dim].

        `offsets` has B + 1 entries (torchrec style: bag b is values[offsets[b]:offsets[b+1]]);
        an empty bag pools to zeros. With mean pooling, per-sample weights scale each row and the
        sum is divided by the bag's length.
        """
        ids = check_ids(values, f"table {self.config.name!r}: values")
        offsets = _check_offsets(offsets, ids.numel(), self.config.name)
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.reshape(-1)
            if per_sample_weights.numel() != ids.numel():
                raise IdError(
                    f"table {self.config.name!r}: per_sample_weights has "
                    f"{per_sample_weights.numel()} entries for {ids.numel()} values; one per value"
                )
        return self._lookup(ids, offsets, per_sample_weights)

    def sequence(self, values: torch.Tensor) -> torch.Tensor:
        """One row per id, unpooled: [N, dim] (for attention over behaviour sequences)."""
        ids = check_ids(values, f"table {self.config.name!r}: values")
        return self._lookup(ids, None, None)

    def forward(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.pooled(values, offsets, per_sample_weights)

    def rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Row each id reads now, without changing anything (DEFAULT_ROW if it has none)."""
        return self._rows_now(check_ids(ids))

    def map_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The id -> row step of a lookup, without the gather: rows per id, [N].

        In training mode it counts, expires, admits and evicts exactly as a lookup does; in eval
        mode it is `rows_of`. For callers that gather rows themselves, and for benchmarks.
        """
        ids = check_ids(ids, f"table {self.config.name!r}: ids").to(self.weight.device)
        if not self.training:
            return self._rows_now(ids)
        return self._map_for_training(ids)[0]

    def _rows_now(self, ids: torch.Tensor) -> torch.Tensor:
        slots = self._map.lookup(ids)
        rows = torch.full_like(ids, DEFAULT_ROW)
        found = slots >= 0
        rows[found] = self._entry_row[slots[found]].clamp(min=DEFAULT_ROW).to(torch.int64)
        return rows

    def ids_of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Id owning each row (as `take_touched_rows` gives them); EMPTY for the default row and
        free rows."""
        entries = self._row_entries()[rows]
        ids = torch.full_like(entries, EMPTY)
        owned = entries >= 0
        ids[owned] = self._map.ids_of(entries[owned])
        return ids

    def take_touched_rows(self) -> torch.Tensor:
        """Rows whose values changed since the last call and that still belong to an id.

        Includes DEFAULT_ROW when the shared default row was trained. Newly admitted rows count as
        changed. For delta sync: delete `evicted_ids()` first, then write these rows under
        `ids_of_rows(rows)`.
        """
        used = self._rows.high_water
        touched = self._touched[:used] & (self._row_entries() >= 0)
        touched[DEFAULT_ROW] = self._touched[DEFAULT_ROW]
        self._touched.zero_()
        return touched.nonzero().reshape(-1)

    def evicted_ids(self) -> torch.Tensor:
        """Ids that lost their row (expired or evicted) since the last call and have none now."""
        if not self._evicted:
            return torch.empty(0, dtype=torch.int64, device=self.weight.device)
        ids = torch.unique(torch.cat(self._evicted))
        self._evicted = []
        return ids[self._rows_now(ids) == DEFAULT_ROW]

    def export_rows(self, chunk_rows: int = 65536) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (ids, rows) of every admitted id, `chunk_rows` at a time, ordered by row."""
        row_entries = self._row_entries()
        rows = (row_entries >= 0).nonzero().reshape(-1)
        for start in range(0, rows.numel(), chunk_rows):
            chunk = rows[start : start + chunk_rows]
            yield self._map.ids_of(row_entries[chunk]), self.weight[chunk].clone()

    def default_row_values(self) -> torch.Tensor:
        """The vector unknown and not-yet-admitted ids read (zeros with default_row='zeros')."""
        return self.weight[DEFAULT_ROW].clone()

    def load_rows(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Set the rows of `ids` (distinct), admitting absent ones (warm start from an export).

        Loaded ids count as seen `min_count` times now. Raises CapacityError, changing nothing,
        if the new ids do not fit in the capacity left.
        """
        ids = check_ids(ids, f"table {self.config.name!r}: ids")
        if rows.shape != (ids.numel(), self.config.dim):
            raise IdError(
                f"table {self.config.name!r}: rows must have shape ({ids.numel()}, "
                f"{self.config.dim}) for {ids.numel()} ids, got {tuple(rows.shape)}"
            )
        if torch.unique(ids).numel() != ids.numel():
            raise IdError(f"table {self.config.name!r}: load_rows needs distinct ids")
        slots = self._map.lookup(ids)
        has_entry = slots >= 0
        has_row = has_entry.clone()
        has_row[has_entry] = self._entry_row[slots[has_entry]] >= 0
        new_rows = int((~has_row).sum())
        if self.capacity is not None and self.num_admitted + new_rows > self.capacity:
            raise CapacityError(
                f"table {self.config.name!r}: loading {new_rows} new ids needs "
                f"{self.num_admitted + new_rows} rows, capacity is {self.capacity}"
            )
        seen_now = self._seen_index(self._now_us())
        absent = ~has_entry
        slots[absent] = self._new_entries(ids[absent], torch.zeros_like(ids[absent]))
        self._entry_count[slots] = self._entry_count[slots].clamp(min=self.config.method.min_count)
        self._entry_seen[slots] = seen_now
        self._give_rows(slots[~has_row])
        target = self._entry_row[slots].to(torch.int64)
        self.weight[target] = rows.to(device=self.weight.device, dtype=self._dtype)
        self._touched[target] = True

    @property
    def num_admitted(self) -> int:
        """Ids that own a row now."""
        return self._rows.num_in_use - 1

    @property
    def num_tracked(self) -> int:
        """Ids tracked now: admitted ones plus those still counting towards min_count."""
        return len(self._map)

    def stats(self) -> dict[str, int]:
        """Counters since construction (restored by checkpoints): see STAT_NAMES."""
        return dict(self._stats)

    def num_parameters(self) -> int:
        """Trainable values in use: admitted rows, plus the shared default row."""
        rows = self.num_admitted + (1 if self.config.method.default_row == "shared" else 0)
        return rows * self.config.dim

    def memory_bytes(self) -> int:
        """Bytes held now: row storage (allocated), optimizer state, the id map and metadata."""
        return sum(self.memory_breakdown().values())

    def memory_breakdown(self) -> dict[str, int]:
        """memory_bytes by part: `rows`, `optimizer`, `map` and `evicted_ids`.

        `rows` is the allocated row storage; `map` the id map and every per-id and per-row
        bookkeeping tensor; `evicted_ids` the ids that lost their row, held until `evicted_ids()`
        drains them.
        """
        tensors = [
            self._touched,
            self._entry_count,
            self._entry_seen,
            self._entry_row,
            self._seen_times_us,
        ]
        if self._cms is not None:
            tensors.append(self._cms)
        held = sum(t.numel() * t.element_size() for t in tensors)
        return {
            "rows": self.weight.numel() * self.weight.element_size(),
            "optimizer": self._momentum.numel() * self._momentum.element_size(),
            "map": held + self._map.memory_bytes() + self._rows.memory_bytes(),
            "evicted_ids": sum(ids.numel() * ids.element_size() for ids in self._evicted),
        }

    # -- lookup and the fused update -------------------------------------------------------------

    def _lookup(
        self,
        ids: torch.Tensor,
        offsets: torch.Tensor | None,
        per_sample_weights: torch.Tensor | None,
    ) -> torch.Tensor:
        ids = ids.to(self.weight.device)
        if offsets is not None:
            offsets = offsets.to(self.weight.device)
        if not self.training:
            rows = self._rows_now(ids)
            with torch.no_grad():
                return _gather_pool(self, rows, offsets, per_sample_weights)
        rows, step_rows, value_to_step_row = self._map_for_training(ids)
        if not torch.is_grad_enabled():
            return _gather_pool(self, rows, offsets, per_sample_weights)
        # A fresh leaf that requires grad makes autograd call our backward, which updates the
        # rows in place; the table's storage itself is never an autograd input.
        anchor = torch.empty(0, device=self.weight.device, requires_grad=True)
        return _FusedLookup.apply(
            anchor, self, rows, step_rows, value_to_step_row, offsets, per_sample_weights
        )

    def _apply_gradient(self, rows: torch.Tensor, grads: torch.Tensor) -> None:
        """Optimizer step on distinct `rows` with their summed gradients `grads`."""
        if self.config.method.default_row == "zeros":
            keep = rows != DEFAULT_ROW
            rows, grads = rows[keep], grads[keep]
        grads = grads.float()
        optimizer = self.optimizer_config
        current = self.weight[rows].float()
        if optimizer.kind == "rowwise_adagrad":
            accumulator = self._momentum[rows] + grads.pow(2).mean(dim=1)
            self._momentum[rows] = accumulator
            step = optimizer.lr / (accumulator.sqrt() + optimizer.eps)
            updated = current - step.unsqueeze(1) * grads
        else:
            updated = current - optimizer.lr * grads
        self.weight[rows] = updated.to(self._dtype)
        self._touched[rows] = True

    # -- admission, expiry, eviction -------------------------------------------------------------

    def _now_us(self) -> int:
        return round(self._clock() * _US_PER_SECOND)

    def _map_for_training(
        self, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Count, expire, admit; return value rows, the step's distinct rows, value -> those."""
        unique_ids, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
        now = self._now_us()
        self._expire(now)
        seen_now = self._seen_index(now)
        slots = self._map.lookup(unique_ids)
        missing = (slots < 0).nonzero().reshape(-1)
        if missing.numel():
            starting_counts = torch.zeros_like(missing)
            if self._cms is not None:
                estimates = self._cms_add(unique_ids[missing], counts[missing])
                ready = estimates >= self.config.method.min_count
                missing = missing[ready]
                starting_counts = estimates[ready] - counts[missing]
            slots[missing] = self._new_entries(unique_ids[missing], starting_counts)
        present = (slots >= 0).nonzero().reshape(-1)
        seen = slots[present]
        added = self._entry_count[seen] + counts[present]
        self._entry_count[seen] = added.clamp(max=_MAX_COUNT).to(torch.int32)
        self._entry_seen[seen] = seen_now
        waiting = (self._entry_row[seen] < 0) & (
            self._entry_count[seen] >= self.config.method.min_count
        )
        if bool(waiting.any()):
            self._admit(seen[waiting])
        unique_rows = torch.full_like(unique_ids, DEFAULT_ROW)
        unique_rows[present] = self._entry_row[seen].clamp(min=DEFAULT_ROW).to(torch.int64)
        self._bound_pending()
        self._stats["lookups"] += ids.numel()
        self._stats["default_lookups"] += int(counts[unique_rows == DEFAULT_ROW].sum())
        step_rows, unique_to_step_row = torch.unique(unique_rows, return_inverse=True)
        return unique_rows[inverse], step_rows, unique_to_step_row[inverse]

    def _admit(self, waiting: torch.Tensor) -> None:
        """Give rows to the entries in `waiting`, evicting by the policy when at capacity."""
        overflow = (
            0 if self.capacity is None else self.num_admitted + waiting.numel() - self.capacity
        )
        if overflow > 0:
            holders = self._row_entries()
            holders = holders[holders >= 0]
            pool = torch.cat([holders, waiting])
            losers = self._lowest_priority(pool, overflow)
            evicted = pool[losers[losers < holders.numel()]]
            rejected_positions = losers[losers >= holders.numel()] - holders.numel()
            self._remove_entries(evicted, record=True)
            self._stats["evicted_capacity"] += evicted.numel()
            self._stats["rejected"] += rejected_positions.numel()
            keep = torch.ones_like(waiting, dtype=torch.bool)
            keep[rejected_positions] = False
            if self._cms is not None:
                # The sketch keeps their counts; the entries only existed to compete for a row.
                self._remove_entries(waiting[~keep], record=False)
            waiting = waiting[keep]
        self._give_rows(waiting)

    def _give_rows(self, entries: torch.Tensor) -> None:
        """Allocate and initialise a row for each entry (capacity already checked)."""
        if entries.numel() == 0:
            return
        rows = self._rows.allocate(entries.numel())
        self._grow_rows(self._rows.high_water)
        self._entry_row[entries] = rows.to(torch.int32)
        self.weight[rows] = self._initial_values(self._map.ids_of(entries))
        self._momentum[rows] = self.optimizer_config.initial_accumulator_value
        self._touched[rows] = True
        self._stats["admitted"] += entries.numel()

    def _bound_pending(self) -> None:
        """Drop tracked, not-admitted ids beyond `max_pending`, lowest policy priority first.

        Without a bound, exact counting (and LFU rejections, which keep their counts so a rising
        id can overtake a holder) would track every distinct id ever seen.
        """
        if self.max_pending is None:
            return
        excess = self.num_tracked - self.num_admitted - self.max_pending
        if excess <= 0:
            return
        used = self._map.slot_high_water
        pending = (self._map.live_slot_mask() & (self._entry_row[:used] < 0)).nonzero()
        pending = pending.reshape(-1)
        self._remove_entries(pending[self._lowest_priority(pending, excess)], record=False)
        self._stats["forgotten_pending"] += excess

    def _expire(self, now_us: int) -> None:
        if self._ttl_us is None or len(self._map) == 0:
            return
        used = self._map.slot_high_water
        stale_times = now_us - self._seen_times_us[: self._num_seen_times] >= self._ttl_us
        stale = self._map.live_slot_mask() & stale_times[self._entry_seen[:used].to(torch.int64)]
        entries = stale.nonzero().reshape(-1)
        if entries.numel():
            admitted = int((self._entry_row[entries] >= 0).sum())
            self._stats["expired"] += admitted
            self._stats["expired_pending"] += entries.numel() - admitted
            self._remove_entries(entries, record=True)

    def _remove_entries(self, entries: torch.Tensor, *, record: bool) -> None:
        """Forget these entries: free their rows and slots; record admitted ids if `record`."""
        if entries.numel() == 0:
            return
        rows = self._entry_row[entries].to(torch.int64)
        admitted = rows >= 0
        ids = self._map.ids_of(entries)
        if record:
            self._evicted.append(ids[admitted])
        freed = rows[admitted]
        self._touched[freed] = False
        self._rows.release(freed)
        self._entry_row[entries] = -1
        self._entry_count[entries] = 0
        self._entry_seen[entries] = 0
        self._map.remove(ids)

    def _lowest_priority(self, entries: torch.Tensor, count: int) -> torch.Tensor:
        """Positions in `entries` of the `count` entries the policy drops first.

        LRU orders by (last seen, count, id), LFU by (count, last seen, id): the oldest (or least
        frequent) go first, ties broken by the other key and then by the smaller id.
        """
        if count >= entries.numel():
            return torch.arange(entries.numel(), device=entries.device)
        last_seen = self._last_seen_us(entries)
        seen_count = self._entry_count[entries]
        if self.config.method.eviction == "lru":
            primary, secondary = last_seen, seen_count
        else:
            primary, secondary = seen_count, last_seen
        threshold = torch.kthvalue(primary, count).values
        below = (primary < threshold).nonzero().reshape(-1)
        ties = (primary == threshold).nonzero().reshape(-1)
        tie_ids = self._map.ids_of(entries[ties])
        by_id = torch.sort(tie_ids, stable=True).indices
        by_secondary = torch.sort(secondary[ties][by_id], stable=True).indices
        ordered_ties = ties[by_id[by_secondary]]
        return torch.cat([below, ordered_ties[: count - below.numel()]])

    def _new_entries(self, ids: torch.Tensor, starting_counts: torch.Tensor) -> torch.Tensor:
        entries = self._map.insert_new(ids)
        needed = self._map.slot_high_water
        if needed > self._entry_row.numel():
            # 1.125x steps, as the map's slot keys grow: amortised O(1), an eighth idle at most
            size = max(needed, self._entry_row.numel() * 9 // 8)
            self._entry_count = _grown(self._entry_count, size, 0)
            self._entry_seen = _grown(self._entry_seen, size, 0)
            self._entry_row = _grown(self._entry_row, size, -1)
        self._entry_count[entries] = starting_counts.clamp(max=_MAX_COUNT).to(torch.int32)
        self._entry_row[entries] = -1
        return entries

    def _row_entries(self) -> torch.Tensor:
        """Entry owning each row in use, -1 for the default row and free rows (int64).

        Derived from the entry -> row map on each call (one scatter over the entries) rather than
        kept as a second map: the table's only per-row bookkeeping is then the touched flag.
        """
        row_entries = torch.full(
            (self._rows.high_water,), -1, dtype=torch.int64, device=self.weight.device
        )
        entry_rows = self._entry_row[: self._map.slot_high_water]
        owners = (entry_rows >= 0).nonzero().reshape(-1)
        row_entries[entry_rows[owners].to(torch.int64)] = owners
        return row_entries

    def _last_seen_us(self, entries: torch.Tensor) -> torch.Tensor:
        """Last-seen time (int64 microseconds) of live `entries`."""
        return self._seen_times_us[self._entry_seen[entries].to(torch.int64)]

    def _seen_index(self, now_us: int) -> int:
        """Index of `now_us` in the list of distinct last-seen times, appended if new.

        When the list is full it is compacted to the times some live entry still holds (and
        grown if more than half of it is still in use), so it stays a small fraction of the
        entries unless nearly every entry was last seen at a time of its own.
        """
        count = self._num_seen_times
        if count and int(self._seen_times_us[count - 1]) == now_us:
            return count - 1
        if count == self._seen_times_us.numel():
            self._compact_seen_times()
            count = self._num_seen_times
        self._seen_times_us[count] = now_us
        self._num_seen_times = count + 1
        return count

    def _compact_seen_times(self) -> None:
        used = self._map.slot_high_water
        live = self._map.live_slot_mask()
        held, renumbered = torch.unique(self._entry_seen[:used][live], return_inverse=True)
        size = max(_MIN_SEEN_TIMES, 2 * held.numel() + 1)
        times = torch.zeros(size, dtype=torch.int64, device=self._seen_times_us.device)
        times[: held.numel()] = self._seen_times_us[held.to(torch.int64)]
        self._seen_times_us = times
        self._num_seen_times = held.numel()
        entry_seen = torch.zeros_like(self._entry_seen[:used])
        entry_seen[live] = renumbered.to(torch.int32)
        self._entry_seen[:used] = entry_seen

    def _set_seen_times(self, last_seen_us: torch.Tensor, live: torch.Tensor) -> None:
        """Rebuild the entries' time indices and the list of times from int64 last-seen times."""
        times, index = torch.unique(last_seen_us[live], return_inverse=True)
        size = max(_MIN_SEEN_TIMES, 2 * times.numel() + 1)
        self._seen_times_us = torch.zeros(size, dtype=torch.int64, device=last_seen_us.device)
        self._seen_times_us[: times.numel()] = times
        self._num_seen_times = times.numel()
        self._entry_seen = torch.zeros(last_seen_us.numel(), dtype=torch.int32, device=live.device)
        self._entry_seen[live] = index.to(torch.int32)

    def _cms_add(self, ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Add `counts` to the count-min sketch; return each id's estimate after the add."""
        assert self._cms is not None
        depth, width = self._cms.shape
        estimates = None
        for level in range(depth):
            buckets = bucket(ids, self.config.seed + 1 + level, width)
            self._cms[level].index_add_(0, buckets, counts.to(torch.int32))
            level_estimate = self._cms[level][buckets].to(torch.int64)
            estimates = (
                level_estimate if estimates is None else torch.minimum(estimates, level_estimate)
            )
        return estimates

    def _grow_rows(self, needed: int) -> None:
        allocated = self.weight.shape[0]
        if needed <= allocated:
            return
        size = max(needed, (3 * allocated) // 2)
        size = -(-size // self._chunk_rows) * self._chunk_rows
        if self.capacity is not None:
            size = min(size, self.capacity + 1)
        self.weight = _grown(self.weight, size, 0)
        self._momentum = _grown(
            self._momentum, size, self.optimizer_config.initial_accumulator_value
        )
        self._touched = _grown(self._touched, size, False)

    def _initial_values(self, ids: torch.Tensor) -> torch.Tensor:
        """Uniform(-b, b) rows with b = sqrt(1 / num_embeddings), a pure function of (id, seed).

        Derived from the id rather than a generator, so a re-admitted id starts from the same
        values and a restored checkpoint continues exactly without saving generator state.
        """
        dim = self.config.dim
        id_hash = hash64(ids, self.config.seed)
        lanes = torch.arange(dim, dtype=torch.int64, device=ids.device)
        bits = hash64(id_hash.unsqueeze(1) + lanes, self.config.seed)
        unit = ((bits >> 11) & ((1 << 53) - 1)).to(torch.float64) / float(1 << 53)
        return ((2.0 * unit - 1.0) * self._init_bound).to(self._dtype)

    # -- checkpoint: state_dict with variable-size tensors -------------------------------------

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        used_rows = self._rows.high_water
        used_entries = self._map.slot_high_water
        map_state = self._map.state_tensors()
        evicted = (
            torch.cat(self._evicted)
            if self._evicted
            else torch.empty(0, dtype=torch.int64, device=self.weight.device)
        )
        live = self._map.live_slot_mask()
        last_seen_us = torch.zeros(used_entries, dtype=torch.int64, device=self.weight.device)
        last_seen_us[live] = self._last_seen_us(live.nonzero().reshape(-1))
        state = {
            "version": torch.tensor([CHECKPOINT_VERSION], dtype=torch.int64),
            "weight": self.weight[:used_rows],
            "momentum": self._momentum[:used_rows],
            "touched": self._touched[:used_rows],
            "free_rows": self._rows.free_indices(),
            "entry_ids": map_state["slot_ids"],
            "free_entries": map_state["free_slots"],
            "entry_count": self._entry_count[:used_entries].to(torch.int64),
            "entry_last_seen_us": last_seen_us,
            "entry_row": self._entry_row[:used_entries].to(torch.int64),
            "evicted_ids": evicted,
            "stats": torch.tensor([self._stats[name] for name in STAT_NAMES], dtype=torch.int64),
        }
        if self._cms is not None:
            state["cms"] = self._cms
        return state

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for name, tensor in self._state_tensors().items():
            destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        expected = list(self._state_tensors())
        for key in state_dict:
            if key.startswith(prefix) and key[len(prefix) :].split(".", 1)[0] not in expected:
                unexpected_keys.append(key)
        absent = [prefix + name for name in expected if prefix + name not in state_dict]
        if absent:
            missing_keys.extend(absent)
            return
        self._restore({name: state_dict[prefix + name] for name in expected})

    def _restore(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the whole table with `state`, validated first: nothing changes on error."""
        name = self.config.name
        device = self.weight.device
        version = int(state["version"].reshape(-1)[0])
        if version != CHECKPOINT_VERSION:
            raise CheckpointError(
                f"table {name!r}: checkpoint version {version}; this build reads version "
                f"{CHECKPOINT_VERSION}"
            )
        weight = state["weight"].to(device=device, dtype=self._dtype)
        used_rows = weight.shape[0]
        if weight.dim() != 2 or weight.shape[1] != self.config.dim or used_rows < 1:
            raise CheckpointError(
                f"table {name!r}: checkpoint weight has shape {tuple(weight.shape)}; expected "
                f"(rows >= 1, {self.config.dim})"
            )
        if self.capacity is not None and used_rows > self.capacity + 1:
            raise CheckpointError(
                f"table {name!r}: checkpoint holds {used_rows - 1} rows, capacity is "
                f"{self.capacity}"
            )
        entry_ids = state["entry_ids"].to(device=device, dtype=torch.int64)
        used_entries = entry_ids.numel()
        per_entry = ("entry_count", "entry_last_seen_us", "entry_row")
        per_row = ("momentum", "touched")
        if any(state[key].numel() != used_entries for key in per_entry) or any(
            state[key].numel() != used_rows for key in per_row
        ):
            raise CheckpointError(
                f"table {name!r}: checkpoint tensors disagree in length: entry_* must have "
                f"{used_entries} entries and momentum/touched {used_rows} rows"
            )
        if state["stats"].numel() != len(STAT_NAMES):
            raise CheckpointError(
                f"table {name!r}: checkpoint stats has {state['stats'].numel()} counters, "
                f"expected {len(STAT_NAMES)}"
            )
        cms = state.get("cms")
        if cms is not None and (self._cms is None or cms.shape != self._cms.shape):
            raise CheckpointError(
                f"table {name!r}: checkpoint count-min sketch has shape {tuple(cms.shape)}; "
                f"this table's is {None if self._cms is None else tuple(self._cms.shape)}"
            )
        try:
            id_map = IdSlotMap.from_state_tensors(
                entry_ids,
                state["free_entries"],
                seed=self.config.seed,
                max_load=_MAP_MAX_LOAD,
                device=device,
            )
        except IdError as error:
            raise CheckpointError(f"table {name!r}: {error}") from error
        entry_row = state["entry_row"].to(device=device, dtype=torch.int64)
        live = entry_ids != EMPTY
        owned = entry_row >= 0
        owned_rows = entry_row[owned]
        free_rows = state["free_rows"].to(device=device, dtype=torch.int64)
        if (
            bool((owned & ~live).any())
            or bool((owned_rows < 1).any())
            or bool((owned_rows >= used_rows).any())
            or torch.unique(owned_rows).numel() != owned_rows.numel()
            or owned_rows.numel() + free_rows.numel() + 1 != used_rows
        ):
            raise CheckpointError(
                f"table {name!r}: checkpoint rows are inconsistent: each of rows 1..{used_rows - 1}"
                " must belong to exactly one live id or be free"
            )

        size = -(-used_rows // self._chunk_rows) * self._chunk_rows
        if self.capacity is not None:
            size = min(size, self.capacity + 1)
        self.weight = _grown(weight, size, 0)
        self._momentum = _grown(
            state["momentum"].to(device=device, dtype=torch.float32),
            size,
            self.optimizer_config.initial_accumulator_value,
        )
        self._touched = _grown(state["touched"].to(device=device, dtype=torch.bool), size, False)
        self._rows = SlotAllocator(device)
        self._rows.restore(used_rows, free_rows)
        self._map = id_map
        entry_count = state["entry_count"].to(device=device, dtype=torch.int64)
        self._entry_count = entry_count.clamp(max=_MAX_COUNT).to(torch.int32)
        self._set_seen_times(state["entry_last_seen_us"].to(device=device, dtype=torch.int64), live)
        self._entry_row = entry_row.to(torch.int32)
        self._evicted = [state["evicted_ids"].to(device=device, dtype=torch.int64).clone()]
        self._stats = dict(zip(STAT_NAMES, state["stats"].tolist(), strict=True))
        if cms is not None:
            self._cms = cms.to(device=device, dtype=torch.int32).clone()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        """Move (or cast) the row storage with the module; metadata follows the device only."""
        super()._apply(fn, recurse)
        self.weight = fn(self.weight)
        device = self.weight.device
        self._momentum = self._momentum.to(device)
        self._touched = self._touched.to(device)
        self._entry_count = self._entry_count.to(device)
        self._entry_seen = self._entry_seen.to(device)
        self._seen_times_us = self._seen_times_us.to(device)
        self._entry_row = self._entry_row.to(device)
        if self._cms is not None:
            self._cms = self._cms.to(device)
        self._evicted = [ids.to(device) for ids in self._evicted]
        self._map.to(device)
        self._rows.to(device)
        self._dtype = self.weight.dtype
        return self

    def extra_repr(self) -> str:
        return (
            f"name={self.config.name!r}, dim={self.config.dim}, admitted={self.num_admitted}, "
            f"capacity={self.capacity}, min_count={self.config.method.min_count}, "
            f"eviction={self.config.method.eviction}, ttl_seconds={self.config.method.ttl_seconds}"
        )


class _FusedLookup(torch.autograd.Function):
    """Gather + pool forward; backward aggregates per row and applies the table's optimizer."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        anchor: torch.Tensor,
        table: CollisionlessTable,
        rows: torch.Tensor,
        step_rows: torch.Tensor,
        value_to_step_row: torch.Tensor,
        offsets: torch.Tensor | None,
        per_sample_weights: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.table = table
        ctx.has_offsets = offsets is not None
        ctx.has_weights = per_sample_weights is not None
        ctx.save_for_backward(
            rows,
            step_rows,
            value_to_step_row,
            offsets if offsets is not None else rows[:0],
            per_sample_weights if per_sample_weights is not None else rows[:0],
        )
        return _gather_pool(table, rows, offsets, per_sample_weights)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor) -> tuple:
        rows, step_rows, value_to_step_row, offsets, weights = ctx.saved_tensors
        table: CollisionlessTable = ctx.table
        grad_output = grad_output.float()
        if ctx.has_offsets:
            lengths = offsets[1:] - offsets[:-1]
            bag_of_value = torch.repeat_interleave(
                torch.arange(lengths.numel(), device=rows.device), lengths
            )
            value_grads = grad_output[bag_of_value]
            if table.config.pooling == "mean":
                value_grads = value_grads / lengths[bag_of_value].unsqueeze(1).float()
        else:
            value_grads = grad_output
        weights_grad = None
        if ctx.has_weights:
            if ctx.needs_input_grad[6]:
                gathered = table.weight[rows].float()
                weights_grad = (value_grads * gathered).sum(dim=1).to(weights.dtype)
            value_grads = value_grads * weights.float().unsqueeze(1)
        row_grads = torch.zeros(
            (step_rows.numel(), value_grads.shape[1]), dtype=torch.float32, device=rows.device
        )
        row_grads.index_add_(0, value_to_step_row, value_grads)
        table._apply_gradient(step_rows, row_grads)
        return None, None, None, None, None, None, weights_grad


def _gather_pool(
    table: CollisionlessTable,
    rows: torch.Tensor,
    offsets: torch.Tensor | None,
    per_sample_weights: torch.Tensor | None,
) -> torch.Tensor:
    weight = table.weight
    if offsets is None:
        return weight.index_select(0, rows)
    mean = table.config.pooling == "mean"
    if per_sample_weights is None or not mean:
        weights = None if per_sample_weights is None else per_sample_weights.to(weight.dtype)
        return F.embedding_bag(
            rows,
            weight,
            offsets,
            mode="mean" if mean else "sum",
            per_sample_weights=weights,
            include_last_offset=True,
        )
    summed = F.embedding_bag(
        rows,
        weight,
        offsets,
        mode="sum",
        per_sample_weights=per_sample_weights.to(weight.dtype),
        include_last_offset=True,
    )
    lengths = (offsets[1:] - offsets[:-1]).clamp(min=1).unsqueeze(1)
    return summed / lengths.to(summed.dtype)


def _check_offsets(offsets: torch.Tensor, num_values: int, table: str) -> torch.Tensor:
    if offsets.dtype not in (torch.int64, torch.int32) or offsets.dim() != 1:
        raise IdError(
            f"table {table!r}: offsets must be a 1-D int64 tensor of B + 1 bag starts, got "
            f"{offsets.dtype} with shape {tuple(offsets.shape)}"
        )
    offsets = offsets.to(torch.int64)
    if (
        offsets.numel() < 1
        or int(offsets[0]) != 0
        or int(offsets[-1]) != num_values
        or bool((offsets[1:] < offsets[:-1]).any())
    ):
        raise IdError(
            f"table {table!r}: offsets must start at 0, never decrease and end at the number of "
            f"values ({num_values})"
        )
    return offsets


def _grown(tensor: torch.Tensor, size: int, fill: float | int | bool) -> torch.Tensor:
    """`tensor` copied into a new tensor of `size` rows, the new rows set to `fill`."""
    grown = torch.full((size, *tensor.shape[1:]), fill, dtype=tensor.dtype, device=tensor.device)
    grown[: tensor.shape[0]] = tensor
    return grown


def _default_cms_width(expected_ids: int) -> int:
    """A power of two near 4x the ids expected, between 2^10 and 2^20 (at most 4 MiB a level)."""
    target = min(max(4 * expected_ids, 1 << 10), 1 << 20)
    return 1 << (target - 1).bit_length()
