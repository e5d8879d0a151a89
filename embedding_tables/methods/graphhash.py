"""`graphhash`: GraphHash (Wu et al., 2024), rows shared by the ids of one cluster of the
user-item interaction graph.

The id -> rows map (`embedding_tables.graphhash.GraphHashMapping`, built offline from the
training interactions) is given per table; the `double` variant reads two rows per id and sums
them (with no clusters, the double-hashing baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from embedding_tables.errors import BudgetError, ConfigError
from embedding_tables.methods.base import Method, check_choice
from embedding_tables.methods.registry import register
from embedding_tables.planning import TablePlan, check_tbe_dim, one_table_plan, smallest_budget
from embedding_tables.transforms import GraphHashMappingLike, SlotRule, check_id_dtype

if TYPE_CHECKING:
    from embedding_tables.config import TableConfig

VARIANTS = ("single", "double")


@register
@dataclass(frozen=True)
class GraphHash(Method):
    """`graphhash_variant`: `single` (one row per id) or `double` (two rows, summed)."""

    name = "graphhash"
    indexes_by_id = True
    takes_mapping = True
    needs_interaction_graph = True

    graphhash_variant: str = "single"

    def __post_init__(self) -> None:
        check_choice(self.name, "graphhash_variant", self.graphhash_variant, VARIANTS)

    @property
    def lookups(self) -> int:
        return 2 if self.graphhash_variant == "double" else 1

    def plan(self, config: TableConfig, mapping_rows: int | None) -> TablePlan:
        check_tbe_dim(config)
        budget_rows = config.num_embeddings if config.budget is None else config.budget_rows()
        rows = budget_rows if mapping_rows is None else mapping_rows
        if rows < 1 or rows > budget_rows:
            raise BudgetError(
                f"table {config.name!r}: graphhash needs its mapping's {rows} rows within the "
                f"budget's {budget_rows} rows (budget {config.budget!r}); the smallest valid "
                f"budget is {smallest_budget(max(rows, 1), config.num_embeddings)}"
            )
        combine = "add" if self.lookups == 2 else "single"
        return one_table_plan(config, rows, combine)

    def lookup_tables(self, config: TableConfig, plan: TablePlan, feature: str) -> tuple[str, ...]:
        return (plan.physical[0].name,) * self.lookups

    def transform(
        self,
        config: TableConfig,
        feature: str,
        plan: TablePlan,
        mapping: GraphHashMappingLike | None,
    ) -> GraphHashTransform:
        if mapping is None:
            raise ConfigError(
                f"table {config.name!r}: graphhash needs a mapping (EmbeddingCollection(..., "
                f"mappings={{{config.name!r}: mapping}}) or ec.set_graphhash_mapping)"
            )
        return GraphHashTransform(feature, self.lookup_tables(config, plan, feature), mapping)

    def reference_rows(
        self, plan: TablePlan, feature: str, value: int, mapping: GraphHashMappingLike | None
    ) -> list[tuple[str, int]]:
        if mapping is None:
            raise ConfigError(f"table {plan.config.name!r}: graphhash needs a mapping")
        rows = mapping.transform_all(torch.tensor([value]))[0].tolist()
        return [(plan.physical[0].name, row) for row in rows]


@dataclass(frozen=True)
class GraphHashTransform:
    """The mapping's row(s) of each id."""

    feature: str
    tables: tuple[str, ...]
    mapping: GraphHashMappingLike

    def __call__(self, ids: torch.Tensor) -> list[torch.Tensor]:
        rows = self.mapping.transform_all(check_id_dtype(ids, self.feature))
        if rows.shape[1] != len(self.tables):
            raise ConfigError(
                f"feature {self.feature!r}: the graphhash mapping gives {rows.shape[1]} rows per "
                f"id; the table is configured for {len(self.tables)}"
            )
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.mapping.num_rows):
            raise ConfigError(
                f"feature {self.feature!r}: the graphhash mapping returned rows outside "
                f"[0, {self.mapping.num_rows})"
            )
        return list(rows.unbind(1))

    def slot_rule(self, lookup: int) -> SlotRule:
        return SlotRule(self, lookup, "mapping")
