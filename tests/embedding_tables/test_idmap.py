"""The vectorised id -> slot map against a Python dict, and its reserved values and state."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embedding_tables.errors import IdError
from embedding_tables.idmap import DELETED, EMPTY, IdSlotMap, SlotAllocator, check_ids


def test_insert_lookup_remove_small() -> None:
    id_map = IdSlotMap(initial_buckets=8)
    slots = id_map.insert_new(torch.tensor([10, -3, 2**62]))
    assert slots.tolist() == [0, 1, 2]
    assert id_map.lookup(torch.tensor([2**62, 10, 7, -3, 10])).tolist() == [2, 0, -1, 1, 0]
    assert id_map.remove(torch.tensor([-3, 99])).tolist() == [1, -1]
    assert len(id_map) == 2
    assert id_map.lookup(torch.tensor([-3])).tolist() == [-1]
    # the freed slot is handed out again before a new one
    assert id_map.insert_new(torch.tensor([5])).tolist() == [1]
    assert id_map.ids_of(torch.tensor([0, 1, 2])).tolist() == [10, 5, 2**62]


def test_growth_keeps_every_id() -> None:
    id_map = IdSlotMap(initial_buckets=8)
    ids = torch.randperm(50_000) * 7919 - 123_456
    slots = id_map.insert_new(ids)
    assert id_map.num_buckets >= 2 * len(ids)
    assert torch.equal(id_map.lookup(ids), slots)
    assert torch.unique(slots).numel() == ids.numel()


def test_many_deletes_do_not_grow_without_bound() -> None:
    id_map = IdSlotMap(initial_buckets=1024)
    for round_index in range(50):
        ids = torch.arange(300) + round_index * 1000
        id_map.insert_new(ids)
        id_map.remove(ids)
    assert len(id_map) == 0
    assert id_map.num_buckets == 1024  # deleted markers were purged, not grown over
    assert id_map.slot_high_water == 300


def test_get_or_insert_handles_duplicates_and_present_ids() -> None:
    id_map = IdSlotMap()
    id_map.insert_new(torch.tensor([4, 5]))
    slots, inserted = id_map.get_or_insert(torch.tensor([5, 6, 6, 4, 7]))
    assert inserted.tolist() == [False, True, True, False, True]
    assert slots[1] == slots[2]
    assert torch.equal(id_map.lookup(torch.tensor([5, 6, 6, 4, 7])), slots)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["insert", "remove", "lookup"]),
            st.lists(st.integers(min_value=-(2**63) + 2, max_value=2**63 - 1), max_size=40),
        ),
        max_size=30,
    )
)
def test_matches_a_dict(operations: list[tuple[str, list[int]]]) -> None:
    id_map = IdSlotMap(initial_buckets=8)
    reference: dict[int, int] = {}
    for operation, raw in operations:
        ids = torch.tensor(raw, dtype=torch.int64)
        if operation == "insert":
            slots, _ = id_map.get_or_insert(ids)
            for key, slot in zip(raw, slots.tolist(), strict=True):
                assert reference.setdefault(key, slot) == slot
        elif operation == "remove":
            distinct = list(dict.fromkeys(raw))
            removed = id_map.remove(torch.tensor(distinct, dtype=torch.int64))
            for key, slot in zip(distinct, removed.tolist(), strict=True):
                assert reference.pop(key, -1) == slot
        found = id_map.lookup(ids).tolist()
        assert found == [reference.get(key, -1) for key in raw]
        assert len(id_map) == len(reference)
    assert sorted(reference.values()) == sorted(id_map.items()[1].tolist())


def test_reserved_values_and_dtypes_are_rejected() -> None:
    with pytest.raises(IdError, match="reserved"):
        check_ids(torch.tensor([1, EMPTY]))
    with pytest.raises(IdError, match="reserved"):
        check_ids(torch.tensor([DELETED]))
    with pytest.raises(IdError, match="int64"):
        check_ids(torch.tensor([1.0]))
    assert check_ids(torch.tensor([[1, 2]], dtype=torch.int32)).dtype == torch.int64


def test_state_round_trip_is_slot_exact() -> None:
    id_map = IdSlotMap(seed=3)
    id_map.insert_new(torch.arange(100) * 3)
    id_map.remove(torch.tensor([0, 30, 60]))
    state = id_map.state_tensors()
    restored = IdSlotMap.from_state_tensors(state["slot_ids"], state["free_slots"], seed=3)
    probe = torch.arange(-5, 400)
    assert torch.equal(restored.lookup(probe), id_map.lookup(probe))
    new_ids = torch.tensor([1000, 1001, 1002, 1003])
    assert torch.equal(restored.insert_new(new_ids), id_map.insert_new(new_ids))


def test_inconsistent_state_is_rejected() -> None:
    with pytest.raises(IdError, match="inconsistent"):
        IdSlotMap.from_state_tensors(torch.tensor([5, EMPTY]), torch.tensor([0]))
    with pytest.raises(IdError, match="duplicate"):
        IdSlotMap.from_state_tensors(torch.tensor([5, 5]), torch.tensor([], dtype=torch.int64))


def test_slot_allocator_reuses_last_released_first() -> None:
    allocator = SlotAllocator()
    assert allocator.allocate(4).tolist() == [0, 1, 2, 3]
    allocator.release(torch.tensor([1, 3]))
    assert allocator.num_in_use == 2
    assert allocator.allocate(3).tolist() == [3, 1, 4]
