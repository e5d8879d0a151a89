"""The collisionless table's lean bookkeeping: bytes per tracked id, exact times, saturation."""

from __future__ import annotations

import torch

from embedding_tables.collisionless import CollisionlessTable
from embedding_tables.config import TableConfig
from embedding_tables.idmap import IdSlotMap, SlotAllocator
from tests.embedding_tables.test_collisionless import Clock, make_table


def _held_tensors(holder: object) -> list[torch.Tensor]:
    """Every tensor an object holds, through lists and the id map and allocators it owns."""
    found = []
    for value in vars(holder).values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, list):
            found.extend(item for item in value if isinstance(item, torch.Tensor))
        elif isinstance(value, IdSlotMap | SlotAllocator):
            found.extend(_held_tensors(value))
    return found


def _filled_table(batches: int, ids_per_batch: int) -> CollisionlessTable:
    config = TableConfig(name="item_id", num_embeddings=10**6, dim=16, method="collisionless")
    table = CollisionlessTable(config, clock=Clock())
    table.train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randperm(10**7, generator=generator)[: batches * ids_per_batch] * 7919
    for batch in ids.reshape(batches, ids_per_batch):
        table.map_ids(batch)
    return table


def test_map_and_bookkeeping_take_at_most_32_bytes_per_tracked_id() -> None:
    table = _filled_table(batches=6, ids_per_batch=12_000)
    assert table.num_tracked == 72_000
    assert table.memory_breakdown()["map"] / table.num_tracked <= 32


def test_memory_breakdown_counts_every_tensor_the_table_holds() -> None:
    clock = Clock()
    table = make_table(clock, min_count=2, capacity=20, eviction="lru", ttl_seconds=3)
    table.train()
    for start in range(0, 200, 10):
        clock.now += 1
        table.map_ids(torch.arange(start, start + 30))
    assert table.stats()["evicted_capacity"] > 0
    held = sum(t.numel() * t.element_size() for t in _held_tensors(table))
    assert table.memory_bytes() == held


def test_last_seen_times_stay_exact_through_thousands_of_distinct_times() -> None:
    clock = Clock(1_700_000_000.0)
    table = make_table(clock, ttl_seconds=0.5)
    table.train()
    generator = torch.Generator().manual_seed(3)
    last_seen_us: dict[int, int] = {}
    for _ in range(3000):  # more distinct times than the list holds before its first compaction
        clock.now += 0.0007
        now_us = round(clock.now * 1_000_000)
        ids = torch.randint(0, 400, (5,), generator=generator)
        table.map_ids(ids)
        last_seen_us.update(dict.fromkeys(ids.tolist(), now_us))
        last_seen_us = {i: t for i, t in last_seen_us.items() if now_us - t < 500_000}
    state = table.state_dict()
    live = state["entry_ids"] != torch.iinfo(torch.int64).min
    saved = dict(
        zip(
            state["entry_ids"][live].tolist(),
            state["entry_last_seen_us"][live].tolist(),
            strict=True,
        )
    )
    assert saved == last_seen_us


def test_counts_saturate_at_the_int32_maximum() -> None:
    table = make_table(min_count=2)
    table.train()
    table.map_ids(torch.tensor([5, 5, 6]))
    state = table.state_dict()
    state["entry_count"] = state["entry_count"] + 2**40
    table.load_state_dict(state)
    table.map_ids(torch.tensor([5, 6, 6]))
    assert table.state_dict()["entry_count"].tolist() == [2**31 - 1, 2**31 - 1]
