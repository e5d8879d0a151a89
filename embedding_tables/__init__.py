"""Compressed embedding tables behind one torchrec-shaped interface.

`EmbeddingCollection(tables, feature_to_table, optimizer=SparseOptimizerConfig(...))` takes a
torchrec KeyedJaggedTensor and returns a KeyedTensor of pooled rows (or, with `.sequence`, the
unpooled rows). See `embedding_tables.collection` for the training contract (fused sparse
optimizer, which weights are parameters), `embedding_tables.planning` for physical table names
and budgets, `embedding_tables.hashing` / `embedding_tables.transforms` for the pure index
transforms that serving reruns.

`check_kjt` / `CheckedKJT` (`embedding_tables.checked`) check a KJT once where it enters, so
that forwards skip that check.

`EmbeddingCollection` and the checked KJT (which need torchrec and fbgemm-gpu) are imported on
first use, so that the torch-only parts (configs, planning, hashing, transforms,
`embedding_tables.kernels`) import where those are absent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from embedding_tables.config import TableConfig
from embedding_tables.errors import (
    BackendError,
    BudgetError,
    ConfigError,
    EmbeddingTableError,
    FeatureError,
    IdError,
    OffsetsError,
)
from embedding_tables.hashing import bucket, feature_seed, hash64
from embedding_tables.optimizer import SparseOptimizerConfig
from embedding_tables.planning import PhysicalTable, TablePlan, plan_table
from embedding_tables.transforms import transform_for

if TYPE_CHECKING:
    from embedding_tables.checked import CheckedKJT, check_kjt
    from embedding_tables.collection import EmbeddingCollection

__all__ = [
    "BackendError",
    "BudgetError",
    "CheckedKJT",
    "ConfigError",
    "EmbeddingCollection",
    "EmbeddingTableError",
    "FeatureError",
    "IdError",
    "OffsetsError",
    "PhysicalTable",
    "SparseOptimizerConfig",
    "TableConfig",
    "TablePlan",
    "bucket",
    "check_kjt",
    "feature_seed",
    "hash64",
    "plan_table",
    "transform_for",
]


def __getattr__(name: str) -> object:
    if name == "EmbeddingCollection":
        from embedding_tables.collection import EmbeddingCollection

        return EmbeddingCollection
    if name in ("CheckedKJT", "check_kjt"):
        from embedding_tables import checked

        return getattr(checked, name)
    raise AttributeError(f"module 'embedding_tables' has no attribute {name!r}")
