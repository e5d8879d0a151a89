"""`hash`: the hashing trick, row = hash(id) mod rows; every int64 is a valid id."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from embedding_tables.hashing import bucket, bucket_int, seed_key
from embedding_tables.methods.base import Method
from embedding_tables.methods.registry import register
from embedding_tables.planning import TablePlan, check_tbe_dim, one_table_plan, rows_within_budget
from embedding_tables.transforms import GraphHashMappingLike, SlotRule, check_id_dtype

if TYPE_CHECKING:
    from embedding_tables.config import TableConfig


@register
@dataclass(frozen=True)
class Hash(Method):
    """int(num_embeddings x budget) rows (all of them with no budget), hashed with the table's
    seed."""

    name = "hash"

    def plan(self, config: TableConfig, mapping_rows: int | None) -> TablePlan:
        check_tbe_dim(config)
        rows = rows_within_budget(config, self.name)
        return one_table_plan(config, rows, "single")

    def transform(
        self,
        config: TableConfig,
        feature: str,
        plan: TablePlan,
        mapping: GraphHashMappingLike | None,
    ) -> HashTransform:
        tables = self.lookup_tables(config, plan, feature)
        return HashTransform(feature, tables, config.seed, plan.physical[0].num_rows)

    def reference_rows(
        self, plan: TablePlan, feature: str, value: int, mapping: GraphHashMappingLike | None
    ) -> list[tuple[str, int]]:
        physical = plan.physical[0]
        return [(physical.name, bucket_int(value, plan.config.seed, physical.num_rows))]


@dataclass(frozen=True)
class HashTransform:
    """row = bucket(id, seed, num_rows)."""

    feature: str
    tables: tuple[str, ...]
    seed: int
    num_rows: int

    def __call__(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return [bucket(check_id_dtype(ids, self.feature), self.seed, self.num_rows)]

    def slot_rule(self, lookup: int) -> SlotRule:
        return SlotRule(self, lookup, "hash", seed_key(self.seed), 1, self.num_rows)
