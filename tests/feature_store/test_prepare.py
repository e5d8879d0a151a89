"""The one preparation path, on raw files generated here: formats, ids, features, splits, the
artifact, and bad input refused before anything is written."""

from __future__ import annotations

import copy
import csv
import json
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from feature_store import datasets
from feature_store.artifact import (
    ArtifactError,
    Preprocessor,
    feature_seed,
    splitmix64,
    string_hash64,
)
from feature_store.offline import SPLITS, Dataset, prepared_root
from feature_store.prepare import PrepareError, _Buckets, prepare_spec
from feature_store.spec import SpecError, parse_spec

BASE_TIME = 1_700_000_000


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch) -> Path:
    """Prepared copies go to a scratch cache, never the user's."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("EMBTAB_DATA", str(directory))
    return directory


# -- raw files -----------------------------------------------------------------------------


def events(rows: int = 240, seed: int = 0, int_ids: bool = False) -> dict[str, list]:
    """Click events with tied times, repeated users and items, lists and numbers."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 12, rows)
    items = np.minimum(rng.zipf(1.5, rows) - 1, 29)
    cities = ["Paris, FR", 'say "hi"', "Berlin", "Lagos"]
    return {
        "user": [int(u) * 1_000_003 + 7 if int_ids else f"u{u}" for u in users],
        "item": [10**12 + int(i) if int_ids else f"i{i}" for i in items],
        "clicked": rng.integers(0, 2, rows).tolist(),
        "rating": rng.integers(1, 6, rows).tolist(),
        "ts": (BASE_TIME + rng.integers(0, rows // 3, rows)).tolist(),
        "tags": [
            [f"t{t}" for t in rng.choice(6, rng.integers(0, 4), replace=False)] for _ in users
        ],
        "price": np.round(rng.exponential(20.0, rows), 3).tolist(),
        "city": [cities[c] for c in rng.integers(0, len(cities), rows)],
    }


def write_csv(
    path: Path,
    columns: dict[str, list],
    delimiter: str = ",",
    header: bool = True,
    quoting: int = csv.QUOTE_MINIMAL,
) -> Path:
    names = list(columns)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter, quoting=quoting, escapechar=None)
        if header:
            writer.writerow(names)
        for row in zip(*columns.values(), strict=True):
            writer.writerow(["|".join(v) if isinstance(v, list) else v for v in row])
    return path


def write_parquet(path: Path, columns: dict[str, list], row_group_size: int = 64) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def base_spec(file_format: str = "csv", paths: list[str] | None = None, **top) -> dict:
    spec = {
        "name": "clicks",
        "source": {"format": file_format, "paths": paths or [f"events.{file_format}"]},
        "label": {"column": "clicked"},
        "time": {"column": "ts"},
        "roles": {"user": "user", "item": "item"},
        "features": [
            {"name": "user", "kind": "categorical"},
            {"name": "item", "kind": "categorical"},
            {"name": "tags", "kind": "multi_valued", "separator": "|"},
            {"name": "price", "kind": "dense", "transform": ["log1p", "standardise"]},
            {"name": "city", "kind": "categorical"},
            {"name": "hist_item", "kind": "sequence", "of": "item", "max_length": 4},
            {"name": "user_activity", "kind": "count", "of": "user"},
        ],
    }
    spec.update(top)
    return spec


def prepare(directory: Path, raw: dict, **options) -> Dataset:
    return prepare_spec(parse_spec(raw, base_dir=str(directory)), **options)


def splits(dataset: Dataset) -> dict[str, pa.Table]:
    return {split: dataset.read(split) for split in SPLITS}


def all_rows(dataset: Dataset) -> pa.Table:
    return pa.concat_tables(dataset.read(split) for split in SPLITS)


def with_int_ids(raw: dict) -> dict:
    raw = copy.deepcopy(raw)
    for feature in raw["features"]:
        if feature["name"] in ("user", "item"):
            feature["type"] = "int"
    return raw


def snapshot(name: str) -> dict[str, bytes]:
    root = prepared_root(name)
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# -- a plain-Python reference --------------------------------------------------------------


def reference(columns: dict[str, list], fit_rows: list[int] | None = None, history: int = 4):
    """The prepared rows of `base_spec` computed row by row: vocabularies of sorted values (the
    OOV id last), events in (time, user id, item id, source row) order, the user's previous
    `history` items, and the count of the user's earlier events."""
    rows = len(columns["ts"])
    fit_rows = list(range(rows)) if fit_rows is None else fit_rows

    def vocabulary(name: str) -> dict:
        values = sorted({columns[name][r] for r in fit_rows})
        return {value: index for index, value in enumerate(values)}

    vocabularies = {name: vocabulary(name) for name in ("user", "item", "city")}
    tag_values = sorted({t for r in fit_rows for t in columns["tags"][r]})
    tag_ids = {value: index for index, value in enumerate(tag_values)}

    def encode(name: str, value) -> int:
        return vocabularies[name].get(value, len(vocabularies[name]))

    order = sorted(
        range(rows),
        key=lambda r: (
            columns["ts"][r],
            encode("user", columns["user"][r]),
            encode("item", columns["item"][r]),
            r,
        ),
    )
    logs = [math.log1p(max(columns["price"][r], 0.0)) for r in fit_rows]
    mean = sum(logs) / len(logs)
    std = math.sqrt(sum(x * x for x in logs) / len(logs) - mean * mean)
    seen_items: dict[int, list[int]] = {}
    out = []
    for r in order:
        user = encode("user", columns["user"][r])
        item = encode("item", columns["item"][r])
        previous = seen_items.setdefault(user, [])
        out.append(
            {
                "user": user,
                "item": item,
                "tags": [tag_ids.get(t, len(tag_ids)) for t in columns["tags"][r]],
                "price": (math.log1p(max(columns["price"][r], 0.0)) - mean) / std,
                "city": encode("city", columns["city"][r]),
                "hist_item": previous[-history:],
                "user_activity": float(len(previous)),
                "label": columns["clicked"][r],
                "source_row": r,
            }
        )
        previous.append(item)
    return out


def assert_matches_reference(table: pa.Table, expected: list[dict]) -> None:
    got = table.to_pylist()
    assert len(got) == len(expected)
    for row, want in zip(got, expected, strict=True):
        for name in ("user", "item", "tags", "city", "hist_item", "label"):
            assert row[name] == want[name], (name, row, want)
        assert row["price"] == pytest.approx(want["price"], rel=1e-5, abs=1e-5)
        assert row["user_activity"] == want["user_activity"]


# -- formats, files, ids -------------------------------------------------------------------


def test_a_csv_file_is_prepared_as_the_reference_computes_it(tmp_path):
    columns = events()
    write_csv(tmp_path / "events.csv", columns)
    dataset = prepare(tmp_path, base_spec(fit_on="all"))
    assert_matches_reference(all_rows(dataset), reference(columns))
    assert dataset.info["rows"] == 240
    assert dataset.info["users"] == len(set(columns["user"]))
    assert dataset.info["items"] == len(set(columns["item"]))
    assert dataset.schema.feature("hist_item").shares_ids_with == "item"
    assert dataset.schema.feature("tags").max_length == 3
    assert [f.name for f in dataset.schema.dense] == ["price", "user_activity"]
    assert dataset.schema.id_columns == {"user": "user", "item": "item"}


def test_csv_tsv_and_parquet_of_the_same_rows_give_identical_splits(tmp_path):
    columns = events()
    write_csv(tmp_path / "events.csv", columns)
    write_csv(tmp_path / "events.tsv", columns, delimiter="\t")
    write_parquet(tmp_path / "events.parquet", columns)
    prepared = {}
    for file_format in ("csv", "tsv", "parquet"):
        dataset = prepare(tmp_path, base_spec(file_format))
        prepared[file_format] = (
            splits(dataset),
            Preprocessor.load(dataset.artifact_dir).vocabularies,
        )
    for file_format in ("tsv", "parquet"):
        for split in SPLITS:
            assert prepared[file_format][0][split].equals(prepared["csv"][0][split]), split
        for name, vocabulary in prepared["csv"][1].items():
            assert prepared[file_format][1][name].values.equals(vocabulary.values), name


def test_integer_ids_keep_their_numeric_order_and_match_string_ids_of_the_same_events(tmp_path):
    columns = events(int_ids=True)
    write_parquet(tmp_path / "events.parquet", columns)
    dataset = prepare(tmp_path, with_int_ids(base_spec("parquet", fit_on="all")))
    assert_matches_reference(all_rows(dataset), reference(columns))
    vocabulary = Preprocessor.load(dataset.artifact_dir).vocabularies["item"]
    assert vocabulary.values.type == pa.int64()
    assert vocabulary.values.to_pylist() == sorted(set(columns["item"]))
    # The same ids as integers in a CSV file prepare identically.
    write_csv(tmp_path / "events.csv", columns)
    from_csv = prepare(tmp_path, with_int_ids(base_spec("csv", fit_on="all")))
    for split in SPLITS:
        assert from_csv.read(split).equals(dataset.read(split))


def test_several_files_and_globs_read_as_one_file(tmp_path):
    columns = events()
    write_csv(tmp_path / "events.csv", columns)
    # Files are read in the sorted order of their paths: these sort as the rows go.
    parts = {"2023/part-0.csv": range(0, 100), "2024/part-1.csv": range(100, 170)}
    parts["2024/part-2.csv"] = range(170, 240)
    for path, part in parts.items():
        (tmp_path / "logs" / path).parent.mkdir(parents=True, exist_ok=True)
        piece = {name: [values[r] for r in part] for name, values in columns.items()}
        write_csv(tmp_path / "logs" / path, piece)
    whole = splits(prepare(tmp_path, base_spec(split={"by": "random", "valid": 0.1, "test": 0.2})))
    for paths in (
        ["logs/2023/part-0.csv", "logs/2024/part-1.csv", "logs/2024/part-2.csv"],
        ["logs/2023/part-0.csv", "logs/2024/part-*.csv"],
        ["logs/**/part-*.csv"],
    ):
        raw = base_spec(paths=paths, split={"by": "random", "valid": 0.1, "test": 0.2})
        pieces = splits(prepare(tmp_path, raw))
        for split in SPLITS:
            assert pieces[split].equals(whole[split]), (paths, split)


def test_header_line_column_names_and_quoting(tmp_path):
    columns = events()
    write_csv(tmp_path / "events.csv", columns)
    expected = splits(prepare(tmp_path, base_spec()))
    names = list(columns)
    # No header line: the spec names the columns.
    write_csv(tmp_path / "bare.csv", columns, header=False)
    raw = base_spec(paths=["bare.csv"])
    raw["source"].update(header=False, column_names=names)
    assert_same(splits(prepare(tmp_path, raw)), expected)
    # A header line with other names: `column_names` replaces it.
    renamed = {f"col{i}": values for i, values in enumerate(columns.values())}
    write_csv(tmp_path / "renamed.csv", renamed)
    raw = base_spec(paths=["renamed.csv"])
    raw["source"]["column_names"] = names
    assert_same(splits(prepare(tmp_path, raw)), expected)
    # Every field quoted with another quote character.
    write_csv_quoted(tmp_path / "quoted.csv", columns, quote="'")
    raw = base_spec(paths=["quoted.csv"])
    raw["source"]["quote_char"] = "'"
    assert_same(splits(prepare(tmp_path, raw)), expected)
    city = Preprocessor.load(prepared_root("clicks") / "artifact").vocabularies["city"]
    assert city.values.to_pylist() == sorted(set(columns["city"]))
    # Quotes kept as text when quoting is off (a TSV whose values contain quote characters).
    lines = ["\t".join(columns)] + [
        "\t".join("|".join(v) if isinstance(v, list) else str(v) for v in row)
        for row in zip(*columns.values(), strict=True)
    ]
    (tmp_path / "raw.tsv").write_text("\n".join(lines) + "\n")
    raw = base_spec("tsv", paths=["raw.tsv"])
    raw["source"]["quote_char"] = None
    assert_same(splits(prepare(tmp_path, raw)), expected)


def write_csv_quoted(path: Path, columns: dict[str, list], quote: str) -> None:
    def field(value) -> str:
        text = "|".join(value) if isinstance(value, list) else str(value)
        return quote + text.replace(quote, quote * 2) + quote

    lines = [",".join(field(name) for name in columns)]
    lines += [",".join(map(field, row)) for row in zip(*columns.values(), strict=True)]
    path.write_text("\n".join(lines) + "\n")


def assert_same(got: dict[str, pa.Table], expected: dict[str, pa.Table]) -> None:
    for split in SPLITS:
        assert got[split].equals(expected[split]), split


def test_a_side_file_is_joined_by_its_key_and_missing_keys_get_the_oov_id(tmp_path):
    columns = events()
    write_csv(tmp_path / "events.csv", columns)
    users = sorted(set(columns["user"]))[:-1]  # the last user has no row in the side file
    write_csv(
        tmp_path / "users.tsv",
        {"uid": users, "age": [f"a{i % 3}" for i in range(len(users))]},
        "\t",
    )
    raw = base_spec(fit_on="all")
    raw["features"].append({"name": "age", "kind": "categorical"})
    raw["joins"] = [
        {"format": "tsv", "path": "users.tsv", "column_names": ["user", "age"], "key": "user",
         "columns": ["age"]}
    ]  # fmt: skip
    table = all_rows(prepare(tmp_path, raw))
    age_of = {user: i % 3 for i, user in enumerate(users)}
    vocabulary = sorted(set(columns["user"]))
    assert table.column("age").to_pylist() == [
        age_of.get(vocabulary[user], 3) for user in table.column("user").to_pylist()
    ]
    write_csv(
        tmp_path / "users.tsv", {"uid": users + users[:1], "age": ["a0"] * (len(users) + 1)}, "\t"
    )
    with pytest.raises(PrepareError, match=r"joins\[key=user\]: the key column 'user' repeats"):
        prepare(tmp_path, raw)
    raw["joins"][0]["column_names"] = ["user", "years"]
    with pytest.raises(PrepareError, match=r"users\.tsv: no column 'age', which joins\[key=user\]"):
        prepare(tmp_path, raw)


# -- label and time ------------------------------------------------------------------------


def test_a_label_rule_over_a_column_equals_the_same_labels_as_a_column(tmp_path):
    columns = events()
    columns["good"] = [int(r >= 4) for r in columns["rating"]]
    write_parquet(tmp_path / "events.parquet", columns)
    by_column = prepare(tmp_path, base_spec("parquet", label={"column": "good"}))
    expected = splits(by_column)
    by_rule = prepare(
        tmp_path, base_spec("parquet", label={"column": "rating", "op": ">=", "value": 4})
    )
    assert_same(splits(by_rule), expected)
    labels = all_rows(by_rule).column("label")
    assert labels.type == pa.int8()
    assert 0 < pa.compute.sum(labels).as_py() < len(labels)
    below_two = prepare(
        tmp_path, base_spec("parquet", label={"column": "rating", "op": "<", "value": 2})
    )
    assert pa.compute.sum(all_rows(below_two).column("label")).as_py() == sum(
        r < 2 for r in columns["rating"]
    )


def test_event_time_in_seconds_milliseconds_and_iso8601_orders_alike(tmp_path):
    columns = events()
    write_csv(tmp_path / "events.csv", columns)
    seconds = splits(prepare(tmp_path, base_spec()))
    millis = dict(columns, ts=[t * 1000 + 250 for t in columns["ts"]])
    write_csv(tmp_path / "ms.csv", millis)
    by_ms = splits(
        prepare(tmp_path, base_spec(paths=["ms.csv"], time={"column": "ts", "unit": "ms"}))
    )
    iso = dict(
        columns,
        ts=[
            # Half the rows with a zone offset (the same instant), half without (UTC).
            datetime.fromtimestamp(t, UTC).isoformat()
            if i % 2
            else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")
            for i, t in enumerate(columns["ts"])
        ],
    )
    write_csv(tmp_path / "iso.csv", iso)
    by_iso = splits(
        prepare(tmp_path, base_spec(paths=["iso.csv"], time={"column": "ts", "unit": "iso8601"}))
    )
    for split in SPLITS:
        features = [name for name in seconds[split].column_names if name != "timestamp"]
        assert by_ms[split].select(features).equals(seconds[split].select(features))
        assert by_iso[split].select(features).equals(seconds[split].select(features))
        times = seconds[split].column("timestamp").to_numpy()
        assert np.array_equal(by_ms[split].column("timestamp").to_numpy(), times + 0.25)
        assert np.array_equal(by_iso[split].column("timestamp").to_numpy(), times)


# -- vocabularies, OOV, hashing ------------------------------------------------------------


def late_events() -> dict[str, list]:
    """Distinct times (no ties at the split boundaries); items 90.. appear only in the last
    20% of events, item 50 appears once in the first 80%."""
    columns = events(rows=100)
    columns["ts"] = [BASE_TIME + i for i in range(100)]
    columns["item"] = [f"i{90 + i % 3}" if i >= 80 else columns["item"][i] for i in range(100)]
    columns["item"][3] = "i50"
    columns["city"] = ["Oslo" if i >= 90 else c for i, c in enumerate(columns["city"])]
    return columns


def test_the_vocabulary_is_fitted_on_the_train_split_and_unseen_values_get_the_oov_id(tmp_path):
    columns = late_events()
    write_csv(tmp_path / "events.csv", columns)
    dataset = prepare(tmp_path, base_spec())
    assert_matches_reference(all_rows(dataset), reference(columns, fit_rows=list(range(80))))
    preprocessor = Preprocessor.load(dataset.artifact_dir)
    items = preprocessor.vocabularies["item"]
    assert "i90" not in items.values.to_pylist() and "i50" in items.values.to_pylist()
    oov = len(items.values)
    assert dataset.schema.feature("item").cardinality == oov + 1
    assert set(dataset.read("test").column("item").to_pylist()) == {oov}
    assert set(dataset.read("train").column("item").to_pylist()) <= set(range(oov))
    assert "Oslo" not in preprocessor.vocabularies["city"].values.to_pylist()


def test_min_count_sends_rare_values_to_the_oov_id(tmp_path):
    columns = late_events()
    write_csv(tmp_path / "events.csv", columns)
    raw = base_spec()
    raw["features"][1]["min_count"] = 2
    dataset = prepare(tmp_path, raw)
    items = Preprocessor.load(dataset.artifact_dir).vocabularies["item"]
    train_counts: dict[str, int] = {}
    for value in columns["item"][:80]:
        train_counts[value] = train_counts.get(value, 0) + 1
    assert items.values.to_pylist() == sorted(v for v, c in train_counts.items() if c >= 2)
    assert "i50" not in items.values.to_pylist()
    table = all_rows(dataset)
    row_of_i50 = table.column("timestamp").to_pylist().index(BASE_TIME + 3)
    assert table.column("item")[row_of_i50].as_py() == len(items.values)


def test_oov_false_drops_unseen_values_as_empty_bags(tmp_path):
    columns = late_events()
    write_csv(tmp_path / "events.csv", columns)
    raw = base_spec()
    raw["features"][1]["oov"] = False
    raw["features"][2]["oov"] = False
    dataset = prepare(tmp_path, raw)
    vocabulary = Preprocessor.load(dataset.artifact_dir).vocabularies["item"]
    assert dataset.schema.feature("item").cardinality == len(vocabulary.values)
    train = dataset.read("train").column("item")
    assert pa.types.is_list(train.type)
    assert all(len(bag) == 1 for bag in train.to_pylist())
    assert all(bag == [] for bag in dataset.read("test").column("item").to_pylist())
    # A dropped item is not part of the user's history either.
    for row in dataset.read("test").to_pylist():
        assert all(item < len(vocabulary.values) for item in row["hist_item"])


def _python_string_hash64(value: str, seed: int) -> int:
    """FNV-1a over the UTF-8 bytes from `offset ^ seed`, then splitmix64 of (hash ^ length)."""
    mask = (1 << 64) - 1
    data = value.encode()
    state = 0xCBF29CE484222325 ^ seed
    for byte in data:
        state = ((state ^ byte) * 0x100000001B3) & mask
    mixed = int(splitmix64(np.array([state ^ len(data)], dtype=np.uint64))[0])
    return mixed - (1 << 64) if mixed >= 1 << 63 else mixed


def test_string_hash64_is_fnv1a_then_splitmix(tmp_path):
    values = ["", "a", "u17", "héllo wörld", "x" * 70, "ab", "ba"]
    seed = feature_seed("user")
    assert string_hash64(pa.array(values), seed).tolist() == [
        _python_string_hash64(v, seed) for v in values
    ]
    sliced = pa.array(["skip", *values]).slice(1)
    assert string_hash64(sliced, seed).tolist() == string_hash64(pa.array(values), seed).tolist()
    assert (
        string_hash64(pa.array(values), seed + 1).tolist()
        != string_hash64(pa.array(values), seed).tolist()
    )


def test_string_hash64_matches_the_reference_for_any_strings():
    hypothesis = pytest.importorskip("hypothesis")

    @hypothesis.settings(max_examples=50, deadline=None, derandomize=True, database=None)
    @hypothesis.given(
        values=hypothesis.strategies.lists(hypothesis.strategies.text(max_size=40), max_size=20),
        seed=hypothesis.strategies.integers(0, 2**64 - 1),
    )
    def check(values, seed):
        assert string_hash64(pa.array(values, pa.string()), seed).tolist() == [
            _python_string_hash64(v, seed) for v in values
        ]

    check()


def test_hashed_ids_are_string_hashes_and_integers_stay_themselves(tmp_path):
    columns = events(int_ids=True)
    columns["user"] = [f"u{u}" for u in columns["user"]]
    write_parquet(tmp_path / "events.parquet", columns)
    raw = base_spec("parquet", fit_on="all")
    raw["features"][0]["ids"] = "hash"
    raw["features"][1].update(ids="hash", type="int")
    dataset = prepare(tmp_path, raw)
    preprocessor = Preprocessor.load(dataset.artifact_dir)
    assert set(preprocessor.vocabularies) == {"tags", "city"}
    table = all_rows(dataset)
    expected_users = {_python_string_hash64(u, feature_seed("user")) for u in columns["user"]}
    assert set(table.column("user").to_pylist()) == expected_users
    assert set(table.column("item").to_pylist()) == set(columns["item"])
    assert set(pa.compute.list_flatten(table.column("hist_item")).to_pylist()) <= set(
        columns["item"]
    )
    user = dataset.schema.feature("user")
    assert user.hashed and user.cardinality == len(set(columns["user"]))
    assert dataset.schema.feature("hist_item").hashed
    # Events stay in time order; ties are broken by the (hashed) user id.
    times = table.column("timestamp").to_numpy()
    assert np.all(np.diff(times) >= 0)


def test_index_ids_are_their_own_ids_folded_into_the_declared_cardinality(tmp_path):
    columns = events(int_ids=True)
    columns["shop"] = [(i * 7) % 60 for i in range(240)]  # 50..59 fold onto 0..9
    columns["shop"][11] = None
    write_parquet(tmp_path / "events.parquet", columns)
    raw = with_int_ids(base_spec("parquet"))
    raw["features"].append(
        {"name": "shop", "kind": "categorical", "type": "int", "ids": "index", "cardinality": 50}
    )
    dataset = prepare(tmp_path, raw)
    assert dataset.schema.feature("shop").cardinality == 51
    assert not dataset.schema.feature("shop").hashed
    assert "shop" not in Preprocessor.load(dataset.artifact_dir).vocabularies
    table = all_rows(dataset)
    expected = sorted(50 if v is None else v % 50 for v in columns["shop"])
    assert sorted(table.column("shop").to_pylist()) == expected
    raw["features"][-1]["oov"] = False
    dropped = all_rows(prepare(tmp_path, raw)).column("shop").to_pylist()
    assert sorted(len(bag) for bag in dropped) == [0] + [1] * 239
    assert sorted(v for bag in dropped for v in bag) == sorted(
        v % 50 for v in columns["shop"] if v is not None
    )


# -- multi-valued, dense -------------------------------------------------------------------


def test_multi_valued_from_a_list_column_and_from_a_delimited_string_agree(tmp_path):
    columns = events()
    write_parquet(tmp_path / "events.parquet", columns)
    from_lists = splits(prepare(tmp_path, base_spec("parquet")))
    delimited = dict(columns, tags=[";".join(tags) for tags in columns["tags"]])
    write_parquet(tmp_path / "delimited.parquet", delimited)
    raw = base_spec("parquet", paths=["delimited.parquet"])
    raw["features"][2]["separator"] = ";"
    assert_same(splits(prepare(tmp_path, raw)), from_lists)
    # max_length keeps each bag's first values.
    raw["features"][2]["max_length"] = 1
    dataset = prepare(tmp_path, raw)
    assert dataset.schema.feature("tags").max_length == 1
    for split in SPLITS:
        short = dataset.read(split).column("tags").to_pylist()
        full = from_lists[split].column("tags").to_pylist()
        assert short == [bag[:1] for bag in full]


def test_dense_transforms_clip_log1p_and_standardise_in_order(tmp_path):
    columns = events()
    columns["price"][5] = -3.0
    write_csv(tmp_path / "events.csv", columns)
    raw = base_spec(fit_on="all")
    raw["features"].append(
        {
            "name": "clipped",
            "kind": "dense",
            "column": "price",
            "transform": ["clip"],
            "clip": [1, 30],
        }
    )
    raw["features"].append(
        {
            "name": "scaled",
            "kind": "dense",
            "column": "price",
            "transform": ["clip", "standardise"],
            "clip": [0, 50],
        }
    )
    raw["features"].append({"name": "plain", "kind": "dense", "column": "price"})
    raw["features"].append(
        {"name": "logged", "kind": "dense", "column": "price", "transform": ["log1p"]}
    )
    dataset = prepare(tmp_path, raw)
    table = all_rows(dataset)
    order = [row["source_row"] for row in reference(columns)]
    price = np.asarray(columns["price"])[order]
    clipped = np.clip(price, 0, 50)
    assert np.allclose(table.column("plain").to_numpy(), price, rtol=1e-6)
    assert np.allclose(table.column("clipped").to_numpy(), np.clip(price, 1, 30), rtol=1e-6)
    assert np.allclose(table.column("logged").to_numpy(), np.log1p(np.maximum(price, 0)), rtol=1e-6)
    assert np.allclose(
        table.column("scaled").to_numpy(), (clipped - clipped.mean()) / clipped.std(), atol=1e-5
    )
    mean, std = Preprocessor.load(dataset.artifact_dir).dense_stats["scaled"]
    assert (mean, std) == pytest.approx((clipped.mean(), clipped.std()))


# -- splits and fitting --------------------------------------------------------------------


def test_a_time_split_has_the_fractions_in_time_order(tmp_path):
    columns = events()
    write_csv(tmp_path / "events.csv", columns)
    dataset = prepare(tmp_path, base_spec(split={"by": "time", "valid": 0.15, "test": 0.25}))
    sizes = {split: dataset.info["splits"][split]["rows"] for split in SPLITS}
    assert sizes == {"train": 144, "valid": 36, "test": 60}
    times = [dataset.read(split).column("timestamp").to_numpy() for split in SPLITS]
    assert all(np.all(np.diff(t) >= 0) for t in times)
    assert times[0].max() <= times[1].min() and times[1].max() <= times[2].min()
    positives = sum(dataset.info["splits"][split]["positives"] for split in SPLITS)
    assert positives == sum(columns["clicked"]) == dataset.info["positives"]


def test_a_random_split_is_seeded_by_source_row(tmp_path):
    columns = events(rows=2000)
    write_parquet(tmp_path / "events.parquet", columns, row_group_size=300)
    split = {"by": "random", "valid": 0.2, "test": 0.1, "seed": 5}
    dataset = prepare(tmp_path, base_spec("parquet", split=split))
    sizes = {name: dataset.info["splits"][name]["rows"] for name in SPLITS}
    assert sizes["test"] == pytest.approx(200, abs=45)
    assert sizes["valid"] == pytest.approx(400, abs=60)
    expected = splits(dataset)
    for name in SPLITS:
        assert np.all(np.diff(expected[name].column("timestamp").to_numpy()) >= 0)
    again = prepare(tmp_path, base_spec("parquet", split=split), batch_rows=77, bucket_rows=500)
    assert_same(splits(again), expected)
    other = prepare(tmp_path, base_spec("parquet", split=dict(split, seed=6)))
    assert not other.read("test").equals(expected["test"])


def test_fit_on_all_puts_every_value_in_the_vocabulary(tmp_path):
    columns = late_events()
    write_csv(tmp_path / "events.csv", columns)
    dataset = prepare(tmp_path, base_spec(fit_on="all"))
    items = Preprocessor.load(dataset.artifact_dir).vocabularies["item"]
    assert items.values.to_pylist() == sorted(set(columns["item"]))
    assert_matches_reference(all_rows(dataset), reference(columns))


@pytest.mark.parametrize(("batch_rows", "bucket_rows"), [(7, 1_000_000), (1000, 13), (5, 1)])
def test_the_result_does_not_depend_on_batches_or_time_buckets(tmp_path, batch_rows, bucket_rows):
    columns = events()
    write_parquet(tmp_path / "events.parquet", columns, row_group_size=50)
    expected = prepare(tmp_path, base_spec("parquet"))
    expected_splits = splits(expected)
    expected_hash = Preprocessor.load(expected.artifact_dir).content_hash
    again = prepare(tmp_path, base_spec("parquet"), batch_rows=batch_rows, bucket_rows=bucket_rows)
    assert_same(splits(again), expected_splits)
    assert Preprocessor.load(again.artifact_dir).content_hash == expected_hash


def test_a_time_ordered_source_is_bucketed_in_memory_with_the_same_result(tmp_path):
    columns = events()
    order = np.argsort(columns["ts"], kind="stable")
    ordered = {name: [values[i] for i in order] for name, values in columns.items()}
    write_parquet(tmp_path / "events.parquet", ordered, row_group_size=50)
    expected = splits(prepare(tmp_path, base_spec("parquet")))
    for batch_rows, bucket_rows in ((7, 40), (1000, 13), (5, 1)):
        again = prepare(
            tmp_path, base_spec("parquet"), batch_rows=batch_rows, bucket_rows=bucket_rows
        )
        assert_same(splits(again), expected)


def test_buckets_are_held_in_memory_only_when_the_source_is_nearly_time_ordered(tmp_path):
    times = np.arange(1_000, dtype=np.int64) // 3
    assert _Buckets(tmp_path / "ordered", times, 100, 10).in_memory
    # Late rows a little behind their time still fit in the held buckets ...
    late = times.copy()
    late[::50] -= 20
    assert _Buckets(tmp_path / "late", late, 100, 10).in_memory
    # ... but a shuffled source would hold every bucket until its end: it is spilled.
    shuffled = np.random.default_rng(0).permutation(times)
    assert not _Buckets(tmp_path / "shuffled", shuffled, 100, 10).in_memory
    assert (tmp_path / "shuffled").is_dir()


def test_null_string_ids_read_dictionary_encoded_become_empty_bags_of_hashed_ids(tmp_path):
    columns = events()
    columns["city"] = [None if i % 7 == 0 else city for i, city in enumerate(columns["city"])]
    write_parquet(tmp_path / "events.parquet", columns)
    raw = base_spec("parquet")
    raw["features"][4] = {"name": "city", "kind": "categorical", "ids": "hash"}
    table = all_rows(prepare(tmp_path, raw)).sort_by("timestamp")
    lengths = pa.compute.list_value_length(table.column("city")).to_numpy()
    assert set(lengths.tolist()) == {0, 1}
    assert (lengths == 0).sum() == sum(city is None for city in columns["city"])


def test_sequences_and_counts_match_the_reference_for_any_data(tmp_path):
    """A property test: random users, items and tied times, any history length, any batch and
    bucket size."""
    hypothesis = pytest.importorskip("hypothesis")
    strategies = hypothesis.strategies
    event = strategies.tuples(
        strategies.integers(0, 5), strategies.integers(0, 7), strategies.integers(0, 9)
    )

    @hypothesis.settings(
        max_examples=25, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )  # fmt: skip
    @hypothesis.given(
        rows=strategies.lists(event, min_size=10, max_size=60),
        history=strategies.integers(1, 5),
        batch_rows=strategies.integers(1, 64),
        bucket_rows=strategies.integers(1, 64),
    )
    def check(rows, history, batch_rows, bucket_rows):
        columns = {
            "user": [u for u, _, _ in rows],
            "item": [10 * i for _, i, _ in rows],
            "ts": [t for _, _, t in rows],
            "clicked": [(u + i) % 2 for u, i, _ in rows],
        }
        write_parquet(tmp_path / "events.parquet", columns, row_group_size=7)
        raw = {
            "name": "prop",
            "source": {"format": "parquet", "paths": ["events.parquet"]},
            "label": {"column": "clicked"},
            "time": {"column": "ts"},
            "roles": {"user": "user", "item": "item"},
            "fit_on": "all",
            "features": [
                {"name": "user", "kind": "categorical", "type": "int"},
                {"name": "item", "kind": "categorical", "type": "int"},
                {"name": "hist", "kind": "sequence", "of": "item", "max_length": history},
                {"name": "seen_item", "kind": "count", "of": "item"},
            ],
        }
        table = all_rows(prepare(tmp_path, raw, batch_rows=batch_rows, bucket_rows=bucket_rows))
        users = sorted(set(columns["user"]))
        items = sorted(set(columns["item"]))
        order = sorted(
            range(len(rows)),
            key=lambda r: (
                columns["ts"][r],
                users.index(columns["user"][r]),
                items.index(columns["item"][r]),
                r,
            ),
        )
        timeline: dict[int, list[int]] = {}
        item_count: dict[int, int] = {}
        expected = []
        for r in order:
            user, item = users.index(columns["user"][r]), items.index(columns["item"][r])
            expected.append(
                (user, item, timeline.get(user, [])[-history:], item_count.get(item, 0))
            )
            timeline.setdefault(user, []).append(item)
            item_count[item] = item_count.get(item, 0) + 1
        got = list(
            zip(
                table.column("user").to_pylist(),
                table.column("item").to_pylist(),
                table.column("hist").to_pylist(),
                table.column("seen_item").to_pylist(),
                strict=True,
            )
        )
        assert got == expected

    check()


# -- the artifact --------------------------------------------------------------------------


def test_the_artifact_round_trips_and_encodes_raw_values_as_prepared(tmp_path):
    columns = events()
    write_csv(tmp_path / "events.csv", columns)
    dataset = prepare(tmp_path, base_spec())
    preprocessor = Preprocessor.load(dataset.artifact_dir)
    again = Preprocessor.from_files(preprocessor.to_files())
    assert again.content_hash == preprocessor.content_hash
    assert again.spec == preprocessor.spec and again.dense_stats == preprocessor.dense_stats
    assert again.schema() == dataset.schema
    raw_users = pa.array(columns["user"])
    assert again.encode("user", raw_users).equals(preprocessor.encode("user", raw_users))
    # Encoding the raw rows in prepared order reproduces the prepared columns.
    order = [row["source_row"] for row in reference(columns, fit_rows=_fit_rows(columns))]
    table = all_rows(dataset)
    for name in ("user", "item", "tags", "city", "price"):
        raw = pa.array([columns[name][r] for r in order])
        assert preprocessor.encode(name, raw).equals(table.column(name).combine_chunks()), name


def _fit_rows(columns: dict[str, list]) -> list[int]:
    """The rows a time split fits on: those before the first time outside train (80%)."""
    ordered = sorted(columns["ts"])
    boundary = ordered[len(ordered) - 2 * round(len(ordered) * 0.1)]
    return [r for r, t in enumerate(columns["ts"]) if t < boundary]


def test_the_content_hash_follows_the_vocabularies_and_refuses_altered_files(tmp_path):
    columns = events()
    write_csv(tmp_path / "events.csv", columns)
    first = Preprocessor.load(prepare(tmp_path, base_spec()).artifact_dir)
    assert Preprocessor.load(prepare(tmp_path, base_spec()).artifact_dir).content_hash == (
        first.content_hash
    )
    columns["city"][0] = "Quito"
    write_csv(tmp_path / "events.csv", columns)
    changed = Preprocessor.load(prepare(tmp_path, base_spec()).artifact_dir)
    assert changed.vocabularies["city"].values != first.vocabularies["city"].values
    assert changed.content_hash != first.content_hash

    files = first.to_files()
    altered = dict(files)
    altered["vocab-city.parquet"] = changed.to_files()["vocab-city.parquet"]
    with pytest.raises(ArtifactError, match=r"content hash .* does not match .* altered"):
        Preprocessor.from_files(altered)
    manifest = json.loads(files["artifact.json"])
    manifest["dense_stats"]["price"][0] += 1.0
    with pytest.raises(ArtifactError, match=r"does not match"):
        Preprocessor.from_files({**files, "artifact.json": json.dumps(manifest).encode()})
    manifest = json.loads(files["artifact.json"])
    manifest["format_version"] = 99
    with pytest.raises(ArtifactError, match=r"format 99; this embtab reads format 1"):
        Preprocessor.from_files({**files, "artifact.json": json.dumps(manifest).encode()})
    missing = {k: v for k, v in files.items() if k != "vocab-item.parquet"}
    with pytest.raises(ArtifactError, match=r"lacks the vocabulary of 'item'"):
        Preprocessor.from_files(missing)
    with pytest.raises(ArtifactError, match=r"no artifact.json"):
        Preprocessor.from_files({})


# -- bad input -----------------------------------------------------------------------------


BAD_INPUT = {
    "missing column": (
        lambda p, c: write_csv(p / "events.csv", {k: v for k, v in c.items() if k != "price"}),
        None,
        r"events\.csv: no column 'price', which the spec names; the file has columns: user, "
        r"item, clicked, rating, ts, tags, city",
    ),
    "unparseable number": (
        lambda p, c: write_csv(p / "events.csv", dict(c, price=_at(c["price"], 6, "cheap"))),
        None,
        r"events\.csv: row 7, column 'price': 'cheap' .*accepted: a number",
    ),
    "unparseable integer id": (
        lambda p, c: write_csv(
            p / "events.csv", dict(c, item=_at(events(int_ids=True)["item"], 9, "i9"))
        ),
        lambda raw: raw["features"][1].update(type="int"),
        r"events\.csv: row 10, column 'item': 'i9' .*accepted: an integer",
    ),
    "unparseable number in parquet": (
        lambda p, c: write_parquet(
            p / "events.parquet", dict(c, price=[str(v) for v in _at(c["price"], 150, "n/a")])
        ),
        lambda raw: raw["source"].update(format="parquet", paths=["events.parquet"]),
        r"events\.parquet: row 151, column 'price': 'n/a' \(string\) .*accepted: a number",
    ),
    "null label": (
        lambda p, c: write_csv(p / "events.csv", dict(c, clicked=_at(c["clicked"], 4, ""))),
        None,
        r"events\.csv: row 5: the label column 'clicked' is empty; every event needs a label",
    ),
    "null label in parquet": (
        lambda p, c: write_parquet(
            p / "events.parquet", dict(c, clicked=_at(c["clicked"], 200, None))
        ),
        lambda raw: raw["source"].update(format="parquet", paths=["events.parquet"]),
        r"events\.parquet: row 201: the label column 'clicked' is empty",
    ),
    "label not 0 or 1": (
        lambda p, c: write_csv(p / "events.csv", dict(c, clicked=_at(c["clicked"], 2, 3))),
        None,
        r"events\.csv: row 3: label 3\.0 in column 'clicked'; accepted: 0 or 1",
    ),
    "unparseable ISO time": (
        lambda p, c: write_csv(
            p / "events.csv",
            dict(c, ts=_at(["2024-05-01T10:00:00"] * len(c["ts"]), 3, "yesterday")),
        ),
        lambda raw: raw["time"].update(unit="iso8601"),
        r"events\.csv: row 4: 'yesterday' in column 'ts' is not an ISO-8601 time; accepted: e\.g\.",
    ),
    "text in a numeric time": (
        lambda p, c: write_csv(p / "events.csv", dict(c, ts=_at(c["ts"], 3, "yesterday"))),
        None,
        r"events\.csv: row 4, column 'ts': 'yesterday' .*accepted: a number",
    ),
    "empty time": (
        lambda p, c: write_csv(p / "events.csv", dict(c, ts=_at(c["ts"], 0, ""))),
        None,
        r"events\.csv: row 1: the event-time column 'ts' is empty; every event needs a time",
    ),
    "empty file": (
        lambda p, c: (p / "events.csv").write_text(""),
        None,
        r"events\.csv is empty: no header line",
    ),
    "header only": (
        lambda p, c: write_csv(p / "events.csv", {k: [] for k in c}),
        None,
        r"events\.csv has no rows; every source file needs at least one",
    ),
    "an empty second file": (
        lambda p, c: write_csv(p / "events-2.csv", {k: [] for k in c}),
        lambda raw: raw["source"].update(paths=["events*.csv"]),
        r"events-2\.csv has no rows",
    ),
    "null label in a second file": (
        lambda p, c: write_csv(
            p / "events-2.csv",
            {k: _at(v[:5], 1, "") if k == "clicked" else v[:5] for k, v in c.items()},
        ),
        lambda raw: raw["source"].update(paths=["events*.csv"]),
        r"events-2\.csv: row 2: the label column 'clicked' is empty",
    ),
    "a CSV line longer than the parser's block": (
        lambda p, c: write_csv(
            p / "events.csv", dict(c, tags=_at(c["tags"], 1, ["x" * (8 << 20)]))
        ),
        None,
        r"events\.csv: a line is longer than the CSV/TSV reader takes \(about 4 MiB",
    ),
    "glob matching nothing": (
        lambda p, c: None,
        lambda raw: raw["source"].update(paths=["events.csv", "logs/*.csv"]),
        r"source\.paths: 'logs/\*\.csv' matched no file \(looked in .*\)",
    ),
    "multi-valued text without a separator": (
        lambda p, c: None,
        lambda raw: raw["features"][2].pop("separator"),
        r"events\.csv: column 'tags' is text; a multi_valued feature over text needs `separator`",
    ),
    "a split left empty": (
        lambda p, c: write_csv(p / "events.csv", {k: v[:4] for k, v in c.items()}),
        None,
        r"split 'valid' would be empty \(4 rows .*every split needs at least one row",
    ),
}


def _at(values: list, index: int, value) -> list:
    values = list(values)
    values[index] = value
    return values


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_refused_and_the_previous_copy_stays_untouched(tmp_path, data_dir, case):
    break_files, break_spec, message = BAD_INPUT[case]
    columns = events()
    write_csv(tmp_path / "events.csv", columns)
    prepare(tmp_path, base_spec())
    before = snapshot("clicks")
    assert "artifact/artifact.json" in before and "train.parquet" in before
    break_files(tmp_path, columns)
    raw = base_spec()
    if break_spec is not None:
        break_spec(raw)
    with pytest.raises(PrepareError, match=message):
        prepare(tmp_path, raw)
    assert snapshot("clicks") == before
    assert sorted(p.name for p in (data_dir / "prepared").iterdir()) == ["clicks"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: raw.update(colour="red"), r"spec: unknown key\(s\) \['colour'\]; accepted: "),
        (
            lambda raw: raw["features"].append({"name": "user", "kind": "dense"}),
            r"two features are named \['user'\]",
        ),
    ],
)
def test_a_bad_spec_file_is_refused_before_reading_data(tmp_path, change, message):
    write_csv(tmp_path / "events.csv", events())
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base_spec()))
    datasets.prepare_from_spec(good)
    before = snapshot("clicks")
    raw = base_spec()
    change(raw)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match=message):
        datasets.prepare_from_spec(bad)
    assert snapshot("clicks") == before
