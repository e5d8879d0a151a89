"""`qr`: the compositional (quotient-remainder) embedding of Shi et al. (2020).

An id's mixed-radix digits index complementary partitions (digit 0 is id mod radices[0], the
last digit what remains), so distinct ids < num_embeddings get distinct digit tuples; the
partitions' rows are combined by `mult` (elementwise product), `add` or `concat`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from embedding_tables.errors import BudgetError, ConfigError
from embedding_tables.methods.base import Method, check_choice
from embedding_tables.methods.full import OUT_OF_RANGE, in_range_int
from embedding_tables.methods.registry import register
from embedding_tables.planning import (
    TBE_DIM_MULTIPLE,
    TablePlan,
    check_tbe_dim,
    physical_table,
    smallest_budget,
)
from embedding_tables.transforms import (
    GraphHashMappingLike,
    SlotRule,
    arith_rule,
    check_id_dtype,
    in_range_rows,
)

if TYPE_CHECKING:
    from embedding_tables.config import TableConfig

COMBINES = ("mult", "add", "concat")
# The most partitions `at_budget` tries before calling a budget infeasible.
MAX_PARTITIONS = 8


class DigitLookups(Method):
    """What a method whose lookups are an id's mixed-radix digits (`plan.radices`), one per
    physical table, answers: qr's partitions, ttrec's cores. A subclass has an `out_of_range`
    option (`full.OUT_OF_RANGE`)."""

    def transform(
        self,
        config: TableConfig,
        feature: str,
        plan: TablePlan,
        mapping: GraphHashMappingLike | None,
    ) -> QRTransform:
        tables = self.lookup_tables(config, plan, feature)
        return QRTransform(
            feature, tables, config.num_embeddings, plan.radices, self.out_of_range, config.seed
        )

    def reference_rows(
        self, plan: TablePlan, feature: str, value: int, mapping: GraphHashMappingLike | None
    ) -> list[tuple[str, int]]:
        digits = mixed_radix_digits(
            in_range_int(plan.config, self.out_of_range, value), plan.radices
        )
        return list(zip((physical.name for physical in plan.physical), digits, strict=True))

    def bounded_ids(self) -> bool:
        return self.out_of_range == "error"


@register
@dataclass(frozen=True)
class QR(DigitLookups):
    """`combine`: how the partitions' rows make the embedding; `num_partitions`: how many
    (2: remainder and quotient); `out_of_range`: as for `full`."""

    name = "qr"
    indexes_by_id = True

    combine: str = "mult"
    num_partitions: int = 2
    out_of_range: str = "error"

    def __post_init__(self) -> None:
        check_choice(self.name, "combine", self.combine, COMBINES)
        check_choice(self.name, "out_of_range", self.out_of_range, OUT_OF_RANGE)
        if self.num_partitions < 2:
            raise ConfigError(
                f"method 'qr': num_partitions must be >= 2, got {self.num_partitions}"
            )

    def plan(self, config: TableConfig, mapping_rows: int | None) -> TablePlan:
        check_tbe_dim(config)
        if self.combine == "concat" and config.dim < TBE_DIM_MULTIPLE * self.num_partitions:
            raise ConfigError(
                f"table {config.name!r}: qr concat splits dim {config.dim} into "
                f"{self.num_partitions} partitions of multiples of {TBE_DIM_MULTIPLE}; it "
                f"needs dim >= {TBE_DIM_MULTIPLE * self.num_partitions}"
            )
        radices = self.radices(config)
        physical = tuple(
            physical_table(config, name, rows, dim)
            for name, rows, dim in zip(
                self.partition_names(config), radices, self.partition_dims(config), strict=True
            )
        )
        return TablePlan(config, physical, self.combine, radices)

    def partition_dims(self, config: TableConfig) -> tuple[int, ...]:
        """Row width of each partition: `dim` for mult/add; for concat, multiples of 4 summing
        to `dim`, the wider ones first."""
        k = self.num_partitions
        if self.combine != "concat":
            return (config.dim,) * k
        quads, extra = divmod(config.dim // TBE_DIM_MULTIPLE, k)
        return tuple(TBE_DIM_MULTIPLE * (quads + (1 if i < extra else 0)) for i in range(k))

    def partition_names(self, config: TableConfig) -> tuple[str, ...]:
        """Physical names of the partitions, digit 0 first: `t.r` and `t.q` for 2, else
        `t.p0` ... `t.p{k-1}`."""
        if self.num_partitions == 2:
            return (f"{config.name}.r", f"{config.name}.q")
        return tuple(f"{config.name}.p{i}" for i in range(self.num_partitions))

    def radices(self, config: TableConfig) -> tuple[int, ...]:
        """Partition sizes (digit 0 first): their product covers num_embeddings and the
        weights fit the budget. With no budget: the balanced, smallest cover. With a budget:
        the largest digit-0 table (fewest ids sharing each of its rows) that still fits, the
        other partitions balanced."""
        n, k = config.num_embeddings, self.num_partitions
        dims = self.partition_dims(config)

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
                f"table {config.name!r}: qr with {k} partitions ({self.combine}) needs at least "
                f"{needed_rows} rows of dim {config.dim} to give each of {n} ids a unique "
                f"combination, but budget {config.budget!r} allows {config.budget_rows()} rows; "
                f"the smallest valid budget is {smallest_budget(needed_rows, n)}"
            )
        low, high = first, max(first, min(n, allowed // dims[0]))
        while low < high:
            middle = (low + high + 1) // 2
            if cost(radices_with_first(middle)) <= allowed:
                low = middle
            else:
                high = middle - 1
        return radices_with_first(low)

    def at_budget(self, config: TableConfig) -> tuple[TableConfig, dict[str, Any]]:
        """The fewest partitions whose cover of the ids fits the budget."""
        most = MAX_PARTITIONS
        if self.combine == "concat":
            most = min(most, config.dim // TBE_DIM_MULTIPLE)
        error: BudgetError | None = None
        for partitions in range(2, most + 1):
            candidate = dataclasses.replace(
                config, method=dataclasses.replace(self, num_partitions=partitions)
            )
            try:
                plan = candidate.method.plan(candidate, None)
            except BudgetError as failure:
                error = failure
                continue
            return candidate, {"partitions": partitions, "radices": plan.radices}
        raise BudgetError(
            f"qr ({self.combine}) cannot give each of the {config.num_embeddings} ids of "
            f"{config.name!r} a unique combination within budget {config.budget} with 2 to "
            f"{most} partitions; with {most}: {error}"
        )


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


def mixed_radix_digits(value: int, radices: tuple[int, ...]) -> list[int]:
    """The reference of QRTransform for one Python int: digit 0 is value mod radices[0], the
    last digit what remains."""
    digits = []
    for radix in radices[:-1]:
        digits.append(value % radix)
        value //= radix
    digits.append(value)
    return digits


@dataclass(frozen=True)
class QRTransform:
    """The id's mixed-radix digits, digit j indexing partition j."""

    feature: str
    tables: tuple[str, ...]
    num_embeddings: int
    radices: tuple[int, ...]
    out_of_range: str
    seed: int

    def __call__(self, ids: torch.Tensor) -> list[torch.Tensor]:
        ids = check_id_dtype(ids, self.feature)
        rest = in_range_rows(ids, self.feature, self.num_embeddings, self.out_of_range, self.seed)
        digits = []
        for radix in self.radices[:-1]:
            digits.append(torch.remainder(rest, radix))
            rest = torch.div(rest, radix, rounding_mode="floor")
        digits.append(rest)
        return digits

    def slot_rule(self, lookup: int) -> SlotRule:
        return arith_rule(self, lookup, self.radices)
