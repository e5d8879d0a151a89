"""The Method base class: what every compression method tells the rest of embtab about itself.

A method is a frozen dataclass whose fields are its options (so an option that does not apply to
a method cannot be given to it) and whose methods answer every question the collection, the
kernels, serving, the model builder and the compression study ask of a table's method. The
defaults below describe a static method (plain physical tables read by an index transform);
docs/adding-a-method.md walks through writing one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from embedding_tables.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from embedding_tables.config import TableConfig
    from embedding_tables.optimizer import SparseOptimizerConfig
    from embedding_tables.planning import TablePlan
    from embedding_tables.transforms import GraphHashMappingLike, IndexTransform


@dataclass(frozen=True)
class Method:
    """One compression method and its options (the dataclass fields of a subclass)."""

    # The name a config file, a checkpoint manifest and the CLI use (`method: qr`).
    name: ClassVar[str] = ""
    # Whether the method spends less memory than one row per id (False only for `full`).
    compresses: ClassVar[bool] = True
    # Whether a table of this method serves every feature of a model at once (`unified`:
    # feature multiplexing), rather than one table per categorical feature.
    shares_one_table: ClassVar[bool] = False
    # Whether rows are indexed by the id itself, so raw 64-bit ids cannot be looked up.
    indexes_by_id: ClassVar[bool] = False
    # Whether each table needs an id -> rows mapping given from outside (GraphHash's clusters);
    # serving rebuilds it from the mapping published with the version.
    takes_mapping: ClassVar[bool] = False
    # Whether that mapping is built from the user-item interaction graph, so the method applies
    # to the user and item id tables only.
    needs_interaction_graph: ClassVar[bool] = False
    # Whether the table keeps its own rows and id state in a module of its own (the collection
    # calls it per feature; serving reads the id map it publishes) instead of physical tables.
    self_managed: ClassVar[bool] = False

    def options(self) -> dict[str, Any]:
        """The method's options as plain values (what a manifest or config file holds)."""
        values = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            values[field.name] = dict(value) if isinstance(value, Mapping) else value
        return values

    def check_table(self, config: TableConfig) -> None:
        """Refuse options that do not fit the table's dim or budget; TableConfig calls it when
        it is built, so a bad config file is refused before anything is planned."""

    def check(self, config: TableConfig, features: Sequence[str]) -> None:
        """Refuse a table whose options do not fit the features mapped to it."""

    def plan(self, config: TableConfig, mapping_rows: int | None) -> TablePlan:
        """The physical tables of `config`; `mapping_rows` is a given mapping's row count."""
        raise ConfigError(
            f"table {config.name!r}: method {self.name!r} keeps its rows in a table of its own "
            "and has no static plan"
        )

    def lookup_tables(self, config: TableConfig, plan: TablePlan, feature: str) -> tuple[str, ...]:
        """The physical table of each of `feature`'s lookups of one id, known before any
        mapping is given."""
        return tuple(physical.name for physical in plan.physical)

    def transform(
        self,
        config: TableConfig,
        feature: str,
        plan: TablePlan,
        mapping: GraphHashMappingLike | None,
    ) -> IndexTransform:
        """The pure ids -> rows function of `feature` (what serving reruns)."""
        raise ConfigError(
            f"table {config.name!r}: method {self.name!r} has no static index transform"
        )

    def output_dim(self, config: TableConfig, feature: str) -> int:
        """Width of `feature`'s embedding."""
        return config.dim

    def reference_rows(
        self,
        plan: TablePlan,
        feature: str,
        value: int,
        mapping: GraphHashMappingLike | None,
    ) -> list[tuple[str, int]]:
        """(physical table, row) of each lookup of one id, computed from the method's
        definition with Python integers: the specification the fast path is tested against."""
        raise ConfigError(f"method {self.name!r} has no plain-Python reference")

    def bounded_ids(self) -> bool:
        """Whether ids outside [0, num_embeddings) are refused (serving checks requests)."""
        return False

    def at_budget(self, config: TableConfig) -> tuple[TableConfig, dict[str, Any]]:
        """`config` with the options chosen to spend its budget, and what was chosen (the
        compression study records it): e.g. qr's partition count, collisionless's capacity."""
        return config, {}

    def planned_bytes(self, config: TableConfig) -> int:
        """Weight bytes the table allocates at most, known before allocating anything."""
        return sum(physical.memory_bytes for physical in self.plan(config, None).physical)

    def build_table(
        self, config: TableConfig, optimizer: SparseOptimizerConfig | None
    ) -> nn.Module:
        """The self-managed table module (self-managed methods only)."""
        raise ConfigError(f"table {config.name!r}: method {self.name!r} is not self-managed")


def check_choice(method: str, option: str, value: str, accepted: tuple[str, ...]) -> None:
    """ConfigError unless `value` is one of `accepted`."""
    if value not in accepted:
        raise ConfigError(
            f"method {method!r}: unknown {option} {value!r}; accepted: {', '.join(accepted)}"
        )
