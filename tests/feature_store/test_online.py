"""Online features in the real (session) Redis, each test under its own key prefix."""

from __future__ import annotations

import json
import time
import uuid

import msgpack
import numpy as np
import pytest
import redis

from feature_store import datasets
from feature_store.artifact import Preprocessor
from feature_store.offline import SPLITS, Dataset
from feature_store.online import (
    CorruptFeatureValue,
    InvalidFeatureValues,
    NoOnlineLayout,
    OnlineFeatureStore,
    OnlineLayout,
    OnlineStoreUnavailable,
    redis_client,
)
from feature_store.schema import FeatureSpec, Schema
from feature_store.spec import SpecError, parse_spec
from tests.feature_store.test_prepare import base_spec, prepare, write_csv
from tests.feature_store.test_prepare import events as raw_events

EVENTS = 2_000


@pytest.fixture(scope="module")
def movielens() -> Dataset:
    return datasets.load("movielens-1m")


@pytest.fixture(scope="module")
def preprocessing(movielens) -> Preprocessor:
    return movielens.preprocessor()


@pytest.fixture
def store(redis_service, movielens, preprocessing):
    """A store under a namespace of its own; its keys are deleted afterwards (never a flush)."""
    online = OnlineFeatureStore(
        redis_client(redis_service.redis_url),
        movielens.schema,
        namespace=f"test-{uuid.uuid4().hex[:10]}",
        preprocessing=preprocessing,
    )
    yield online
    online.clear()


@pytest.fixture(scope="module")
def prepared(movielens):
    return movielens.read("test").slice(0, EVENTS).combine_chunks().to_batches()[0]


@pytest.fixture
def events(store, prepared):
    """The events as the source files have them: raw string ids."""
    return store.raw_events(prepared)


def _round_trips(monkeypatch) -> list:
    """Counts the packed writes to Redis sockets: one per round trip."""
    sent = []
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):
        sent.append(command)
        return original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    return sent


def test_profiles_and_sequences_after_a_replay_are_what_the_next_request_sees(store, events):
    written = store.write_events(events)
    users = np.array(events.column("user_id").to_pylist())
    assert written.users == written.sequences == len(np.unique(users))
    online = store.get_users(np.unique(users).tolist())
    for row, user in enumerate(online.column("user_id").to_pylist()):
        last = int(np.flatnonzero(users == user)[-1])
        expected = events.column("hist_item_id")[last].as_py() + [
            events.column("item_id")[last].as_py()
        ]
        assert online.column("hist_item_id")[row].as_py() == expected[-20:]
        for name in ("age", "gender", "occupation", "zip_code"):
            assert online.column(name)[row].as_py() == events.column(name)[last].as_py()


def test_one_user_and_its_candidates_are_read_in_one_round_trip(store, events, monkeypatch):
    store.write_events(events)
    user = events.column("user_id")[0].as_py()
    candidates = sorted(set(events.column("item_id").to_pylist()))[:100]
    sent = _round_trips(monkeypatch)
    request = store.get_request(user, candidates)
    assert len(sent) == 1
    assert request.num_rows == 100
    assert request.schema.names == [
        "user_id",
        "item_id",
        "age",
        "gender",
        "occupation",
        "zip_code",
        "release_year",
        "genres",
        "hist_item_id",
    ]
    assert set(request.column("user_id").to_pylist()) == {user}
    assert request.column("genres").null_count == 0

    sent.clear()
    many = store.get_users(sorted(set(events.column("user_id").to_pylist())))
    assert len(sent) == 1 and many.num_rows > 10


def test_items_carry_their_attributes_and_unknown_ids_are_null(store, events):
    store.write_events(events)
    items = np.array(events.column("item_id").to_pylist())
    known = str(items[0])
    batch = store.get_items([known, "never seen"])
    assert batch.column("item_id").to_pylist() == [known, "never seen"]
    row = int(np.flatnonzero(items == known)[-1])
    assert batch.column("genres")[0].as_py() == events.column("genres")[row].as_py()
    assert batch.column("release_year")[0].as_py() == events.column("release_year")[row].as_py()
    assert batch.column("release_year")[1].as_py() is None

    unknown = store.get_users(["never seen"])
    assert unknown.column("age")[0].as_py() is None
    assert unknown.column("hist_item_id")[0].as_py() == []


def test_appended_sequences_stay_capped_newest_last(store):
    store.append_to_sequences(["u7"] * 25, [f"m{i}" for i in range(25)])
    store.append_to_sequences(["u7", "u8"], ["m100", "m101"])
    batch = store.get_users(["u7", "u8"])
    assert batch.column("hist_item_id")[0].as_py() == [f"m{i}" for i in range(6, 25)] + ["m100"]
    assert batch.column("hist_item_id")[1].as_py() == ["m101"]


def test_values_are_compact_and_keys_namespaced(store, events):
    store.write_events(events)
    user = events.column("user_id")[0].as_py()
    client = store.client
    assert all(key.startswith(store.prefix.encode()) for key in client.keys(f"{store.prefix}:*"))
    assert client.exists(f"{store.prefix}:user:{user}")
    last = max(i for i, u in enumerate(events.column("user_id").to_pylist()) if u == user)
    assert client.hget(store.user_key(user), "age") == msgpack.packb(
        events.column("age")[last].as_py()
    )
    sequence = client.lrange(store.sequence_key(user), 0, -1)
    assert all(isinstance(msgpack.unpackb(element), str) for element in sequence)
    assert len(sequence) <= 20
    item = events.column("item_id")[0].as_py()
    assert client.hexists(store.items_key, item.encode())


def test_writes_that_do_not_fit_the_raw_types_are_refused(store):
    with pytest.raises(InvalidFeatureValues, match="'age' holds string ids: Expected bytes"):
        store.write_users(["u1"], {"age": [8]})
    with pytest.raises(InvalidFeatureValues, match="'user_id' ids must be string ids"):
        store.write_users([1], {"age": ["25"]})
    with pytest.raises(InvalidFeatureValues, match="accepted: age, gender, occupation, zip_code"):
        store.write_users(["u1"], {"colour": ["1"]})
    with pytest.raises(InvalidFeatureValues, match="accepted: release_year, genres"):
        store.write_items(["m1"], {"release_year": ["1995"]})
    with pytest.raises(InvalidFeatureValues, match="2 values for 1 ids"):
        store.write_users(["u1"], {"age": ["25", "35"]})


def test_without_an_artifact_the_store_holds_prepared_ids_in_range(redis_service, movielens):
    store = OnlineFeatureStore(
        redis_client(redis_service.redis_url),
        movielens.schema,
        namespace=f"test-{uuid.uuid4().hex[:10]}",
    )
    try:
        cardinality = movielens.schema.feature("age").cardinality
        with pytest.raises(InvalidFeatureValues, match=rf"ids must be in \[0, {cardinality}\)"):
            store.write_users([1], {"age": [cardinality]})
        store.write_users([1], {"age": [2]})
        assert store.get_users([1]).column("age").to_pylist() == [2]
    finally:
        store.clear()


def test_a_corrupt_stored_value_is_a_typed_error(store):
    store.write_users(["u5"], {"age": ["25"]})
    store.client.hset(store.user_key("u5"), "age", b"\xc1")
    with pytest.raises(CorruptFeatureValue, match="not msgpack"):
        store.get_users(["u5"])
    store.client.rpush(store.sequence_key("u6"), msgpack.packb(3))
    with pytest.raises(CorruptFeatureValue, match="'hist_item_id' are not lists of string ids"):
        store.get_users(["u6"])


def test_a_data_set_without_a_layout_is_refused():
    schema = Schema("obd", (FeatureSpec("item_id", "categorical", 80),))
    with pytest.raises(NoOnlineLayout, match="declare one in its spec"):
        OnlineFeatureStore(redis_client("redis://127.0.0.1:1/0"), schema)


def test_a_spec_declares_its_layout_and_the_store_keeps_those_features_by_raw_id(
    tmp_path, redis_service
):
    write_csv(tmp_path / "events.csv", raw_events())
    layout = {
        "user_features": ["city"],
        "item_features": ["tags", "price"],
        "sequence": "hist_item",
    }
    dataset = prepare(tmp_path, base_spec(online=layout))
    preprocessing = dataset.preprocessor()
    assert OnlineLayout.for_schema(dataset.schema, preprocessing) == OnlineLayout(
        dataset="clicks",
        user_column="user",
        item_column="item",
        user_features=("city",),
        item_features=("tags", "price"),
        sequence_feature="hist_item",
    )
    store = OnlineFeatureStore(
        redis_client(redis_service.redis_url),
        dataset.schema,
        namespace=f"test-{uuid.uuid4().hex[:10]}",
        preprocessing=preprocessing,
    )
    try:
        rows = store.raw_events(dataset.read("train").combine_chunks().to_batches()[0])
        store.write_events(rows)
        last = rows.num_rows - 1
        user, item = rows.column("user")[last].as_py(), rows.column("item")[last].as_py()
        assert isinstance(user, str) and user.startswith("u"), "keyed by the raw id"
        request = store.get_request(user, [item])
        assert request.column("city")[0].as_py() == rows.column("city")[last].as_py()
        assert request.column("price")[0].as_py() == rows.column("price")[last].as_py()
    finally:
        store.clear()


def test_a_spec_without_online_hashes_as_before_and_a_bad_layout_is_refused(tmp_path):
    plain = parse_spec(base_spec(), base_dir=str(tmp_path))
    assert plain.online is None and "online" not in json.loads(plain.to_json())
    with pytest.raises(SpecError, match="online.user_features: 'hist_item' must name"):
        parse_spec(base_spec(online={"user_features": ["hist_item"]}), base_dir=str(tmp_path))
    with pytest.raises(SpecError, match="online.sequence: 'city' must name a sequence"):
        parse_spec(base_spec(online={"sequence": "city"}), base_dir=str(tmp_path))
    with pytest.raises(SpecError, match=r"online: unknown key\(s\) \['users'\]"):
        parse_spec(base_spec(online={"users": ["city"]}), base_dir=str(tmp_path))


def test_an_unreachable_redis_fails_fast_with_a_typed_error(movielens):
    store = OnlineFeatureStore.from_url("redis://127.0.0.1:1/0", movielens.schema, timeout_s=0.2)
    started = time.monotonic()
    with pytest.raises(OnlineStoreUnavailable, match="127.0.0.1:1"):
        store.get_users([1, 2])
    assert time.monotonic() - started < 2


def test_a_paused_redis_times_out_instead_of_hanging(redis_service, movielens):
    if redis_service.redis is None:
        pytest.skip("this Redis is not ours to pause")
    store = OnlineFeatureStore.from_url(
        redis_service.redis_url, movielens.schema, namespace=f"test-{uuid.uuid4().hex[:10]}"
    )
    store.client.ping()
    redis_service.redis.pause()
    try:
        started = time.monotonic()
        with pytest.raises(OnlineStoreUnavailable):
            store.get_users([1])
        assert time.monotonic() - started < 3.5
    finally:
        redis_service.redis.resume()


def test_load_online_fills_the_store_from_a_prepared_copy_by_raw_id_and_skips_unkeyed_rows(
    tmp_path, monkeypatch, redis_service, capsys
):
    from embtab.cli import main

    monkeypatch.setenv("EMBTAB_DATA", str(tmp_path / "cache"))
    events = raw_events(rows=600)
    late = max(events["ts"]) + 1
    for n in range(5):  # a user first seen in the test split
        for values in events.values():
            values.append(values[n])
        events["user"][-1], events["ts"][-1] = "u-late", late + n
    write_csv(tmp_path / "events.csv", events)
    layout = {"user_features": ["city"], "item_features": ["price"], "sequence": "hist_item"}
    name = f"clicks-{uuid.uuid4().hex[:8]}"
    dataset = prepare(tmp_path, {**base_spec(online=layout), "name": name})
    store = OnlineFeatureStore(
        redis_client(redis_service.redis_url),
        dataset.schema,
        preprocessing=dataset.preprocessor(),
    )
    try:
        url = redis_service.redis_url
        assert main(["data", "load-online", name, "--redis", url, "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        # Users or items first seen after the fit rows (train) have no raw id in the prepared
        # copy (the out-of-vocabulary id): those rows are skipped, every other row written.
        rows = [
            store.raw_events(batch)
            for split in SPLITS
            for batch in dataset.read(split).to_batches()
        ]
        keyed = [
            row
            for batch in rows
            for row in batch.to_pylist()
            if row["user"] is not None and row["item"] is not None
        ]
        assert result["rows"] == len(keyed) and result["rows"] + result["skipped_rows"] == 605
        assert result["skipped_rows"] >= 5, "u-late is not in the train split's vocabulary"
        last = keyed[-1]
        request = store.get_request(last["user"], [last["item"]])
        assert request.column("city")[0].as_py() == last["city"]
        assert request.column("price")[0].as_py() == last["price"]
        assert main(["data", "load-online", name, "--redis", url, "--splits", "train,later"]) == 2
        assert "unknown split(s) ['later']; accepted: train, valid, test" in capsys.readouterr().err
    finally:
        store.clear()
