"""From a TableConfig to the physical tables it allocates: sizes, budgets, names.

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

from embedding_tables.config import TableConfig
from embedding_tables.errors import BudgetError, ConfigError

ELEMENT_BYTES = {"fp32": 4, "fp16": 2}
# Methods whose rows live in plain physical tables looked up by fbgemm's table-batched kernels.
STATIC_METHODS = ("full", "hash", "unified", "qr", "graphhash")
SELF_MANAGED_METHODS = ("collisionless",)
TBE_DIM_MULTIPLE = 4


@dataclass(frozen=True)
class PhysicalTable:
    """One plain 2-D table of rows: what the lookup kernels, sharding and serving see."""

    name: str
    logical_table: str
    num_rows: int
    dim: int
    dtype: str

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
    `concat` (unified chunks, qr concat), `add` (qr add, graphhash double) or `mult` (qr mult).
    `radices` are the qr partition sizes (digit 0 first); empty for other methods.
    """

    config: TableConfig
    physical: tuple[PhysicalTable, ...]
    combine: str
    radices: tuple[int, ...] = ()


def plan_table(config: TableConfig, mapping_rows: int | None = None) -> TablePlan:
    """The physical tables of a static method's config; raises BudgetError if it cannot fit.

    `mapping_rows` is the row count of a graphhash table's mapping, when one is known.
    """
    if config.method not in STATIC_METHODS:
        raise ConfigError(
            f"table {config.name!r}: method {config.method!r} has no static plan; static "
            f"methods: {', '.join(STATIC_METHODS)}"
        )
    if "." in config.name:
        raise ConfigError(
            f"table {config.name!r}: table names may not contain '.', which separates a qr "
            "table's partitions in physical table names"
        )
    _check_tbe_dim(config)
    if config.method == "full":
        return _plan_full(config)
    if config.method in ("hash", "unified"):
        rows = _rows_within_budget(config, natural_rows=config.num_embeddings)
        combine = "concat" if config.method == "unified" else "single"
        return TablePlan(config, (_physical(config, config.name, rows, config.dim),), combine)
    if config.method == "graphhash":
        return _plan_graphhash(config, mapping_rows)
    return _plan_qr(config)


def qr_partition_dims(config: TableConfig) -> tuple[int, ...]:
    """Row width of each qr partition: `dim` for mult/add; for concat, multiples of 4 summing
    to `dim`, the wider ones first."""
    k = config.num_partitions
    if config.combine != "concat":
        return (config.dim,) * k
    quads, extra = divmod(config.dim // TBE_DIM_MULTIPLE, k)
    return tuple(TBE_DIM_MULTIPLE * (quads + (1 if i < extra else 0)) for i in range(k))


def qr_partition_names(config: TableConfig) -> tuple[str, ...]:
    """Physical names of a qr table's partitions, digit 0 first."""
    if config.num_partitions == 2:
        return (f"{config.name}.r", f"{config.name}.q")
    return tuple(f"{config.name}.p{i}" for i in range(config.num_partitions))


def balanced_radices(count: int, parts: int) -> tuple[int, ...]:
    """`parts` radices, as equal as possible, whose product is >= count (the cheapest cover)."""
    root = max(1, round(count ** (1.0 / parts)))
    while root**parts < count:
        root += 1
    while root > 1 and (root - 1) ** parts >= count:
        root -= 1
    radices = [root] * parts
    for i in reversed(range(parts)):
        if radices[i] > 1 and math.prod(radices) // radices[i] * (radices[i] - 1) >= count:
            radices[i] -= 1
    return tuple(radices)


def qr_radices(config: TableConfig) -> tuple[int, ...]:
    """Partition sizes (digit 0 first) of a qr table: every id < num_embeddings gets a unique
    combination (their product covers num_embeddings) and the weights fit the budget.

    With no budget: the balanced, smallest cover. With a budget: the largest digit-0 table
    (fewest ids sharing each of its rows) that still fits, the other partitions balanced.
    """
    n, k = config.num_embeddings, config.num_partitions
    dims = qr_partition_dims(config)

    def radices_with_first(first: int) -> tuple[int, ...]:
        return (first, *balanced_radices(-(-n // first), k - 1))

    def cost(radices: tuple[int, ...]) -> int:
        return sum(r * d for r, d in zip(radices, dims, strict=True))

    first = balanced_radices(n, k)[0]
    smallest = radices_with_first(first)
    if config.budget is None:
        return smallest
    allowed = config.budget_rows() * config.dim
    if cost(smallest) > allowed:
        needed_rows = -(-cost(smallest) // config.dim)
        raise BudgetError(
            f"table {config.name!r}: qr with {k} partitions ({config.combine}) needs at least "
            f"{needed_rows} rows of dim {config.dim} to give each of {n} ids a unique "
            f"combination, but budget {config.budget!r} allows {config.budget_rows()} rows; the "
            f"smallest valid budget is {_smallest_budget(needed_rows, n)}"
        )
    low, high = first, max(first, min(n, allowed // dims[0]))
    while low < high:
        middle = (low + high + 1) // 2
        if cost(radices_with_first(middle)) <= allowed:
            low = middle
        else:
            high = middle - 1
    return radices_with_first(low)


def _plan_full(config: TableConfig) -> TablePlan:
    if config.budget is not None and config.budget_rows() < config.num_embeddings:
        raise BudgetError(
            f"table {config.name!r}: method 'full' keeps one row per id and needs "
            f"{config.num_embeddings} rows, but budget {config.budget!r} allows "
            f"{config.budget_rows()}; the smallest valid budget is 1.0 (or budget=None); "
            "use hash, unified, qr or graphhash to compress"
        )
    physical = _physical(config, config.name, config.num_embeddings, config.dim)
    return TablePlan(config, (physical,), "single")


def _plan_graphhash(config: TableConfig, mapping_rows: int | None) -> TablePlan:
    budget_rows = config.num_embeddings if config.budget is None else config.budget_rows()
    rows = budget_rows if mapping_rows is None else mapping_rows
    if rows < 1 or rows > budget_rows:
        raise BudgetError(
            f"table {config.name!r}: graphhash needs its mapping's {rows} rows within the "
            f"budget's {budget_rows} rows (budget {config.budget!r}); the smallest valid budget "
            f"is {_smallest_budget(max(rows, 1), config.num_embeddings)}"
        )
    combine = "add" if config.graphhash_variant == "double" else "single"
    return TablePlan(config, (_physical(config, config.name, rows, config.dim),), combine)


def _plan_qr(config: TableConfig) -> TablePlan:
    radices = qr_radices(config)
    physical = tuple(
        _physical(config, name, rows, dim)
        for name, rows, dim in zip(
            qr_partition_names(config), radices, qr_partition_dims(config), strict=True
        )
    )
    return TablePlan(config, physical, config.combine, radices)


def _rows_within_budget(config: TableConfig, natural_rows: int) -> int:
    if config.budget is None:
        return natural_rows
    rows = config.budget_rows()
    if rows < 1:
        raise BudgetError(
            f"table {config.name!r}: budget {config.budget!r} of {config.num_embeddings} ids "
            f"allows 0 rows; {config.method} needs at least 1 row, so the smallest valid "
            f"budget is {_smallest_budget(1, config.num_embeddings)}"
        )
    return rows


def _check_tbe_dim(config: TableConfig) -> None:
    if config.dim % TBE_DIM_MULTIPLE:
        raise ConfigError(
            f"table {config.name!r}: dim {config.dim} is not a multiple of {TBE_DIM_MULTIPLE}; "
            f"the table-batched kernels behind method {config.method!r} need row widths that "
            f"are multiples of {TBE_DIM_MULTIPLE}"
        )
    if config.method == "qr" and config.combine == "concat":
        smallest = TBE_DIM_MULTIPLE * config.num_partitions
        if config.dim < smallest:
            raise ConfigError(
                f"table {config.name!r}: qr concat splits dim {config.dim} into "
                f"{config.num_partitions} partitions of multiples of {TBE_DIM_MULTIPLE}; it "
                f"needs dim >= {smallest}"
            )


def _physical(config: TableConfig, name: str, rows: int, dim: int) -> PhysicalTable:
    return PhysicalTable(
        name=name, logical_table=config.name, num_rows=rows, dim=dim, dtype=config.dtype
    )


def _smallest_budget(rows: int, num_embeddings: int) -> str:
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
