"""`robe`: ROBE-Z, the Random Offset Block Embedding array of Desai et al. (MLSys 2022).

Every id's embedding is read from one shared parameter array: its dim/Z blocks of Z
consecutive parameters (Z = `block_size`) start at hashed offsets, block j at
hash(id, j, seed), and are concatenated. The budget is the array's size, whatever the number
of ids.

Offsets here are multiples of Z, where the paper allows any offset of the circular array. So
the array is a table of Z-wide rows and a block is one row, read by a plain gather: that is
what lets fbgemm's table-batched kernels and the fused CPU and Triton kernels run ROBE like
any hashed table. Blocks that straddle two aligned rows (partly overlapping other blocks) are
what the alignment gives up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from embedding_tables.errors import BudgetError, ConfigError
from embedding_tables.hashing import bucket_int, hash64_int
from embedding_tables.methods.base import Method
from embedding_tables.methods.registry import register
from embedding_tables.methods.unified import UnifiedTransform
from embedding_tables.planning import (
    TBE_DIM_MULTIPLE,
    TablePlan,
    check_tbe_dim,
    physical_table,
    smallest_budget,
)
from embedding_tables.transforms import GraphHashMappingLike

if TYPE_CHECKING:
    from embedding_tables.config import TableConfig


@register
@dataclass(frozen=True)
class ROBE(Method):
    """`block_size`: Z, the parameters of one block; it divides dim, so an id reads dim / Z
    blocks. The shared array holds the budget's parameters (the full table's with no budget)."""

    name = "robe"

    block_size: int = TBE_DIM_MULTIPLE

    def __post_init__(self) -> None:
        if (
            isinstance(self.block_size, bool)
            or not isinstance(self.block_size, int)
            or self.block_size < TBE_DIM_MULTIPLE
            or self.block_size % TBE_DIM_MULTIPLE
        ):
            raise ConfigError(
                f"method 'robe': block_size must be a positive multiple of {TBE_DIM_MULTIPLE} "
                f"(the row widths the table-batched kernels take), got {self.block_size!r}"
            )

    def check_table(self, config: TableConfig) -> None:
        """block_size must divide dim and fit in the shared array the budget buys."""
        check_tbe_dim(config)
        accepted = accepted_block_sizes(config.dim)
        if config.dim % self.block_size:
            raise ConfigError(
                f"table {config.name!r}: robe block_size {self.block_size} does not divide dim "
                f"{config.dim}; accepted block sizes: {', '.join(map(str, accepted))}"
            )
        elements = array_elements(config)
        if elements < self.block_size:
            fitting = [size for size in accepted if size <= elements]
            raise BudgetError(
                f"table {config.name!r}: robe block_size {self.block_size} is larger than the "
                f"shared array of {elements} parameters that budget {config.budget!r} buys; "
                f"accepted block sizes at this budget: "
                f"{', '.join(map(str, fitting)) or 'none'} (multiples of {TBE_DIM_MULTIPLE} "
                f"dividing dim {config.dim}, at most the array's size); a budget of "
                f"{smallest_budget(1, config.num_embeddings)} or more holds any of them"
            )

    def plan(self, config: TableConfig, mapping_rows: int | None) -> TablePlan:
        rows = array_elements(config) // self.block_size
        physical = physical_table(config, config.name, rows, self.block_size)
        return TablePlan(config, (physical,), "concat")

    def blocks(self, config: TableConfig) -> int:
        """Blocks per id: dim / block_size."""
        return config.dim // self.block_size

    def block_seeds(self, config: TableConfig) -> tuple[int, ...]:
        """Seed of block j's offset hash: hash64(j, table seed), so block j's row is
        bucket(id, hash64(j, seed), rows), i.e. hash(id, j, seed) mod rows."""
        return tuple(hash64_int(block, config.seed) for block in range(self.blocks(config)))

    def lookup_tables(self, config: TableConfig, plan: TablePlan, feature: str) -> tuple[str, ...]:
        return (plan.physical[0].name,) * self.blocks(config)

    def transform(
        self,
        config: TableConfig,
        feature: str,
        plan: TablePlan,
        mapping: GraphHashMappingLike | None,
    ) -> UnifiedTransform:
        tables = self.lookup_tables(config, plan, feature)
        return UnifiedTransform(
            feature, tables, self.block_seeds(config), plan.physical[0].num_rows
        )

    def reference_rows(
        self, plan: TablePlan, feature: str, value: int, mapping: GraphHashMappingLike | None
    ) -> list[tuple[str, int]]:
        physical = plan.physical[0]
        return [
            (physical.name, bucket_int(value, seed, physical.num_rows))
            for seed in self.block_seeds(plan.config)
        ]

    def at_budget(self, config: TableConfig) -> tuple[TableConfig, dict[str, Any]]:
        """Nothing to choose (the config refused a budget too small for one block); records
        the array's rows of block_size parameters."""
        plan = self.plan(config, None)
        return config, {"array_rows": plan.physical[0].num_rows, "blocks": self.blocks(config)}


def accepted_block_sizes(dim: int) -> list[int]:
    """The block sizes a table of width `dim` takes: multiples of 4 dividing it."""
    return [size for size in range(TBE_DIM_MULTIPLE, dim + 1, TBE_DIM_MULTIPLE) if dim % size == 0]


def array_elements(config: TableConfig) -> int:
    """Parameters of the shared array: the budget's bytes over the element size (a fraction
    of the full table's, or int rows of dim), the full table's with no budget."""
    if config.budget is None:
        return config.num_embeddings * config.dim
    if isinstance(config.budget, int):
        return config.budget * config.dim
    return int(config.num_embeddings * config.dim * config.budget)
