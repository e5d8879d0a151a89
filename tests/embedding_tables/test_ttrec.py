"""TT-Rec: the cores within the budget, the digits against the method's reference, the
collection's pooled and sequence output against an explicit einsum contraction of the cores,
gradients to the cores, the init's spread, and options refused with what is accepted."""

from __future__ import annotations

import math
import string

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embedding_tables import EmbeddingCollection
from embedding_tables.config import TableConfig
from embedding_tables.errors import BudgetError, ConfigError, IdError
from embedding_tables.methods import QR, TTRec
from embedding_tables.optimizer import SparseOptimizerConfig
from embedding_tables.planning import TablePlan, plan_table
from embedding_tables.reference import (
    reference_pooled,
    reference_rows_of_id,
    reference_sequence,
    reference_touched_rows,
)
from embedding_tables.sharding import ShardableEmbeddingCollection, torchrec_name
from embedding_tables.transforms import BatchedTransform, transform_for
from tests.embedding_tables.helpers import method_case, random_kjt, slots_of


def einsum_row(plan: TablePlan, weights: dict[str, torch.Tensor], value: int) -> torch.Tensor:
    """One id's row from the cores' definition: slice k is r_{k-1} x d_k x r_k, and the row is
    the einsum over the bonds, d_1 the most significant, times the contraction's scale."""
    contraction = plan.combine
    factors, ranks = contraction.dim_factors, contraction.ranks
    bonds, dims = string.ascii_lowercase, string.ascii_uppercase
    slices, terms = [], []
    for k, (table, row) in enumerate(reference_rows_of_id(plan, "f", value)):
        shape = (ranks[k], factors[k], ranks[k + 1])
        slices.append(weights[table][row].float().reshape(shape))
        terms.append(bonds[k] + dims[k] + bonds[k + 1])
    formula = ",".join(terms) + "->" + bonds[0] + dims[: len(factors)] + bonds[len(factors)]
    return torch.einsum(formula, *slices).reshape(-1) * contraction.scale


def einsum_outputs(
    ec: EmbeddingCollection, weights: dict[str, torch.Tensor], features: KeyedJaggedTensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(pooled, sequence) per feature from `einsum_row`, the KJT's weights and the pooling."""
    pooled, sequence = {}, {}
    for feature, jagged in features.to_dict().items():
        plan = ec.plans[ec.feature_to_table[feature]]
        ids = jagged.values().tolist()
        rows = [einsum_row(plan, weights, value) for value in ids]
        dim = plan.config.dim
        sequence[feature] = torch.stack(rows) if rows else torch.zeros(0, dim)
        sample = jagged.weights_or_none()
        bags, start = [], 0
        for length in jagged.lengths().tolist():
            bag = torch.zeros(dim)
            for i in range(start, start + length):
                bag = bag + (1.0 if sample is None else float(sample[i])) * rows[i]
            if plan.config.pooling == "mean" and length:
                bag = bag / length
            bags.append(bag)
            start += length
        pooled[feature] = torch.stack(bags)
    return pooled, sequence


@pytest.mark.parametrize(
    "config",
    [
        TableConfig("t", 10_000, 16, TTRec(rank=8), budget=0.05),
        TableConfig("t", 3706, 16, TTRec(rank=4, num_cores=2), budget=0.1, dtype="fp16"),
        TableConfig("t", 100_000, 32, TTRec(rank=16, num_cores=4), budget=0.01),
        TableConfig("t", 5000, 8, TTRec(rank=2, dim_factors=(2, 2, 2)), budget=40),
    ],
)
def test_the_cores_fit_the_budget(config: TableConfig) -> None:
    plan = plan_table(config)
    method = config.method
    assert [physical.name for physical in plan.physical] == [
        f"t.c{k}" for k in range(method.num_cores)
    ]
    assert math.prod(plan.radices) >= config.num_embeddings
    assert [physical.num_rows for physical in plan.physical] == list(plan.radices)
    ranks = (1, *(method.rank,) * (method.num_cores - 1), 1)
    assert plan.combine.ranks == ranks and plan.combine.output_dim == config.dim
    for k, physical in enumerate(plan.physical):
        assert physical.dim == ranks[k] * plan.combine.dim_factors[k] * ranks[k + 1]
        assert physical.dim % 4 == 0
    element = plan.physical[0].memory_bytes // plan.physical[0].num_parameters
    budget_bytes = (
        config.budget * config.dim * element
        if isinstance(config.budget, int)
        else config.budget * config.full_bytes
    )
    assert sum(physical.memory_bytes for physical in plan.physical) <= budget_bytes


@pytest.mark.parametrize("budget", [1.0, 0.1, 0.01])
def test_at_budget_picks_the_largest_rank_that_fits(budget: float) -> None:
    config = TableConfig("t", 3706, 16, TTRec(), budget=budget)
    chosen, decisions = config.method.at_budget(config)
    rank = decisions["rank"]
    assert chosen.method.rank == rank and chosen.budget == budget
    plan = plan_table(chosen)
    assert decisions["radices"] == plan.radices
    assert decisions["dim_factors"] == plan.combine.dim_factors
    assert sum(p.num_parameters for p in plan.physical) <= int(3706 * 16 * budget)
    for higher in range(rank + 1, rank + 5):
        with pytest.raises(ConfigError):  # over the budget (BudgetError) or the largest rank
            bigger = TableConfig("t", 3706, 16, TTRec(rank=higher), budget=budget)
            plan_table(bigger)


def test_at_budget_refuses_a_budget_below_the_cheapest_cores() -> None:
    config = TableConfig("t", 10**6, 16, TTRec(), budget=0.00001)
    with pytest.raises(BudgetError, match=r"no ttrec rank fits budget 1e-05 .* or more"):
        config.method.at_budget(config)
    with pytest.raises(BudgetError, match=r"cores at rank 8 .* lower the rank, or give a budget"):
        plan_table(config)


def test_transform_matches_the_reference_and_runs_as_arith_slots() -> None:
    configs = [
        TableConfig("a", 3000, 16, TTRec(rank=4), seed=2),
        TableConfig("b", 77, 8, TTRec(rank=2, num_cores=2, out_of_range="hash"), seed=5),
        TableConfig("c", 900, 8, QR(combine="mult")),
    ]
    transforms = [transform_for(config, name) for config, name in zip(configs, "abc", strict=True)]
    assert {t.slot_rule(j).kind for t in transforms for j in range(len(t.tables))} == {"arith"}
    generator = torch.Generator().manual_seed(1)
    ids = {
        "a": torch.randint(0, 3000, (300,), generator=generator),
        "b": torch.cat([torch.tensor([0, 76, 77, -1, 2**63 - 1, -(2**63)]), torch.arange(77)]),
        "c": torch.randint(0, 900, (40,), generator=generator),
    }
    for config, transform in zip(configs[:2], transforms[:2], strict=True):
        plan = plan_table(config)
        rows = transform(ids[transform.feature])
        for position, value in enumerate(ids[transform.feature].tolist()):
            got = [(t, int(r[position])) for t, r in zip(transform.tables, rows, strict=True)]
            assert got == reference_rows_of_id(plan, transform.feature, value)
        assert [r.tolist() for r in transform(torch.empty(0, dtype=torch.int64))] == [[]] * len(
            rows
        )
    slots = slots_of(transforms)
    batched = BatchedTransform(slots)([ids[t.feature] for t, _ in slots])
    assert torch.equal(batched, torch.cat([t(ids[t.feature])[j] for t, j in slots]))
    with pytest.raises(IdError, match="3000"):
        transforms[0](torch.tensor([3000]))


def test_distinct_ids_get_distinct_digit_tuples() -> None:
    plan = plan_table(TableConfig("t", 1000, 8, TTRec(rank=2, num_cores=3)))
    tuples = {tuple(row for _, row in reference_rows_of_id(plan, "f", v)) for v in range(1000)}
    assert len(tuples) == 1000


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no-grad"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_collection_matches_the_einsum_contraction(pooling: str, grad: bool) -> None:
    torch.manual_seed(4)
    tables, feature_to_table = method_case("ttrec", pooling)
    ec = EmbeddingCollection(tables, feature_to_table, optimizer=None)
    features = random_kjt(tables, feature_to_table, batch=7, weighted=True)
    assert int(features.lengths()[0]) == 0  # an empty bag
    weights = {t.name: ec.tables.weight(t.name).detach().clone() for t in ec.physical_tables()}
    with torch.set_grad_enabled(grad):
        pooled = ec(features).to_dict()
        sequence = {k: v.values() for k, v in ec.sequence(features).items()}
    expected_pooled, expected_sequence = einsum_outputs(ec, weights, features)
    library_pooled = reference_pooled(ec.plans, ec.feature_to_table, weights, features)
    library_sequence = reference_sequence(ec.plans, ec.feature_to_table, weights, features)
    for feature in feature_to_table:
        assert ec.output_dim(feature) == ec.configs[feature_to_table[feature]].dim
        torch.testing.assert_close(pooled[feature], expected_pooled[feature], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(library_pooled[feature], expected_pooled[feature])
        torch.testing.assert_close(
            sequence[feature], expected_sequence[feature], rtol=1e-5, atol=1e-7
        )
        torch.testing.assert_close(library_sequence[feature], expected_sequence[feature])


def test_ttrec_beside_qr_mult_and_hash_in_one_collection() -> None:
    """The combine-before-pooling route takes qr mult (its own Function, the CPU kernels
    without grad) and ttrec's contraction side by side."""
    tables = [
        TableConfig("tt", 2000, 8, TTRec(rank=4), budget=0.1),
        TableConfig("qm", 300, 8, QR(combine="mult")),
        TableConfig("h", 10_000, 4, "hash", budget=50),
    ]
    feature_to_table = {"h": "h", "tt": "tt", "qm": "qm", "tt2": "tt"}
    ec = EmbeddingCollection(tables, feature_to_table, optimizer=None)
    features = random_kjt(tables, feature_to_table, batch=6, weighted=True, seed=3)
    weights = {t.name: ec.tables.weight(t.name).detach().clone() for t in ec.physical_tables()}
    expected = reference_pooled(ec.plans, ec.feature_to_table, weights, features)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            pooled = ec(features).to_dict()
        for feature, rows in expected.items():
            torch.testing.assert_close(pooled[feature], rows, rtol=1e-5, atol=1e-7)


def test_gradients_reach_the_cores_as_through_the_einsum() -> None:
    torch.manual_seed(2)
    tables, feature_to_table = method_case("ttrec", "mean")
    ec = EmbeddingCollection(tables, feature_to_table, optimizer=None)
    features = random_kjt(tables, feature_to_table, batch=5, weighted=True, seed=8)
    names = [t.name for t in ec.physical_tables()]
    leaves = {n: ec.tables.weight(n).detach().clone().requires_grad_(True) for n in names}
    expected, _ = einsum_outputs(ec, leaves, features)
    target = {f: torch.randn_like(rows) for f, rows in expected.items()}
    sum((expected[f] * target[f]).sum() for f in expected).backward()
    pooled = ec(features).to_dict()
    sum((pooled[f] * target[f]).sum() for f in pooled).backward()
    touched = reference_touched_rows(ec.plans, ec.feature_to_table, features)
    for name in names:
        grad = ec.tables.weight(name).grad
        assert grad is not None and leaves[name].grad is not None
        torch.testing.assert_close(grad, leaves[name].grad, rtol=1e-5, atol=1e-7)
        nonzero = set(torch.nonzero(grad.abs().sum(dim=1)).flatten().tolist())
        assert nonzero <= touched.get(name, set()) and nonzero, name


def test_the_fused_optimizer_updates_the_touched_core_rows() -> None:
    tables, feature_to_table = method_case("ttrec")
    ec = EmbeddingCollection(
        tables, feature_to_table, optimizer=SparseOptimizerConfig("rowwise_adagrad", lr=0.1)
    )
    features = random_kjt(tables, feature_to_table, batch=6, seed=5)
    before = {t.name: ec.tables.weight(t.name).detach().clone() for t in ec.physical_tables()}
    ec.take_touched_rows()
    ec(features).values().pow(2).sum().backward()
    touched = ec.take_touched_rows()
    expected = reference_touched_rows(ec.plans, ec.feature_to_table, features)
    for name, rows in before.items():
        assert set(touched[name].tolist()) == expected.get(name, set())
        changed = (ec.tables.weight(name) != rows).any(dim=1)
        assert set(torch.nonzero(changed).flatten().tolist()) <= expected.get(name, set())
        assert bool(changed.any()), name


@pytest.mark.parametrize(("num_cores", "rank"), [(2, 8), (3, 8), (4, 8), (3, 56)])
def test_the_init_gives_the_product_a_plain_tables_spread(num_cores: int, rank: int) -> None:
    """Unit-std cores and the contraction's scale: the rows' std is that of uniform
    ±sqrt(1/num_embeddings), at a high rank as at a low one."""
    torch.manual_seed(0)
    config = TableConfig("t", 20_000, 16, TTRec(rank=rank, num_cores=num_cores))
    ec = EmbeddingCollection([config], {"f": "t"}, optimizer=None)
    plan = ec.plans["t"]
    assert {physical.init_std for physical in plan.physical} == {1.0}
    for physical in plan.physical:
        weight = ec.tables.weight(physical.name).detach()
        assert float(weight.std()) == pytest.approx(1.0, rel=0.1)
    ids = torch.arange(20_000)
    with torch.no_grad():
        rows = ec.sequence(
            KeyedJaggedTensor.from_lengths_sync(["f"], ids, torch.ones(20_000, dtype=torch.int64))
        )
    std = float(rows["f"].values().std())
    assert std == pytest.approx(math.sqrt(1.0 / (3 * 20_000)), rel=0.25)


def test_a_sparse_step_moves_the_rows_by_less_than_their_size_at_any_rank() -> None:
    """One row-wise Adagrad step at the study's lr 0.2 changes the rows by less than their own
    norm, at rank 56 within 3x of rank 4: with unit cores each entry moves by about lr, a fixed
    fraction of itself. (Cores of the product's own scale, entries near 0.05 at rank 56, moved
    by several times their size: the rows changed by 6x their norm at rank 4, 60x at 56.)"""
    relative = {}
    for rank in (4, 56):
        torch.manual_seed(0)
        config = TableConfig("t", 3706, 16, TTRec(rank=rank))
        optimizer = SparseOptimizerConfig("rowwise_adagrad", lr=0.2)
        ec = EmbeddingCollection([config], {"f": "t"}, optimizer=optimizer)
        ids = torch.arange(0, 3706, 7)
        features = KeyedJaggedTensor.from_lengths_sync(
            ["f"], ids, torch.ones(len(ids), dtype=torch.int64)
        )
        target = torch.randn(len(ids), 16, generator=torch.Generator().manual_seed(1))
        before = ec.sequence(features)["f"].values().detach()
        (ec.sequence(features)["f"].values() * target).sum().backward()
        after = ec.sequence(features)["f"].values().detach()
        relative[rank] = float((after - before).norm() / before.norm())
    assert relative[56] < 1.0
    assert relative[56] < 3 * relative[4]


def test_options_refused_with_what_is_accepted() -> None:
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ConfigError, match=r"rank must be an int >= 1"):
            TTRec(rank=bad)
    with pytest.raises(ConfigError, match=r"num_cores must be an int >= 2"):
        TTRec(num_cores=1)
    with pytest.raises(ConfigError, match=r"dim_factors must be 3 ints >= 1"):
        TTRec(dim_factors=(4, 4))
    with pytest.raises(ConfigError, match=r"multiply to 8, not dim 16; accepted: 3 ints"):
        TableConfig("t", 1000, 16, TTRec(dim_factors=(2, 2, 2)))
    with pytest.raises(
        ConfigError,
        match=r"core rows \(2, 1, 2\) wide; .* accepted ranks with these factors: 2, 4, 6,",
    ):
        TableConfig("t", 1000, 4, TTRec(rank=1, dim_factors=(2, 1, 2)))
    with pytest.raises(ConfigError, match=r"no factorisation of dim 8 into 4 .* accepted ranks: 2"):
        TableConfig("t", 4000, 8, TTRec(rank=3, num_cores=4))
    with pytest.raises(ConfigError, match=r"rank 32 exceeds the largest useful rank 8 .* 1 to 8"):
        TableConfig("t", 60, 8, TTRec(rank=32, dim_factors=(4, 1, 2)))


def test_fields_round_trip() -> None:
    config = TableConfig(
        "t", 3000, 16, TTRec(rank=4, num_cores=3, dim_factors=(2, 2, 4)), budget=0.1
    )
    fields = config.to_fields()
    assert fields["method"] == "ttrec" and fields["rank"] == 4
    assert TableConfig.from_fields(fields) == config
    as_json = {**fields, "dim_factors": [2, 2, 4]}
    assert TableConfig.from_fields(as_json) == config
    with pytest.raises(ConfigError, match="capacity"):
        TableConfig.from_fields({**fields, "capacity": 10})


def test_the_shardable_collection_contracts_the_cores_before_pooling() -> None:
    """torchrec's unpooled EmbeddingCollection reads the cores (beside qr mult's partitions:
    one width for all, rank 4 with factors (4, 1, 4)); contraction, then pooling, gives the
    reference."""
    tables = [
        TableConfig("tt", 2000, 16, TTRec(rank=4, dim_factors=(4, 1, 4)), pooling="mean"),
        TableConfig("qm", 300, 16, QR(combine="mult")),
        TableConfig("h", 10_000, 4, "hash", budget=50),
    ]
    feature_to_table = {"h": "h", "tt": "tt", "qm": "qm"}
    sharded = ShardableEmbeddingCollection(tables, feature_to_table)
    state = sharded.state_dict()
    weights = {}
    for physical in sharded.physical_tables():
        (key,) = [k for k in state if k.endswith(f".{torchrec_name(physical.name)}.weight")]
        weights[physical.name] = state[key]
    cores = {k for k in state if "tt__c" in k}
    assert cores == {f"rows.embeddings.tt__c{k}.weight" for k in range(3)}
    features = random_kjt(tables, feature_to_table, batch=6, seed=4)
    expected = reference_pooled(sharded.plans, feature_to_table, weights, features)
    pooled = sharded(features).to_dict()
    for feature, rows in expected.items():
        torch.testing.assert_close(pooled[feature], rows, rtol=1e-5, atol=1e-7)


def test_the_shardable_collection_refuses_unpooled_tables_of_several_widths() -> None:
    tables = [TableConfig("tt", 2000, 8, TTRec(rank=4))]
    with pytest.raises(ConfigError, match=r"one row width .* tt.c0 8, tt.c1 16, tt.c2 16"):
        ShardableEmbeddingCollection(tables, {"f": "tt"})


def test_repeated_ids_are_contracted_once_and_get_every_gradient() -> None:
    """The contraction runs per distinct id; gathered back, each occurrence still pools and
    passes its gradient to the cores."""
    tables = [TableConfig("t", 3000, 16, TTRec(rank=4), pooling="mean")]
    ec = EmbeddingCollection(tables, {"f": "t", "g": "t"}, optimizer=None)
    values = torch.tensor([5, 5, 7, 5, 2999, 7, 7, 7, 5, 5, 0])
    features = KeyedJaggedTensor(
        keys=["f", "g"], values=values, lengths=torch.tensor([3, 0, 2, 1, 4, 1])
    )
    names = [t.name for t in ec.physical_tables()]
    leaves = {n: ec.tables.weight(n).detach().clone().requires_grad_(True) for n in names}
    expected, sequence = einsum_outputs(ec, leaves, features)
    pooled = ec(features).to_dict()
    rows = {k: v.values() for k, v in ec.sequence(features).items()}
    for feature in ("f", "g"):
        torch.testing.assert_close(pooled[feature], expected[feature], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(rows[feature], sequence[feature].detach(), rtol=1e-5, atol=1e-7)
    target = {f: torch.randn_like(rows) for f, rows in expected.items()}
    sum((expected[f] * target[f]).sum() for f in expected).backward()
    sum((pooled[f] * target[f]).sum() for f in pooled).backward()
    for name in names:
        torch.testing.assert_close(
            ec.tables.weight(name).grad, leaves[name].grad, rtol=1e-5, atol=1e-7
        )
