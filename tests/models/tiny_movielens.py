"""A tiny MovieLens-shaped data set, generated, so the model tests need no download.

Same feature kinds as MovieLens-1M (single-id categoricals, a genre bag, a behaviour sequence
sharing the item ids, two dense features); labels come from hidden user and item factors, so a
model that learns the ids' embeddings lowers its loss. It is written under the name
movielens-1m into a temporary EMBTAB_DATA, so the CLI finds it by that name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from feature_store.offline import Dataset, PreparedTables, open_prepared, time_split, write_prepared
from feature_store.schema import FeatureSpec, Schema

USERS, ITEMS, GENRES, HISTORY = 60, 40, 6, 5
ROWS = 3000


def tiny_movielens(seed: int = 0) -> PreparedTables:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, USERS, ROWS)
    items = rng.integers(0, ITEMS, ROWS)
    user_factors = rng.normal(size=(USERS, 3))
    item_factors = rng.normal(size=(ITEMS, 3))
    logits = (user_factors[users] * item_factors[items]).sum(axis=1) * 1.5
    labels = (rng.random(ROWS) < 1 / (1 + np.exp(-logits))).astype(np.int8)

    item_genres = [rng.choice(GENRES, size=rng.integers(1, 4), replace=False) for _ in range(ITEMS)]
    genre_lengths = np.array([len(item_genres[i]) for i in items])
    genre_values = np.concatenate([item_genres[i] for i in items])
    history_values, history_lengths, seen = [], [], {u: [] for u in range(USERS)}
    for user, item in zip(users, items, strict=True):
        past = seen[user][-HISTORY:]
        history_values.extend(past)
        history_lengths.append(len(past))
        seen[user].append(int(item))

    def lists(values, lengths) -> pa.ListArray:
        offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.asarray(values, np.int64)))

    table = pa.table(
        {
            "user_id": pa.array(users.astype(np.int64)),
            "item_id": pa.array(items.astype(np.int64)),
            "age": pa.array((users % 7).astype(np.int64)),
            "genres": lists(genre_values, genre_lengths),
            "hist_item_id": lists(history_values, history_lengths),
            "user_activity": pa.array(np.log1p(rng.integers(0, 50, ROWS)).astype(np.float32)),
            "item_popularity": pa.array(np.log1p(rng.integers(0, 80, ROWS)).astype(np.float32)),
            "label": pa.array(labels),
            "timestamp": pa.array(np.arange(ROWS, dtype=np.int64)),
        }
    )
    schema = Schema(
        dataset="movielens-1m",
        features=(
            FeatureSpec("user_id", "categorical", USERS),
            FeatureSpec("item_id", "categorical", ITEMS),
            FeatureSpec("age", "categorical", 7),
            FeatureSpec("genres", "categorical", GENRES, max_length=3),
            FeatureSpec(
                "hist_item_id", "sequence", ITEMS, max_length=HISTORY, shares_ids_with="item_id"
            ),
            FeatureSpec("user_activity", "dense"),
            FeatureSpec("item_popularity", "dense"),
        ),
        id_columns={"user": "user_id", "item": "item_id"},
    )
    return PreparedTables(schema=schema, splits=time_split(table), extra_info={"tiny": True})


def prepare_tiny(cache: Path) -> Dataset:
    """The tiny data set in `cache` (EMBTAB_DATA must point there), written on first use."""
    if not (cache / "prepared" / "movielens-1m" / "schema.json").exists():
        write_prepared("movielens-1m", tiny_movielens())
    return open_prepared("movielens-1m")
