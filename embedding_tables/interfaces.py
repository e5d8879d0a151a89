"""The two lookup interfaces every backend implements, so callers never ask which one they have.

`TableGroupLookup` is one group of physical tables looked up together: fbgemm's TBE
(`lookup.TableBatchedLookup`), the torch ops (`torch_lookup.TorchLookup`) and the fused Triton
group (`kernels.group.FusedTableGroup`); the collection reads and writes rows through it
(`collection.PhysicalTables`). `EmbeddingLookup` is a whole collection as the models, trainers
and delta sync use it: the one-process `EmbeddingCollection` and the torchrec-sharded
`ShardableEmbeddingCollection`.

Draining is named as such: `take_touched_rows` returns the rows changed since the last call and
resets the record; `mark_touched` adds to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

    from embedding_tables.planning import PhysicalTable


@runtime_checkable
class TableGroupLookup(Protocol):
    """One lookup group: its physical tables, by index, and their rows and row state."""

    tables: tuple[PhysicalTable, ...]

    def weight(self, table: int) -> torch.Tensor:
        """The [rows, dim] weights of table `table` (a view: writes go to the table)."""
        ...

    def momentum(self, table: int) -> torch.Tensor | None:
        """The row-wise Adagrad accumulator of `table` (a view), or None if there is none."""
        ...

    def mark_touched(self, table: int, rows: torch.Tensor) -> None:
        """Record `rows` of `table` as changed (rows written from outside a backward)."""
        ...

    def take_touched_rows(self, table: int) -> torch.Tensor:
        """Rows of `table` changed since the last call; resets the record."""
        ...

    def set_learning_rate(self, lr: float) -> None:
        """Learning rate of the group's fused optimizer."""
        ...


@runtime_checkable
class EmbeddingLookup(Protocol):
    """A collection of embedding tables: KeyedJaggedTensor in, KeyedTensor out."""

    @property
    def feature_names(self) -> list[str]: ...

    def output_dim(self, feature: str) -> int:
        """Width of `feature`'s pooled row."""
        ...

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled rows of every feature."""
        ...

    def physical_tables(self) -> list[PhysicalTable]:
        """The plain physical tables behind the features."""
        ...

    def take_touched_rows(self) -> dict[str, torch.Tensor]:
        """Physical rows changed since the last call, per physical table; resets the record."""
        ...

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of weights per logical table and their sum under "total"."""
        ...

    def num_parameters(self) -> dict[str, int]:
        """Weights (rows x dim) per logical table and their sum under "total"."""
        ...
