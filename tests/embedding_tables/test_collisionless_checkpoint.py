"""Checkpoint round trip: train, save to safetensors, restore, continue == never interrupted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from embedding_tables.collisionless import CheckpointError, CollisionlessTable
from embedding_tables.config import TableConfig
from embedding_tables.optimizer import SparseOptimizerConfig

CONFIGS = {
    "exact-lru-ttl": dict(min_count=2, capacity=40, eviction="lru", ttl_seconds=5.0),
    "cms-lfu": dict(min_count=3, admission="cms", capacity=30, eviction="lfu"),
    "unbounded-fp16-zeros": dict(dtype="fp16", default_row="zeros", ttl_seconds=3.0),
}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def make_table(options: dict, clock: Clock) -> CollisionlessTable:
    config = TableConfig.from_fields(
        {"name": "user_id", "num_embeddings": 500, "dim": 8, "method": "collisionless", "seed": 7}
        | options
    )
    optimizer = SparseOptimizerConfig(lr=0.05, initial_accumulator_value=0.01)
    return CollisionlessTable(config, optimizer, clock=clock, chunk_rows=16)


def batches(count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(count):
        lengths = torch.randint(0, 6, (16,), generator=generator)
        values = (torch.rand(int(lengths.sum()), generator=generator) ** 3 * 120).long() * 977
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        target = torch.randn(16, 8, generator=generator)
        result.append((values, offsets, target))
    return result


def train(table: CollisionlessTable, clock: Clock, stream: list) -> list[tuple]:
    """Run the stream; per step the output and what delta sync would read."""
    observed = []
    for values, offsets, target in stream:
        clock.now += 0.75
        output = table.pooled(values, offsets)
        (output.float() * target).sum().backward()
        observed.append((output.detach(), table.take_touched_rows(), table.evicted_ids()))
    return observed


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_restore_then_continue_equals_uninterrupted(name: str, tmp_path: Path) -> None:
    first, second = batches(8, seed=1), batches(8, seed=2)

    clock = Clock()
    uninterrupted = make_table(CONFIGS[name], clock)
    train(uninterrupted, clock, first)
    expected = train(uninterrupted, clock, second)

    clock = Clock()
    before = make_table(CONFIGS[name], clock)
    train(before, clock, first)
    path = tmp_path / "table.safetensors"
    save_file(before.state_dict(), str(path))
    restored = make_table(CONFIGS[name], clock)
    restored.load_state_dict(load_file(str(path)))
    assert restored.stats() == before.stats()
    observed = train(restored, clock, second)

    for (out_a, touched_a, evicted_a), (out_b, touched_b, evicted_b) in zip(
        expected, observed, strict=True
    ):
        assert torch.equal(out_a, out_b)
        assert torch.equal(touched_a, touched_b)
        assert torch.equal(evicted_a, evicted_b)
    final_a, final_b = uninterrupted.state_dict(), restored.state_dict()
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        assert torch.equal(final_a[key], final_b[key]), key
    assert uninterrupted.stats()["admitted"] > 0


def test_a_bad_checkpoint_raises_and_changes_nothing() -> None:
    clock = Clock()
    table = make_table(CONFIGS["exact-lru-ttl"], clock)
    train(table, clock, batches(3, seed=3))
    state = {key: tensor.clone() for key, tensor in table.state_dict().items()}
    before = {key: tensor.clone() for key, tensor in state.items()}

    wrong_version = dict(state, version=torch.tensor([99]))
    with pytest.raises(CheckpointError, match="version 99"):
        table.load_state_dict(wrong_version)
    broken_rows = dict(state, entry_row=torch.zeros_like(state["entry_row"]))
    with pytest.raises(CheckpointError, match="rows are inconsistent"):
        table.load_state_dict(broken_rows)
    with pytest.raises(RuntimeError, match="Missing key"):
        table.load_state_dict({k: v for k, v in state.items() if k != "entry_count"})

    after = table.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
