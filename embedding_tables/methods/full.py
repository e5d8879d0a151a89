"""`full`: one row per id, the uncompressed baseline every budget is a fraction of."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from embedding_tables.errors import BudgetError
from embedding_tables.hashing import bucket_int
from embedding_tables.methods.base import Method, check_choice
from embedding_tables.methods.registry import register
from embedding_tables.planning import TablePlan, check_tbe_dim, physical_table
from embedding_tables.transforms import (
    GraphHashMappingLike,
    SlotRule,
    arith_rule,
    check_id_dtype,
    in_range_rows,
)

if TYPE_CHECKING:
    from embedding_tables.config import TableConfig

OUT_OF_RANGE = ("error", "hash")


@register
@dataclass(frozen=True)
class Full(Method):
    """`out_of_range`: what ids outside [0, num_embeddings) do: `error`, or `hash` them into
    the table with its seed."""

    name = "full"
    compresses = False
    indexes_by_id = True

    out_of_range: str = "error"

    def __post_init__(self) -> None:
        check_choice(self.name, "out_of_range", self.out_of_range, OUT_OF_RANGE)

    def plan(self, config: TableConfig, mapping_rows: int | None) -> TablePlan:
        check_tbe_dim(config)
        if config.budget is not None and config.budget_rows() < config.num_embeddings:
            raise BudgetError(
                f"table {config.name!r}: method 'full' keeps one row per id and needs "
                f"{config.num_embeddings} rows, but budget {config.budget!r} allows "
                f"{config.budget_rows()}; the smallest valid budget is 1.0 (or budget=None); "
                "use hash, unified, qr or graphhash to compress"
            )
        physical = physical_table(config, config.name, config.num_embeddings, config.dim)
        return TablePlan(config, (physical,), "single")

    def transform(
        self,
        config: TableConfig,
        feature: str,
        plan: TablePlan,
        mapping: GraphHashMappingLike | None,
    ) -> FullTransform:
        tables = self.lookup_tables(config, plan, feature)
        return FullTransform(feature, tables, config.num_embeddings, self.out_of_range, config.seed)

    def reference_rows(
        self, plan: TablePlan, feature: str, value: int, mapping: GraphHashMappingLike | None
    ) -> list[tuple[str, int]]:
        config = plan.config
        return [(plan.physical[0].name, in_range_int(config, self.out_of_range, value))]

    def bounded_ids(self) -> bool:
        return self.out_of_range == "error"


def in_range_int(config: TableConfig, out_of_range: str, value: int) -> int:
    """The reference of `in_range_rows` for one Python int (full and qr)."""
    if 0 <= value < config.num_embeddings:
        return value
    if out_of_range != "hash":
        raise ValueError(f"id {value} out of range for table {config.name!r}")
    return bucket_int(value, config.seed, config.num_embeddings)


@dataclass(frozen=True)
class FullTransform:
    """The id is the row."""

    feature: str
    tables: tuple[str, ...]
    num_embeddings: int
    out_of_range: str
    seed: int

    def __call__(self, ids: torch.Tensor) -> list[torch.Tensor]:
        ids = check_id_dtype(ids, self.feature)
        return [in_range_rows(ids, self.feature, self.num_embeddings, self.out_of_range, self.seed)]

    def slot_rule(self, lookup: int) -> SlotRule:
        return arith_rule(self, lookup, (self.num_embeddings,))
