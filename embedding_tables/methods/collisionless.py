"""`collisionless`: Monolith's collisionless table (Liu et al., 2022), every admitted id its own
row, with frequency admission, expiry and eviction at capacity.

The table is self-managed: `embedding_tables.collisionless.CollisionlessTable` keeps its rows and
its id map, the collection calls it per feature, and serving reads the id map it publishes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from embedding_tables.errors import ConfigError
from embedding_tables.methods.base import Method, check_choice
from embedding_tables.methods.registry import register
from embedding_tables.planning import ELEMENT_BYTES

if TYPE_CHECKING:
    from torch import nn

    from embedding_tables.config import TableConfig
    from embedding_tables.optimizer import SparseOptimizerConfig

ADMISSIONS = ("exact", "cms")
EVICTIONS = ("lru", "lfu")
DEFAULT_ROWS = ("shared", "zeros")


@register
@dataclass(frozen=True)
class Collisionless(Method):
    """An id gets a row once seen `min_count` times (counted exactly, or by a count-min sketch
    with `admission="cms"`), loses it after `ttl_seconds` unseen (None: never) or to the
    `eviction` policy at `capacity` rows (None: the budget's rows, else unbounded); ids
    without a row read the `shared` default row or `zeros`."""

    name = "collisionless"
    self_managed = True

    min_count: int = 1
    admission: str = "exact"
    ttl_seconds: float | None = None
    capacity: int | None = None
    eviction: str = "lru"
    default_row: str = "shared"

    def __post_init__(self) -> None:
        check_choice(self.name, "admission", self.admission, ADMISSIONS)
        check_choice(self.name, "eviction", self.eviction, EVICTIONS)
        check_choice(self.name, "default_row", self.default_row, DEFAULT_ROWS)
        if self.min_count < 1:
            raise ConfigError(
                f"method 'collisionless': min_count must be >= 1, got {self.min_count}"
            )
        if self.ttl_seconds is not None and self.ttl_seconds <= 0:
            raise ConfigError(
                f"method 'collisionless': ttl_seconds must be > 0 or None, got {self.ttl_seconds}"
            )
        if self.capacity is not None and self.capacity < 1:
            raise ConfigError(f"method 'collisionless': capacity must be >= 1, got {self.capacity}")

    def at_budget(self, config: TableConfig) -> tuple[TableConfig, dict[str, Any]]:
        """Capacity: the budget's rows."""
        capacity = max(1, config.budget_rows())
        method = dataclasses.replace(self, capacity=capacity)
        return dataclasses.replace(config, method=method), {"capacity": capacity}

    def planned_bytes(self, config: TableConfig) -> int:
        """At capacity (or the budget's rows)."""
        rows = self.capacity or config.budget_rows()
        return rows * config.dim * ELEMENT_BYTES[config.dtype]

    def build_table(
        self, config: TableConfig, optimizer: SparseOptimizerConfig | None
    ) -> nn.Module:
        # Imported here: the table's module imports TableConfig, whose module registers the
        # built-in methods (this one among them) as it loads.
        from embedding_tables.collisionless import CollisionlessTable

        fused = optimizer if optimizer is not None and optimizer.kind is not None else None
        return CollisionlessTable(config, fused)
