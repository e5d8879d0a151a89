"""From a TableConfig to the physical tables it allocates: sizes, budgets, names.

Each method plans its own tables (`embedding_tables.methods`); this module holds the shapes they
share (PhysicalTable, TablePlan) and the checks and sizes common to all of them.

Physical table names (what `take_touched_rows`, `export_rows`, the state_dict and serving use):

- `full`, `hash`, `graphhash`: one table named like the logical table (`item_id`).
- `unified`: one table named like the unified TableConfig (the feature group), shared by every
  feature mapped to it.
- `qr` with 2 partitions: `item_id.r` (remainder: id mod r0) and `item_id.q` (quotient:
  id // r0); with k > 2 partitions: `item_id.p0` ... `item_id.p{k-1}`, mixed-radix digits with
  p0 the least significant. Logical table names therefore may not contain '.'.
- `collisionless`: one self-managed table named like the logical table.

Budgets are bytes of weights: a fraction of `num_embeddings * dim * element_size`, or an int
number of full-width rows (`budget * dim` elements). Optimizer state is not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from embedding_tables.errors import BudgetError, ConfigError

if TYPE_CHECKING:
    from embedding_tables.combine import Combine
    from embedding_tables.config import TableConfig

ELEMENT_BYTES = {"fp32": 4, "fp16": 2}
TBE_DIM_MULTIPLE = 4


@dataclass(frozen=True)
class PhysicalTable:
    """One plain 2-D table of rows: what the lookup kernels, sharding and serving see.

    `init_std`: where the method draws its own initial weights, N(0, init_std) (ttrec's cores,
    whose product must have a plain table's spread); None: uniform in ±sqrt(1 / num_rows).
    """

    name: str
    logical_table: str
    num_rows: int
    dim: int
    dtype: str
    init_std: float | None = None

    @property
    def num_parameters(self) -> int:
        return self.num_rows * self.dim

    @property
    def memory_bytes(self) -> int:
        return self.num_parameters * ELEMENT_BYTES[self.dtype]


@dataclass(frozen=True)
class TablePlan:
    """The physical layout of one static logical table.

    `combine` says how the rows of one id's lookups make its embedding: `single` (one lookup),
    `concat` (unified chunks, qr concat), `add` (qr add, graphhash double), `mult` (qr mult),
    or a method's own `combine.RowCombine` (ttrec's tensor-train contraction).
    `radices` are the mixed-radix digit sizes (digit 0 first) of qr and ttrec; empty for other
    methods.
    """

    config: TableConfig
    physical: tuple[PhysicalTable, ...]
    combine: Combine
    radices: tuple[int, ...] = ()


def plan_table(config: TableConfig, mapping_rows: int | None = None) -> TablePlan:
    """The physical tables of a static method's config; raises BudgetError if it cannot fit.

    `mapping_rows` is the row count of a mapping given to the table (graphhash), when known.
    """
    if "." in config.name:
        raise ConfigError(
            f"table {config.name!r}: table names may not contain '.', which separates a qr "
            "table's partitions in physical table names"
        )
    return config.method.plan(config, mapping_rows)


def rows_within_budget(config: TableConfig, method: str) -> int:
    """The budget's rows (all num_embeddings with no budget); BudgetError if it buys none."""
    if config.budget is None:
        return config.num_embeddings
    rows = config.budget_rows()
    if rows < 1:
        raise BudgetError(
            f"table {config.name!r}: budget {config.budget!r} of {config.num_embeddings} ids "
            f"allows 0 rows; {method} needs at least 1 row, so the smallest valid "
            f"budget is {smallest_budget(1, config.num_embeddings)}"
        )
    return rows


def check_tbe_dim(config: TableConfig) -> None:
    """ConfigError unless the row width suits the table-batched kernels."""
    if config.dim % TBE_DIM_MULTIPLE:
        raise ConfigError(
            f"table {config.name!r}: dim {config.dim} is not a multiple of {TBE_DIM_MULTIPLE}; "
            f"the table-batched kernels behind method {config.method.name!r} need row widths "
            f"that are multiples of {TBE_DIM_MULTIPLE}"
        )


def one_table_plan(config: TableConfig, rows: int, combine: str) -> TablePlan:
    """The plan of a method that keeps one physical table, named like the logical one."""
    return TablePlan(config, (physical_table(config, config.name, rows, config.dim),), combine)


def physical_table(
    config: TableConfig, name: str, rows: int, dim: int, init_std: float | None = None
) -> PhysicalTable:
    """One physical table of `config`'s logical table."""
    return PhysicalTable(
        name=name,
        logical_table=config.name,
        num_rows=rows,
        dim=dim,
        dtype=config.dtype,
        init_std=init_std,
    )


def smallest_budget(rows: int, num_embeddings: int) -> str:
    """The smallest budget giving `rows` rows: as a fraction (rounded up to 4 significant
    digits, still valid) and as an int row count (ints > 1 are rows; 1 means the whole table)."""
    as_rows = f"budget={max(rows, 2)} rows"
    if rows > num_embeddings:
        return f"{as_rows} (more rows than ids: no fraction <= 1 suffices)"
    fraction = rows / num_embeddings
    digits = 3 - math.floor(math.log10(fraction))
    rounded = min(1.0, math.ceil(fraction * 10**digits) / 10**digits)
    while int(num_embeddings * rounded) < rows:
        rounded = math.nextafter(rounded, 2.0)
    return f"{rounded!r} (or {as_rows})"
