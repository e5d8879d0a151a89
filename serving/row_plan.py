"""Which physical rows a batch's forward will read, computed before the forward runs.

Static tables (full, hash, unified, qr, graphhash): the collection's own index transforms
(`EmbeddingCollection.index_transform`, pure functions) give each feature's physical rows, so the
scorer fetches exactly the rows the forward reads. Self-managed (collisionless) tables are keyed
by raw id: the batch's distinct ids are renumbered 0..U-1 (local ids), the KJT carries local ids,
and the scorer loads each id's row (or the default row) at its local id, so the server's copy of
the table only ever holds one batch's ids, never the whole id space.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from embedding_tables.collection import EmbeddingCollection
from serving.jagged import Jagged


@dataclass(frozen=True)
class BatchRows:
    """`columns`: sparse columns for the KJT (id-keyed features renumbered); `needed`: physical
    table -> distinct row ids (raw ids for id-keyed tables), sorted; `local`: id-keyed table ->
    the local id of each of its needed ids."""

    columns: dict[str, Jagged]
    needed: dict[str, np.ndarray]
    local: dict[str, np.ndarray]


class RowPlanner:
    """`feature_columns`: the input column each collection feature reads (`Model.feature_columns`:
    a feature's own, or the column a model derives it from in its forward)."""

    def __init__(self, embeddings: EmbeddingCollection, feature_columns: dict[str, str]) -> None:
        self.feature_columns = feature_columns
        self.id_keyed = {
            feature: table
            for feature, table in embeddings.feature_to_table.items()
            if table in embeddings.self_managed
        }
        self.transforms = {
            feature: embeddings.index_transform(feature)
            for feature in embeddings.feature_to_table
            if feature not in self.id_keyed
        }

    def plan(self, columns: dict[str, Jagged]) -> BatchRows:
        parts: dict[str, list[np.ndarray]] = {}
        for feature, transform in self.transforms.items():
            ids = torch.from_numpy(columns[self.feature_columns[feature]].values)
            for table, rows in zip(transform.tables, transform(ids), strict=True):
                parts.setdefault(table, []).append(rows.numpy())
        needed = {table: distinct_sorted(np.concatenate(rows)) for table, rows in parts.items()}

        raw_by_table: dict[str, list[np.ndarray]] = {}
        for feature, table in self.id_keyed.items():
            raw_by_table.setdefault(table, []).append(columns[self.feature_columns[feature]].values)
        renumbered = dict(columns)
        local = {}
        for table, raws in raw_by_table.items():
            distinct = distinct_sorted(np.concatenate(raws))
            needed[table] = distinct
            local[table] = np.arange(len(distinct), dtype=np.int64)
            # A derived feature (DARE's) gets its ids from its source column in the model's
            # forward, renumbered by the source's table; its own table reads the same columns
            # (it copies the source table's features), so both number the same distinct ids.
            for feature, owner in self.id_keyed.items():
                column_name = self.feature_columns[feature]
                if owner == table and column_name == feature:
                    column = columns[feature]
                    renumbered[feature] = Jagged(
                        np.searchsorted(distinct, column.values).astype(np.int64), column.lengths
                    )
        return BatchRows(renumbered, needed, local)


def distinct_sorted(ids: np.ndarray) -> np.ndarray:
    """np.unique(ids) for the small arrays of one batch, at a fraction of its fixed cost (which
    was most of the row plan's time, once per table per batch)."""
    ordered = np.sort(ids)
    first = np.empty(len(ordered), dtype=bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return ordered[first]
