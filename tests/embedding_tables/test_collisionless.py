"""The collisionless table: admission, expiry, eviction order, capacity, lookups and updates."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embedding_tables.collisionless import DEFAULT_ROW, CapacityError, CollisionlessTable
from embedding_tables.config import TableConfig
from embedding_tables.errors import BudgetError, ConfigError, IdError
from embedding_tables.methods import Collisionless
from embedding_tables.optimizer import SparseOptimizerConfig


class Clock:
    """A clock tests move by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_table(
    clock: Clock | None = None, optimizer: SparseOptimizerConfig | None = None, **options: object
) -> CollisionlessTable:
    common = {key: options.pop(key) for key in ("budget", "dtype", "pooling") if key in options}
    config = TableConfig(
        name="item_id",
        num_embeddings=options.pop("num_embeddings", 1000),
        dim=options.pop("dim", 4),
        method=Collisionless(**options),
        **common,
    )
    return CollisionlessTable(config, optimizer, clock=clock or Clock(), chunk_rows=4)


def step(table: CollisionlessTable, ids: list[int]) -> torch.Tensor:
    """One training step: every id its own bag, loss = sum of outputs."""
    values = torch.tensor(ids, dtype=torch.int64)
    output = table.pooled(values, torch.arange(len(ids) + 1))
    output.sum().backward()
    return output.detach()


def admitted(table: CollisionlessTable, ids: list[int]) -> list[bool]:
    return (table.rows_of(torch.tensor(ids)) != DEFAULT_ROW).tolist()


@pytest.mark.parametrize("admission", ["exact", "cms"])
def test_an_id_gets_a_row_after_min_count_sightings(admission: str) -> None:
    table = make_table(min_count=3, admission=admission)
    default_before = table.default_row_values()
    step(table, [7])
    step(table, [7])
    assert admitted(table, [7]) == [False]
    assert table.num_admitted == 0
    # the shared default row learned from id 7's gradients; id 7 has nothing of its own yet
    assert not torch.equal(table.default_row_values(), default_before)
    step(table, [7])
    assert admitted(table, [7]) == [True]
    assert table.stats()["admitted"] == 1


def test_sightings_within_one_batch_count() -> None:
    table = make_table(min_count=3)
    step(table, [5, 5, 5, 6, 6])
    assert admitted(table, [5, 6]) == [True, False]


def test_zeros_default_row_reads_zeros_and_never_trains() -> None:
    table = make_table(min_count=2, default_row="zeros")
    output = step(table, [1, 2])
    assert torch.count_nonzero(output) == 0
    step(table, [3])
    assert torch.count_nonzero(table.default_row_values()) == 0
    assert table.num_parameters() == 0


def test_expiry_follows_the_clock() -> None:
    clock = Clock()
    table = make_table(clock, ttl_seconds=60)
    step(table, [1, 2])
    row_of_1 = int(table.rows_of(torch.tensor([1])))
    clock.now += 30
    step(table, [2])
    clock.now += 59.9
    step(table, [3])  # expiry runs first, so 3 takes the row 1 freed
    assert admitted(table, [1, 2, 3]) == [False, True, True]
    assert int(table.rows_of(torch.tensor([3]))) == row_of_1
    assert table.evicted_ids().tolist() == [1]
    assert table.evicted_ids().tolist() == []  # reported once
    assert table.stats()["expired"] == 1


def test_expired_then_seen_again_starts_over() -> None:
    clock = Clock()
    table = make_table(clock, ttl_seconds=10, min_count=2)
    step(table, [9, 9])
    clock.now += 10
    step(table, [9])
    assert admitted(table, [9]) == [False]  # counting again from one
    assert table.evicted_ids().tolist() == [9]


def test_pending_ids_expire_too() -> None:
    clock = Clock()
    table = make_table(clock, ttl_seconds=5, min_count=3)
    step(table, [1, 1])
    clock.now += 6
    step(table, [2])
    assert table.num_tracked == 1
    assert table.stats()["expired_pending"] == 1
    assert table.evicted_ids().tolist() == []  # never had a row, nothing to delete in serving


def test_lru_evicts_the_least_recently_seen() -> None:
    clock = Clock()
    table = make_table(clock, capacity=3, eviction="lru")
    for identifier in (1, 2, 3):
        step(table, [identifier])
        clock.now += 1
    step(table, [1])  # 2 is now the least recently seen
    clock.now += 1
    step(table, [4])
    assert admitted(table, [1, 2, 3, 4]) == [True, False, True, True]
    clock.now += 1
    step(table, [5])
    assert admitted(table, [1, 3, 4, 5]) == [True, False, True, True]
    assert table.evicted_ids().tolist() == [2, 3]
    assert table.stats()["evicted_capacity"] == 2


def test_lfu_evicts_the_least_frequently_seen() -> None:
    clock = Clock()
    table = make_table(clock, capacity=3, eviction="lfu")
    step(table, [1, 1, 1, 2, 3, 3])
    clock.now += 1
    step(table, [2])  # counts: 1 -> 3, 2 -> 2, 3 -> 2 (3 seen less recently)
    clock.now += 1
    step(table, [4, 4, 4, 4])
    assert admitted(table, [1, 2, 3, 4]) == [True, True, False, True]
    # a newcomer seen fewer times than every holder is not admitted: LFU keeps the frequent
    clock.now += 1
    step(table, [5])
    assert admitted(table, [5]) == [False]
    assert table.stats()["rejected"] == 1


def test_capacity_below_one_batch_of_distinct_ids_evicts_and_counts() -> None:
    table = make_table(capacity=5)
    step(table, list(range(100, 120)))
    assert table.num_admitted == 5
    stats = table.stats()
    assert stats["rejected"] == 15
    step(table, list(range(200, 220)))
    assert table.num_admitted == 5
    assert table.stats()["evicted_capacity"] == 5
    assert len(table.evicted_ids()) == 5


@settings(max_examples=25, deadline=None)
@given(
    capacity=st.integers(min_value=1, max_value=12),
    eviction=st.sampled_from(["lru", "lfu"]),
    min_count=st.integers(min_value=1, max_value=3),
    admission=st.sampled_from(["exact", "cms"]),
    batches=st.lists(
        st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=30), max_size=12
    ),
)
def test_capacity_is_never_exceeded(
    capacity: int, eviction: str, min_count: int, admission: str, batches: list[list[int]]
) -> None:
    clock = Clock()
    table = make_table(
        clock,
        capacity=capacity,
        eviction=eviction,
        min_count=min_count,
        admission=admission,
        ttl_seconds=4.0,
    )
    for batch in batches:
        step(table, batch)
        clock.now += 1
        assert table.num_admitted <= capacity
        assert table.num_tracked - table.num_admitted <= capacity
        assert table.weight.shape[0] <= capacity + 1
        rows = table.rows_of(torch.arange(41))
        owned = rows[rows != DEFAULT_ROW]
        assert torch.unique(owned).numel() == owned.numel()  # collisionless


def test_eval_lookups_never_change_the_table() -> None:
    table = make_table(min_count=2, ttl_seconds=1)
    step(table, [1, 1, 2])
    before = {name: tensor.clone() for name, tensor in table.state_dict().items()}
    table.eval()
    output = table.pooled(torch.tensor([1, 2, 3, 3]), torch.tensor([0, 1, 2, 4]))
    assert torch.equal(output[1], table.default_row_values())  # pending id 2: default row
    after = table.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_pooling_sum_mean_weights_and_empty_bags() -> None:
    table = make_table(dim=3)
    table.eval()
    table.load_rows(torch.tensor([10, 20]), torch.tensor([[1.0, 2, 3], [10, 20, 30]]))
    offsets = torch.tensor([0, 2, 2, 3])
    values = torch.tensor([10, 20, 10])
    summed = table.pooled(values, offsets)
    assert summed.tolist() == [[11, 22, 33], [0, 0, 0], [1, 2, 3]]
    weighted = table.pooled(values, offsets, torch.tensor([2.0, 1.0, 0.5]))
    assert weighted.tolist() == [[12, 24, 36], [0, 0, 0], [0.5, 1, 1.5]]
    mean_table = make_table(dim=3, pooling="mean")
    mean_table.eval()
    mean_table.load_rows(torch.tensor([10, 20]), torch.tensor([[1.0, 2, 3], [10, 20, 30]]))
    assert mean_table.pooled(values, offsets).tolist() == [[5.5, 11, 16.5], [0, 0, 0], [1, 2, 3]]
    assert mean_table.pooled(values, offsets, torch.tensor([2.0, 1.0, 0.5])).tolist() == [
        [6, 12, 18],
        [0, 0, 0],
        [0.5, 1, 1.5],
    ]
    assert table.sequence(torch.tensor([20, 10])).tolist() == [[10, 20, 30], [1, 2, 3]]


@pytest.mark.parametrize("kind", ["rowwise_adagrad", "sgd"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_fused_update_matches_a_plain_torch_reference(kind: str, pooling: str) -> None:
    optimizer = SparseOptimizerConfig(kind=kind, lr=0.5, initial_accumulator_value=0.1)
    table = make_table(optimizer=optimizer, dim=3, pooling=pooling)
    ids = torch.tensor([3, 4, 5])
    start = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]])
    table.load_rows(ids, start)
    values = torch.tensor([3, 4, 3, 5, 4])
    offsets = torch.tensor([0, 3, 3, 5])
    weights = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0], requires_grad=True)
    target = torch.tensor([[1.0, -1.0, 2.0], [3.0, 3.0, 3.0], [0.5, 0.0, -2.0]])

    output = table.pooled(values, offsets, weights)
    (output * target).sum().backward()

    reference = start.clone().requires_grad_(True)
    reference_weights = weights.detach().clone().requires_grad_(True)
    positions = torch.tensor([0, 1, 0, 2, 1])
    gathered = reference[positions] * reference_weights.unsqueeze(1)
    bags = torch.stack(
        [gathered[0:3].sum(0), torch.zeros(3), gathered[3:5].sum(0)]
        if pooling == "sum"
        else [gathered[0:3].sum(0) / 3, torch.zeros(3), gathered[3:5].sum(0) / 2]
    )
    (bags * target).sum().backward()
    grad = reference.grad
    if kind == "rowwise_adagrad":
        accumulator = 0.1 + grad.pow(2).mean(dim=1)
        expected = start - 0.5 * grad / (accumulator.sqrt() + 1e-8).unsqueeze(1)
    else:
        expected = start - 0.5 * grad
    torch.testing.assert_close(table.weight[table.rows_of(ids)], expected)
    torch.testing.assert_close(weights.grad, reference_weights.grad)


def test_touched_rows_and_export_for_delta_sync() -> None:
    clock = Clock()
    table = make_table(clock, capacity=2)
    step(table, [1, 2])
    clock.now += 1
    touched = table.take_touched_rows()
    assert sorted(table.ids_of_rows(touched).tolist()) == [1, 2]
    assert table.take_touched_rows().tolist() == []
    step(table, [2, 3])  # 3 evicts 1 (LRU) and takes its row
    touched = table.take_touched_rows()
    assert sorted(table.ids_of_rows(touched).tolist()) == [2, 3]
    assert table.evicted_ids().tolist() == [1]
    exported = dict(
        (int(identifier), row)
        for ids, rows in table.export_rows(chunk_rows=1)
        for identifier, row in zip(ids, rows, strict=True)
    )
    assert sorted(exported) == [2, 3]
    assert torch.equal(exported[3], table.weight[table.rows_of(torch.tensor([3]))][0])


def test_default_row_is_reported_when_trained() -> None:
    table = make_table(min_count=2)
    step(table, [8])
    assert table.take_touched_rows().tolist() == [DEFAULT_ROW]


def test_load_rows_over_capacity_changes_nothing() -> None:
    table = make_table(capacity=2)
    table.load_rows(torch.tensor([1]), torch.ones(1, 4))
    before = {name: tensor.clone() for name, tensor in table.state_dict().items()}
    with pytest.raises(CapacityError, match="capacity is 2"):
        table.load_rows(torch.tensor([2, 3]), torch.ones(2, 4))
    after = table.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_storage_grows_in_chunks_up_to_capacity() -> None:
    table = make_table(capacity=10)
    assert table.weight.shape[0] == 4
    step(table, list(range(5)))
    assert table.weight.shape[0] == 8  # whole chunks of 4 rows, 1.5x at least
    step(table, list(range(5, 20)))
    assert table.weight.shape[0] == 11  # capacity + the default row, never more
    assert table.num_admitted == 10
    assert table.num_parameters() == 11 * 4
    assert table.memory_bytes() >= table.weight.numel() * 4


def test_budget_sets_capacity_and_too_small_budget_says_the_minimum() -> None:
    assert make_table(budget=0.01).capacity == 10
    assert make_table(budget=25).capacity == 25
    with pytest.raises(BudgetError, match="minimum budget is 0.001"):
        make_table(budget=0.0005)
    with pytest.raises(ConfigError, match="exceeds"):
        make_table(budget=0.01, capacity=50)


def test_bad_input_is_rejected_with_what_is_accepted() -> None:
    table = make_table()
    with pytest.raises(IdError, match="int64"):
        table.pooled(torch.tensor([1.5]), torch.tensor([0, 1]))
    with pytest.raises(IdError, match="offsets must start at 0"):
        table.pooled(torch.tensor([1, 2]), torch.tensor([0, 1]))
    with pytest.raises(IdError, match="reserved"):
        table.sequence(torch.tensor([torch.iinfo(torch.int64).min]))
    with pytest.raises(ConfigError, match="needs a sparse optimizer kind"):
        make_table(optimizer=SparseOptimizerConfig(kind=None))
    with pytest.raises(ConfigError, match="method='collisionless'"):
        CollisionlessTable(TableConfig(name="t", num_embeddings=10, dim=2))


def test_map_ids_is_the_lookup_without_the_gather() -> None:
    table = make_table(min_count=2)
    rows = table.map_ids(torch.tensor([4, 4, 5]))
    own = int(table.rows_of(torch.tensor([4])))
    assert own != DEFAULT_ROW
    assert rows.tolist() == [own, own, DEFAULT_ROW]
    table.eval()
    assert table.map_ids(torch.tensor([6, 4])).tolist() == [DEFAULT_ROW, own]
    assert table.num_tracked == 2  # eval mode tracked nothing new
    breakdown = table.memory_breakdown()
    assert sum(breakdown.values()) == table.memory_bytes()
    assert breakdown["rows"] == table.weight.numel() * 4


@pytest.mark.parametrize("eviction", ["lru", "lfu"])
def test_tracked_but_not_admitted_ids_stay_bounded(eviction: str) -> None:
    clock = Clock()
    table = make_table(clock, capacity=4, eviction=eviction, min_count=2)
    for start in range(0, 400, 20):
        clock.now += 1
        step(table, list(range(start, start + 20)) + [7, 7])  # 7 stays frequent and recent
    assert table.num_admitted <= 4
    assert table.num_tracked - table.num_admitted <= 4  # max_pending defaults to the capacity
    assert table.stats()["forgotten_pending"] > 0
    assert admitted(table, [7]) == [True]
