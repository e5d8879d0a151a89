"""A vectorised int64 id -> dense slot map: open addressing with linear probing over tensors.

The collisionless table and GraphHash's incremental mapping need to map a batch of raw 64-bit
ids to dense indices (slots) fast, insert the misses, and delete expired or evicted ids. A Python
dict costs a bytecode loop per id; this map does every batch operation as a handful of tensor
ops: each probe round is one gather and one compare over the ids still unresolved, and with the
load kept at or below one half almost every id resolves in the first or second round.

Layout: `buckets[b]` is an int32 slot (EMPTY_BUCKET or DELETED_BUCKET for a free bucket) and
`slot_keys[slot]` the int64 id it holds, so a probe is two gathers (bucket, then its slot's key)
and the map costs 4 bytes per bucket plus 8 per slot, about 16-24 bytes per id at load 0.5 rather
than the 40-72 of (id, slot) int64 pairs. Slots are dense indices handed out by a
`SlotAllocator`, so callers keep per-id metadata in plain tensors indexed by slot; there are at
most 2^31 - 1 of them. Two int64 values are reserved and cannot be ids: EMPTY (the smallest
int64), which marks a free slot, and DELETED (EMPTY + 1), kept reserved so that saved maps and
the callers' checks stay as they were.
"""

from __future__ import annotations

import torch

from embedding_tables.errors import IdError
from embedding_tables.hashing import hash64

EMPTY = torch.iinfo(torch.int64).min
DELETED = EMPTY + 1
EMPTY_BUCKET = -1
DELETED_BUCKET = -2
MAX_SLOTS = torch.iinfo(torch.int32).max


def check_ids(ids: torch.Tensor, what: str = "ids") -> torch.Tensor:
    """Return `ids` as a flat int64 tensor, or raise IdError if they cannot be map keys."""
    if ids.dtype not in (torch.int64, torch.int32):
        raise IdError(f"{what} must be an int64 (or int32) tensor, got dtype {ids.dtype}")
    ids = ids.reshape(-1).to(torch.int64)
    if ids.numel() and bool((ids <= DELETED).any()):
        raise IdError(
            f"{what} contain a reserved value: {EMPTY} and {DELETED} mark empty and deleted "
            f"buckets; every other int64 is accepted"
        )
    return ids


class SlotAllocator:
    """Hands out dense indices 0, 1, 2, ...; reuses released ones first, last released first.

    Reusing freed indices keeps tensors indexed by slot (or by row) as small as the peak number
    of live entries rather than the number of entries ever created. The released ones are kept
    as int32 (indices stay below 2^31); `allocate` hands out int64.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self._free = torch.empty(0, dtype=torch.int32, device=device)
        self._num_free = 0
        self.high_water = 0

    @property
    def num_in_use(self) -> int:
        return self.high_water - self._num_free

    def free_indices(self) -> torch.Tensor:
        """The released indices, oldest release first (`allocate` takes from the end)."""
        return self._free[: self._num_free].to(torch.int64)

    def allocate(self, count: int) -> torch.Tensor:
        """`count` indices: the most recently released first, then new ones above high_water."""
        reused = min(count, self._num_free)
        taken = self._free[self._num_free - reused : self._num_free].flip(0).to(torch.int64)
        self._num_free -= reused
        fresh = torch.arange(
            self.high_water,
            self.high_water + count - reused,
            dtype=torch.int64,
            device=self._free.device,
        )
        self.high_water += count - reused
        return torch.cat([taken, fresh])

    def release(self, indices: torch.Tensor) -> None:
        """Give `indices` (distinct, currently allocated) back for reuse."""
        count = indices.numel()
        if count == 0:
            return
        needed = self._num_free + count
        if needed > self._free.numel():
            grown = torch.empty(max(needed, 2 * self._free.numel()), dtype=torch.int32)
            grown = grown.to(self._free.device)
            grown[: self._num_free] = self._free[: self._num_free]
            self._free = grown
        self._free[self._num_free : needed] = indices.reshape(-1)
        self._num_free = needed

    def restore(self, high_water: int, free_indices: torch.Tensor) -> None:
        """Reset to a state saved with `high_water` and `free_indices()`."""
        self._free = free_indices.to(torch.int32).reshape(-1).clone()
        self._num_free = self._free.numel()
        self.high_water = int(high_water)

    def to(self, device: torch.device | str) -> None:
        self._free = self._free.to(device)

    def memory_bytes(self) -> int:
        return self._free.numel() * self._free.element_size()


class IdSlotMap:
    """Maps int64 ids to dense slots; every operation takes a whole batch of ids at once.

    `seed` picks the bucket hash (the package's `hash64`), so two maps with different seeds probe
    differently; the id -> slot assignment never depends on the bucket layout, only on the order
    of inserts and removals.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        max_load: float = 0.5,
        initial_buckets: int = 1024,
        device: torch.device | str | None = None,
    ) -> None:
        if not 0.0 < max_load < 1.0:
            raise ValueError(f"max_load must be in (0, 1), got {max_load}")
        self._seed = seed
        self._max_load = max_load
        self._slots = SlotAllocator(device)
        self._slot_keys = torch.full((0,), EMPTY, dtype=torch.int64, device=device)
        self._size = 0
        self._num_deleted = 0
        self._allocate_buckets(_next_power_of_two(max(initial_buckets, 8)), device)

    def __len__(self) -> int:
        return self._size

    @property
    def device(self) -> torch.device:
        return self._buckets.device

    @property
    def slot_high_water(self) -> int:
        """One past the largest slot ever handed out: the length per-slot tensors need."""
        return self._slots.high_water

    @property
    def num_buckets(self) -> int:
        return self._buckets.shape[0]

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Slot of each id, -1 where absent. Duplicates in `ids` are fine."""
        return self._find(ids.reshape(-1))[1]

    def insert_new(self, ids: torch.Tensor) -> torch.Tensor:
        """Insert ids that are distinct and absent (the caller checked with `lookup`); their slots.

        The precondition is not checked, to keep inserts at one probe pass; `get_or_insert` is the
        checked form.
        """
        ids = ids.reshape(-1)
        count = ids.numel()
        if count == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        self._reserve(count)
        slots = self._slots.allocate(count)
        if self._size == 0 and self._num_deleted == 0:
            self._place_into_empty(ids, slots)
        else:
            self._place(ids, slots)
        if self._slots.high_water > self._slot_keys.numel():
            # 1.125x steps: amortised O(1) copies, and at most an eighth of the keys' bytes idle
            grown = torch.full(
                (max(self._slots.high_water, self._slot_keys.numel() * 9 // 8),),
                EMPTY,
                dtype=torch.int64,
                device=self.device,
            )
            grown[: self._slot_keys.numel()] = self._slot_keys
            self._slot_keys = grown
        self._slot_keys[slots] = ids
        self._size += count
        return slots

    def get_or_insert(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot of each id, inserting the absent ones; also a mask of the ids that were inserted."""
        ids = ids.reshape(-1)
        unique_ids, inverse = torch.unique(ids, return_inverse=True)
        slots = self.lookup(unique_ids)
        missing = slots < 0
        slots[missing] = self.insert_new(unique_ids[missing])
        return slots[inverse], missing[inverse]

    def remove(self, ids: torch.Tensor) -> torch.Tensor:
        """Remove distinct ids; their former slots (now free for reuse), -1 where absent."""
        positions, slots = self._find(ids.reshape(-1))
        found = positions >= 0
        hit_positions = positions[found]
        self._buckets[hit_positions] = DELETED_BUCKET
        freed = slots[found]
        self._slot_keys[freed] = EMPTY
        self._slots.release(freed)
        removed = hit_positions.numel()
        self._size -= removed
        self._num_deleted += removed
        return slots

    def ids_of(self, slots: torch.Tensor) -> torch.Tensor:
        """The id held in each slot (EMPTY for a free slot)."""
        return self._slot_keys[slots]

    def live_slot_mask(self) -> torch.Tensor:
        """Bool mask over slots [0, slot_high_water): True where the slot holds an id."""
        return self._slot_keys[: self.slot_high_water] != EMPTY

    def items(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All (ids, slots), ordered by slot."""
        slots = self.live_slot_mask().nonzero().reshape(-1)
        return self._slot_keys[slots], slots

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What `from_state_tensors` needs to rebuild this map exactly (slot for slot)."""
        return {
            "slot_ids": self._slot_keys[: self.slot_high_water].clone(),
            "free_slots": self._slots.free_indices(),
        }

    @classmethod
    def from_state_tensors(
        cls,
        slot_ids: torch.Tensor,
        free_slots: torch.Tensor,
        *,
        seed: int = 0,
        max_load: float = 0.5,
        device: torch.device | str | None = None,
    ) -> IdSlotMap:
        """Rebuild a map saved with `state_tensors`; raises IdError if the two do not agree."""
        slot_ids = slot_ids.to(device=device, dtype=torch.int64).reshape(-1)
        free_slots = free_slots.to(device=device, dtype=torch.int64).reshape(-1)
        live = slot_ids != EMPTY
        free_mask = torch.zeros_like(live)
        if free_slots.numel():
            if int(free_slots.min()) < 0 or int(free_slots.max()) >= slot_ids.numel():
                raise IdError("saved id map: a free slot lies outside the saved slots")
            free_mask[free_slots] = True
        if int(free_mask.sum()) != free_slots.numel() or bool((live == free_mask).any()):
            raise IdError(
                "saved id map is inconsistent: every slot must be either live (an id) or free "
                "(listed once in free_slots)"
            )
        live_ids = slot_ids[live]
        if live_ids.numel() and (
            bool((live_ids <= DELETED).any()) or torch.unique(live_ids).numel() != live_ids.numel()
        ):
            raise IdError("saved id map holds a reserved or duplicate id")
        id_map = cls(
            seed=seed,
            max_load=max_load,
            initial_buckets=int(live_ids.numel() / max_load) + 1,
            device=device,
        )
        id_map._place_into_empty(live_ids, live.nonzero().reshape(-1))
        id_map._slot_keys = slot_ids.clone()
        id_map._slots.restore(slot_ids.numel(), free_slots)
        id_map._size = live_ids.numel()
        return id_map

    def to(self, device: torch.device | str) -> None:
        """Move every tensor of the map to `device`."""
        self._buckets = self._buckets.to(device)
        self._slot_keys = self._slot_keys.to(device)
        self._slots.to(device)

    def memory_bytes(self) -> int:
        tensors = (self._buckets, self._slot_keys)
        return sum(t.numel() * t.element_size() for t in tensors) + self._slots.memory_bytes()

    # -- internals ---------------------------------------------------------------------------

    def _allocate_buckets(self, num_buckets: int, device: torch.device | str | None) -> None:
        self._buckets = torch.full((num_buckets,), EMPTY_BUCKET, dtype=torch.int32, device=device)
        self._mask = num_buckets - 1

    def _home(self, ids: torch.Tensor) -> torch.Tensor:
        return hash64(ids, self._seed) & self._mask

    def _find(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket and slot of each id, both -1 where absent."""
        positions_out = torch.full_like(ids, -1)
        if self._size == 0 or ids.numel() == 0:
            return positions_out, positions_out.clone()
        positions = self._home(ids)
        slots = self._buckets.index_select(0, positions).to(torch.int64)
        hit = self._slot_keys.index_select(0, slots.clamp(min=0)) == ids
        hit &= slots >= 0
        positions_out = torch.where(hit, positions, -1)
        slots_out = torch.where(hit, slots, -1)
        pending = ((~hit) & (slots != EMPTY_BUCKET)).nonzero().reshape(-1)
        positions = positions[pending]
        while pending.numel():
            positions = (positions + 1) & self._mask
            slots = self._buckets.index_select(0, positions).to(torch.int64)
            hit = self._slot_keys.index_select(0, slots.clamp(min=0)) == ids[pending]
            hit &= slots >= 0
            resolved = pending[hit]
            positions_out[resolved] = positions[hit]
            slots_out[resolved] = slots[hit]
            go_on = (~hit) & (slots != EMPTY_BUCKET)
            pending = pending[go_on]
            positions = positions[go_on]
        return positions_out, slots_out

    def _place(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """Write the slots of absent, distinct ids into free buckets (capacity already reserved)."""
        positions = self._home(ids)
        slots = slots.to(torch.int32)
        while ids.numel():
            held = self._buckets[positions]
            open_bucket = held < 0
            candidates = open_bucket.nonzero().reshape(-1)
            candidate_positions = positions[candidates]
            # Several ids may race for one open bucket: write all their slots, then read back
            # which slot the bucket holds; that one won, the others probe on. The winner may vary
            # between runs, the id -> slot assignment never does.
            self._buckets[candidate_positions] = slots[candidates]
            won = self._buckets[candidate_positions] == slots[candidates]
            winners = candidates[won]
            if self._num_deleted:
                self._num_deleted -= int((held[winners] == DELETED_BUCKET).sum())
            left = ~open_bucket
            left[candidates[~won]] = True
            ids, slots = ids[left], slots[left]
            positions = (positions[left] + 1) & self._mask

    def _place_into_empty(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """`_place` for an empty table (growth, restore), in one pass instead of probe rounds.

        Sorted by home bucket, id i of a run lands at max(home_i, position_{i-1} + 1): linear
        probing's layout, computed as i + cummax(home_j - j). Every bucket between an id's home
        and its position is then occupied, so lookups find it. Ids whose run would pass the
        last bucket wrap around through `_place`.
        """
        if ids.numel() == 0:
            return
        homes, order = torch.sort(self._home(ids))
        index = torch.arange(ids.numel(), dtype=torch.int64, device=ids.device)
        positions = index + torch.cummax(homes - index, dim=0).values
        ordered_slots = slots.to(torch.int32).index_select(0, order)
        # positions increase with the sorted homes, so the ids that wrap are a suffix
        inside = int(torch.searchsorted(positions, self.num_buckets))
        self._buckets.index_copy_(0, positions[:inside], ordered_slots[:inside])
        if inside < ids.numel():
            self._place(ids.index_select(0, order[inside:]), ordered_slots[inside:])

    def _reserve(self, incoming: int) -> None:
        """Grow (or purge deleted markers) so `incoming` more ids keep the load <= max_load."""
        if self._slots.num_in_use + incoming > MAX_SLOTS:
            raise IdError(
                f"the id map holds {self._slots.num_in_use} ids and cannot take {incoming} more: "
                f"at most {MAX_SLOTS} ids (int32 slots)"
            )
        capacity = int(self.num_buckets * self._max_load)
        if self._size + self._num_deleted + incoming <= capacity:
            return
        needed = _next_power_of_two(int((self._size + incoming) / self._max_load) + 1)
        live_ids, live_slots = self.items()
        self._allocate_buckets(max(needed, self.num_buckets), self.device)
        self._num_deleted = 0
        self._place_into_empty(live_ids, live_slots)


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, (int(value) - 1).bit_length())
