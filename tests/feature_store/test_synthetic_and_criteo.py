"""The synthetic Criteo-like generator and the real-Criteo TSV loader."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from feature_store import criteo, datasets, synthetic
from feature_store.criteo import CriteoFormatError, read_criteo
from feature_store.offline import SPLITS
from feature_store.prepare import prepare_spec
from feature_store.synthetic import (
    CRITEO_KAGGLE_CARDINALITIES,
    SyntheticConfigError,
    SyntheticCriteo,
    SyntheticCriteoConfig,
)


def test_generator_is_deterministic_by_seed_and_chunk():
    config = SyntheticCriteoConfig(rows=5_000, chunk_rows=2_000, seed=7)
    first = SyntheticCriteo(config).chunk(1)
    again = SyntheticCriteo(config).chunk(1)
    other_seed = SyntheticCriteo(SyntheticCriteoConfig(rows=5_000, chunk_rows=2_000, seed=8))
    assert first.equals(again)
    assert not first.equals(other_seed.chunk(1))
    assert sum(batch.num_rows for batch in SyntheticCriteo(config).batches()) == 5_000


def test_generator_has_26_zipf_features_13_dense_and_the_target_ctr():
    generator = SyntheticCriteo(SyntheticCriteoConfig(rows=50_000, chunk_rows=50_000))
    batch = generator.chunk(0)
    schema = generator.schema()
    assert len(schema.categorical) == 26 and len(schema.dense) == 13
    for index, cardinality in enumerate(CRITEO_KAGGLE_CARDINALITIES):
        ids = batch.column(f"cat_{index}").to_numpy()
        assert ids.min() >= 0 and ids.max() < cardinality
    # Zipf: on the largest feature the most frequent id is far above uniform.
    ids = batch.column("cat_2").to_numpy()
    assert np.bincount(ids % 1_000_003).max() > 100
    assert batch.column("label").to_numpy().mean() == pytest.approx(0.25, abs=0.03)


def test_generator_reaches_criteo_terabyte_cardinalities():
    config = SyntheticCriteoConfig(rows=1_000, chunk_rows=1_000, cardinalities=(10**8,) * 26)
    ids = SyntheticCriteo(config).chunk(0).column("cat_0").to_numpy()
    assert ids.max() < 10**8 and len(np.unique(ids)) > 100


def test_labels_depend_on_the_ids_through_the_teacher():
    """Popular ids' click rates spread more than binomial noise around the base rate would
    (a mean squared z-score of 1 is pure noise): the label carries per-id signal to learn."""
    batch = SyntheticCriteo(SyntheticCriteoConfig(rows=200_000, chunk_rows=200_000)).chunk(0)
    ids = batch.column("cat_9").to_numpy()
    labels = batch.column("label").to_numpy()
    base = labels.mean()
    counts = np.bincount(ids)
    z_squared = []
    for value in np.argsort(counts)[-30:]:
        n = counts[value]
        rate = labels[ids == value].mean()
        z_squared.append((rate - base) ** 2 / (base * (1 - base) / n))
    assert np.mean(z_squared) > 2.0


@pytest.mark.parametrize(
    "config",
    [dict(rows=5), dict(cardinalities=(0,)), dict(cardinalities=(10**9,)), dict(zipf_exponent=1.0)],
)
def test_bad_generator_configs_are_rejected(config):
    with pytest.raises(SyntheticConfigError):
        SyntheticCriteoConfig(**config)


def test_synthetic_dataset_prepares_into_splits(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBTAB_DATA", str(tmp_path))
    dataset = datasets.prepare("synthetic-criteo", rows=10_000, seed=3)
    assert dataset.info["rows"] == 10_000
    assert dataset.info["splits"]["test"]["rows"] == 1_000
    assert dataset.read("train").num_rows == 8_000
    # The splits are the generator's rows in order, its schema the generator's.
    config = SyntheticCriteoConfig(rows=10_000, seed=3)
    generated = pa.Table.from_batches(list(SyntheticCriteo(config).batches()))
    prepared = pa.concat_tables(dataset.read(split) for split in SPLITS)
    assert prepared.equals(generated.select(prepared.column_names))
    assert dataset.schema == SyntheticCriteo(config).schema()


def test_synthetic_spec_follows_the_configured_cardinalities(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBTAB_DATA", str(tmp_path))
    config = SyntheticCriteoConfig(rows=200, chunk_rows=64, cardinalities=(7, 5000, 300))
    dataset = prepare_spec(synthetic.spec(config))
    assert [(f.name, f.cardinality) for f in dataset.schema.categorical] == [
        ("cat_0", 7),
        ("cat_1", 5000),
        ("cat_2", 300),
    ]
    assert dataset.schema.id_columns == {"user": "cat_1", "item": "cat_2"}
    assert dataset.schema == SyntheticCriteo(config).schema()


def _criteo_line(label: int, dense: list[str], categorical: list[str]) -> str:
    return "\t".join([str(label), *dense, *categorical]) + "\n"


def test_criteo_days_are_prepared_like_the_dlrm_scripts(tmp_path, monkeypatch):
    """Dense values become log1p(max(x, 0)), missing 0; hex ids are folded into max_ind_range
    ids, the last of them for a missing value; the last day is test, the one before valid."""
    monkeypatch.setenv("EMBTAB_DATA", str(tmp_path / "cache"))
    categorical = ["68fd1e64", "80e26c9b", ""] + ["0000000a"] * 23
    dense = ["5", "", "-1"] + ["0"] * 10
    days = [tmp_path / f"day_{index}" for index in range(3)]
    days[0].write_text(_criteo_line(1, dense, categorical) + _criteo_line(0, [""] * 13, [""] * 26))
    days[1].write_text(_criteo_line(0, ["1"] * 13, ["0000000b"] * 26))
    days[2].write_text(_criteo_line(1, ["2"] * 13, ["0000000c"] * 26))
    dataset = prepare_spec(criteo.spec(days, max_ind_range=1000))
    assert {split: dataset.info["splits"][split]["rows"] for split in SPLITS} == {
        "train": 2,
        "valid": 1,
        "test": 1,
    }
    assert all(dataset.schema.feature(f"cat_{i}").cardinality == 1000 for i in range(26))
    rows = dataset.read("train").to_pylist()
    assert rows[0]["label"] == 1 and rows[0]["timestamp"] == 0
    assert rows[0]["dense_0"] == pytest.approx(np.log1p(5))
    assert rows[0]["dense_1"] == 0.0 and rows[0]["dense_2"] == 0.0
    assert rows[0]["cat_0"] == int("68fd1e64", 16) % 999
    assert rows[0]["cat_1"] == int("80e26c9b", 16) % 999
    assert rows[0]["cat_2"] == 999
    assert rows[0]["cat_3"] == 10
    assert all(rows[1][f"cat_{i}"] == 999 for i in range(26))
    assert dataset.read("valid").to_pylist()[0]["cat_5"] == 11
    assert dataset.read("test").to_pylist()[0]["dense_4"] == pytest.approx(np.log1p(2))


def test_a_criteo_value_that_is_not_hex_names_the_file_and_line(tmp_path):
    path = tmp_path / "day_0"
    good = _criteo_line(0, ["1"] * 13, ["0000000a"] * 26)
    path.write_text(good + _criteo_line(0, ["1"] * 13, ["0000000a"] * 25 + ["xyz"]))
    with pytest.raises(
        CriteoFormatError,
        match=r"day_0: line 2: a categorical value 'xyz' is not hex; accepted: up to 8 hex",
    ):
        list(read_criteo(path))


def test_malformed_criteo_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "day_1"
    good = _criteo_line(0, ["1"] * 13, ["0000000a"] * 26)
    path.write_text(good + good + "1\t2\t3\n")
    with pytest.raises(CriteoFormatError, match=r"day_1: line 3: expected 40 .* got 3"):
        list(read_criteo(path))


def test_criteo_dataset_needs_existing_files(tmp_path):
    with pytest.raises(datasets.DataError, match="does not exist"):
        datasets.prepare("criteo", paths=[tmp_path / "missing"])
