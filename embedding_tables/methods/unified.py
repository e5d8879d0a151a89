"""`unified`: Unified Embedding's feature multiplexing, one hashed table shared by many features.

Each feature looks the shared table up `feature_chunks[feature]` times (k_f, default 1), lookup
j hashing with the seed `hashing.feature_seed(table seed, feature, j)`; the k_f rows are
concatenated, so the feature's embedding is k_f x dim wide.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from embedding_tables.errors import ConfigError
from embedding_tables.hashing import bucket, bucket_int, feature_seed, seed_key
from embedding_tables.methods.base import Method
from embedding_tables.methods.registry import register
from embedding_tables.planning import TablePlan, check_tbe_dim, one_table_plan, rows_within_budget
from embedding_tables.transforms import GraphHashMappingLike, SlotRule, check_id_dtype

if TYPE_CHECKING:
    from embedding_tables.config import TableConfig


@register
@dataclass(frozen=True)
class Unified(Method):
    """`feature_chunks`: lookups per feature (k_f); features not listed use 1."""

    name = "unified"
    shares_one_table = True

    feature_chunks: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for feature, chunks in self.feature_chunks.items():
            if chunks < 1:
                raise ConfigError(
                    f"method 'unified': feature_chunks[{feature!r}] must be >= 1, got {chunks}"
                )

    def check(self, config: TableConfig, features: Sequence[str]) -> None:
        stray = [f for f in self.feature_chunks if f not in features]
        if stray:
            raise ConfigError(
                f"table {config.name!r}: feature_chunks names {', '.join(map(repr, stray))}, not "
                f"mapped to it; its features: {', '.join(features)}"
            )

    def plan(self, config: TableConfig, mapping_rows: int | None) -> TablePlan:
        check_tbe_dim(config)
        rows = rows_within_budget(config, self.name)
        return one_table_plan(config, rows, "concat")

    def lookup_tables(self, config: TableConfig, plan: TablePlan, feature: str) -> tuple[str, ...]:
        return (plan.physical[0].name,) * self.feature_chunks.get(feature, 1)

    def transform(
        self,
        config: TableConfig,
        feature: str,
        plan: TablePlan,
        mapping: GraphHashMappingLike | None,
    ) -> UnifiedTransform:
        tables = self.lookup_tables(config, plan, feature)
        return UnifiedTransform(
            feature, tables, self.seeds(config, feature), plan.physical[0].num_rows
        )

    def seeds(self, config: TableConfig, feature: str) -> tuple[int, ...]:
        """Seeds of a feature's k_f lookups: feature_seed(table seed, feature, j)."""
        chunks = self.feature_chunks.get(feature, 1)
        return tuple(feature_seed(config.seed, feature, j) for j in range(chunks))

    def output_dim(self, config: TableConfig, feature: str) -> int:
        return self.feature_chunks.get(feature, 1) * config.dim

    def reference_rows(
        self, plan: TablePlan, feature: str, value: int, mapping: GraphHashMappingLike | None
    ) -> list[tuple[str, int]]:
        physical = plan.physical[0]
        return [
            (physical.name, bucket_int(value, seed, physical.num_rows))
            for seed in self.seeds(plan.config, feature)
        ]


@dataclass(frozen=True)
class UnifiedTransform:
    """k_f lookups into the shared table, lookup j with the feature's seed j."""

    feature: str
    tables: tuple[str, ...]
    seeds: tuple[int, ...]
    num_rows: int

    def __call__(self, ids: torch.Tensor) -> list[torch.Tensor]:
        ids = check_id_dtype(ids, self.feature)
        return [bucket(ids, seed, self.num_rows) for seed in self.seeds]

    def slot_rule(self, lookup: int) -> SlotRule:
        key = seed_key(self.seeds[lookup])
        return SlotRule(self, lookup, "hash", key, 1, self.num_rows)
