"""Budgets, physical table names and the qr uniqueness guarantee."""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from embedding_tables.config import TableConfig
from embedding_tables.errors import BudgetError, ConfigError
from embedding_tables.methods import QR
from embedding_tables.methods.qr import balanced_radices
from embedding_tables.planning import ELEMENT_BYTES, plan_table
from embedding_tables.transforms import transform_for


def allocated_bytes(config: TableConfig) -> int:
    return sum(p.memory_bytes for p in plan_table(config).physical)


@pytest.mark.parametrize(
    "method, options",
    [
        ("hash", {}),
        ("unified", {}),
        ("qr", {"combine": "mult"}),
        ("qr", {"combine": "add", "num_partitions": 3}),
        ("qr", {"combine": "concat"}),
        ("qr", {"combine": "concat", "num_partitions": 4}),
    ],
)
@pytest.mark.parametrize("budget", [0.1, 0.01, 0.5])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_fractional_budget_bounds_allocated_bytes(
    method: str, options: dict, budget: float, dtype: str
) -> None:
    config = TableConfig.from_fields(
        {"name": "t", "num_embeddings": 1_000_003, "dim": 32, "method": method}
        | {"budget": budget, "dtype": dtype, **options}
    )
    full = config.num_embeddings * config.dim * ELEMENT_BYTES[dtype]
    assert 0 < allocated_bytes(config) <= budget * full


def test_row_budget_and_natural_sizes() -> None:
    assert plan_table(TableConfig("t", 1000, 8, "hash", budget=37)).physical[0].num_rows == 37
    assert plan_table(TableConfig("t", 1000, 8, "hash")).physical[0].num_rows == 1000
    assert plan_table(TableConfig("t", 1000, 8, "full")).physical[0].num_rows == 1000
    assert plan_table(TableConfig("t", 1000, 8, "qr")).radices == (32, 32)
    config = TableConfig("t", 10_000, 8, "qr", budget=1000)
    radices = plan_table(config).radices
    assert sum(radices) <= 1000 and radices[0] * radices[1] >= 10_000
    assert radices[0] > 900  # the budget buys a large remainder table


def test_physical_names() -> None:
    assert [p.name for p in plan_table(TableConfig("item", 100, 8, "qr")).physical] == [
        "item.r",
        "item.q",
    ]
    names = [p.name for p in plan_table(TableConfig("x", 100, 8, QR(num_partitions=3))).physical]
    assert names == ["x.p0", "x.p1", "x.p2"]
    assert [
        p.dim
        for p in plan_table(
            TableConfig("x", 100, 16, QR(combine="concat", num_partitions=3))
        ).physical
    ] == [8, 4, 4]
    with pytest.raises(ConfigError, match="may not contain"):
        plan_table(TableConfig("a.b", 100, 8, "hash"))


def smallest_budget_in(message: str) -> float:
    return float(re.search(r"smallest valid budget is ([0-9.e-]+)", message).group(1))


@pytest.mark.parametrize(
    "config",
    [
        TableConfig("t", 1000, 8, "hash", budget=0.0001),
        TableConfig("t", 1_000_000, 8, "qr", budget=0.0001),
        TableConfig("t", 1_000_000, 8, QR(num_partitions=2), budget=0.001),
        TableConfig("t", 1_000_000, 16, QR(combine="concat", num_partitions=3), budget=0.00005),
        TableConfig("t", 1000, 8, "full", budget=0.5),
    ],
)
def test_too_small_budget_names_the_smallest_valid_one(config: TableConfig) -> None:
    with pytest.raises(BudgetError, match="smallest valid budget") as error:
        plan_table(config)
    smallest = smallest_budget_in(str(error.value))
    fixed = TableConfig(**{**config.__dict__, "budget": smallest})
    plan_table(fixed)  # the budget the message names is valid
    if smallest < 1.0:
        below = TableConfig(**{**config.__dict__, "budget": smallest * 0.9})
        with pytest.raises(BudgetError):
            plan_table(below)


def test_dim_must_suit_the_table_batched_kernels() -> None:
    with pytest.raises(ConfigError, match="multiple of 4"):
        plan_table(TableConfig("t", 100, 10, "hash"))
    with pytest.raises(ConfigError, match="needs dim >= 12"):
        plan_table(TableConfig("t", 100, 8, QR(combine="concat", num_partitions=3)))


@pytest.mark.parametrize("count, parts", [(1, 2), (7, 2), (100, 2), (1000, 3), (17, 4)])
def test_balanced_radices_cover(count: int, parts: int) -> None:
    radices = balanced_radices(count, parts)
    product = 1
    for r in radices:
        product *= r
    assert product >= count and max(radices) - min(radices) <= 1


@pytest.mark.parametrize(
    "n, partitions, budget",
    [
        (1, 2, None),
        (2, 2, None),
        (97, 2, None),
        (1000, 2, None),
        (1000, 2, 0.3),
        (1000, 2, 900),
        (1000, 3, None),
        (999, 3, 0.2),
        (4096, 4, None),
        (500, 5, None),
    ],
)
def test_qr_gives_every_id_a_unique_combination(n: int, partitions: int, budget) -> None:
    config = TableConfig("t", n, 8, QR(num_partitions=partitions), budget=budget)
    plan = plan_table(config)
    rows = transform_for(config, "f", plan=plan)(torch.arange(n))
    assert len(rows) == partitions
    for digit, physical in zip(rows, plan.physical, strict=True):
        assert int(digit.min()) >= 0 and int(digit.max()) < physical.num_rows
    combos = torch.stack(rows, dim=1)
    assert torch.unique(combos, dim=0).shape[0] == n


def test_qr_uniqueness_exhaustive_small_sizes() -> None:
    for n, partitions in itertools.product(range(1, 60), (2, 3)):
        config = TableConfig("t", n, 4, QR(num_partitions=partitions))
        rows = transform_for(config, "f")(torch.arange(n))
        assert torch.unique(torch.stack(rows, dim=1), dim=0).shape[0] == n
