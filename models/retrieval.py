"""Full-catalogue retrieval evaluation: recall@k and NDCG@k of a two-tower model on a split.

Each user with at least one positive in the split is one query, represented by the user's first
row in the split (its features, behaviour sequence included, as of the split's start). The
relevant items are the user's positives in the split; items the user interacted with in earlier
splits are excluded from the ranking. The candidates are the items known when the split starts:
those of the earlier splits (of the training split itself when it is the one evaluated), each
represented by its first row there. An item first seen in the split cannot be retrieved from
interactions by any method; it stays among the relevant items, so recall counts it as missed.
A baseline without a model (most popular items) is scored by `rank` under exactly this
protocol: same queries, candidates, exclusions and relevant items.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from feature_store.offline import SPLITS, Dataset
from feature_store.schema import Schema
from models.batches import batch_from_columns
from models.errors import ModelConfigError
from models.metrics import hits, ndcg_at_k, recall_at_k
from models.two_tower import TwoTower


class RetrievalEvaluator:
    """Reads the split and the catalogue once; `__call__(model)` ranks and scores."""

    def __init__(
        self,
        dataset: Dataset,
        schema: Schema,
        split: str,
        ks: tuple[int, ...],
        batch_size: int = 8192,
        rows: int | None = None,
    ) -> None:
        user = schema.id_columns.get("user")
        item = schema.id_columns.get("item")
        if user is None or item is None:
            raise ModelConfigError(
                f"retrieval evaluation needs user and item id columns; schema "
                f"{schema.dataset!r} names {schema.id_columns or 'none'}"
            )
        self.schema = schema
        self.ks = tuple(sorted(ks))
        self.batch_size = batch_size
        columns = [spec.name for spec in schema.features] + [schema.label]
        if user not in columns:
            columns.append(user)
        if item not in columns:
            columns.append(item)
        tables = {name: dataset.read(name, columns=columns) for name in SPLITS}
        target = tables[split] if rows is None else tables[split].slice(0, rows)
        users = target.column(user).to_numpy()
        items = target.column(item).to_numpy()
        positive = target.column(schema.label).to_numpy() > 0
        query_users, first_rows = np.unique(users, return_index=True)
        query_users, first_rows = _keep(query_users, first_rows, np.unique(users[positive]))
        self.queries = target.take(first_rows)
        pairs = np.unique(
            np.stack([np.searchsorted(query_users, users[positive]), items[positive]], axis=1),
            axis=0,
        )
        self.relevant_rows, self.relevant_items = pairs[:, 0], pairs[:, 1]
        self.num_relevant = np.bincount(self.relevant_rows, minlength=len(query_users))

        earlier = [tables[name] for name in SPLITS[: SPLITS.index(split)]]
        known = pa.concat_tables(earlier or [tables[split]])
        self.catalogue_items, first_item_rows = np.unique(
            known.column(item).to_numpy(), return_index=True
        )
        self.catalogue = known.take(first_item_rows)

        seen_users = np.concatenate([t.column(user).to_numpy() for t in earlier] or [[]])
        seen_items = np.concatenate([t.column(item).to_numpy() for t in earlier] or [[]])
        known = np.isin(seen_users, query_users)
        self.excluded_rows = np.searchsorted(query_users, seen_users[known].astype(np.int64))
        self.excluded_columns = np.searchsorted(
            self.catalogue_items, seen_items[known].astype(np.int64)
        )

    def _vectors(self, model: TwoTower, table: pa.Table, side: str) -> torch.Tensor:
        tower = model.user_vectors if side == "user" else model.item_vectors
        parts = []
        for start in range(0, table.num_rows, self.batch_size):
            batch = batch_from_columns(table.slice(start, self.batch_size), self.schema)
            parts.append(tower(batch.sparse, batch.dense))
        return torch.cat(parts)

    @property
    def num_queries(self) -> int:
        return self.queries.num_rows

    @torch.no_grad()
    def __call__(self, model: TwoTower) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            items = self._vectors(model, self.catalogue, "item")
            users = self._vectors(model, self.queries, "user")
        finally:
            model.train(was_training)
        return self.rank(users @ items.T)

    def rank(self, scores: torch.Tensor) -> dict[str, float]:
        """Metrics of any [queries, catalogue items] score matrix (e.g. a popularity baseline)."""
        scores = scores.clone()
        scores[self.excluded_rows, self.excluded_columns] = float("-inf")
        depth = min(self.ks[-1], scores.shape[1])
        top = self.catalogue_items[scores.topk(depth, dim=1).indices.cpu().numpy()]
        hit_matrix = hits(top, self.relevant_rows, self.relevant_items)
        result: dict[str, float] = {"queries": float(len(scores))}
        for k in self.ks:  # a k beyond the catalogue ranks all of it
            result[f"recall@{k}"] = recall_at_k(hit_matrix, self.num_relevant, min(k, depth))
            result[f"ndcg@{k}"] = ndcg_at_k(hit_matrix, self.num_relevant, min(k, depth))
        return result


def _keep(
    values: np.ndarray, positions: np.ndarray, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isin(values, allowed)
    return values[keep], positions[keep]
