"""Online features in the real (session) Redis, each test under its own key prefix."""

from __future__ import annotations

import time
import uuid

import msgpack
import numpy as np
import pytest
import redis

from feature_store import datasets
from feature_store.offline import Dataset
from feature_store.online import (
    CorruptFeatureValue,
    InvalidFeatureValues,
    NoOnlineLayout,
    OnlineFeatureStore,
    OnlineStoreUnavailable,
    redis_client,
)
from feature_store.schema import FeatureSpec, Schema

EVENTS = 2_000


@pytest.fixture(scope="module")
def movielens() -> Dataset:
    return datasets.load("movielens-1m")


@pytest.fixture
def store(redis_service, movielens):
    """A store under a namespace of its own; its keys are deleted afterwards (never a flush)."""
    online = OnlineFeatureStore(
        redis_client(redis_service.redis_url),
        movielens.schema,
        namespace=f"test-{uuid.uuid4().hex[:10]}",
    )
    yield online
    online.clear()


@pytest.fixture(scope="module")
def events(movielens):
    return movielens.read("test").slice(0, EVENTS).combine_chunks().to_batches()[0]


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
    users = events.column("user_id").to_numpy()
    assert written.users == written.sequences == len(np.unique(users))
    online = store.get_users(np.unique(users))
    for row, user in enumerate(online.column("user_id").to_pylist()):
        last = int(np.flatnonzero(users == user)[-1])
        expected = events.column("hist_item_id")[last].as_py() + [events.column("item_id")[last]]
        assert online.column("hist_item_id")[row].as_py() == [int(i) for i in expected[-20:]]
        for name in ("age", "gender", "occupation", "zip_code"):
            assert online.column(name)[row].as_py() == events.column(name)[last].as_py()


def test_one_user_and_its_candidates_are_read_in_one_round_trip(store, events, monkeypatch):
    store.write_events(events)
    user = int(events.column("user_id")[0].as_py())
    candidates = np.unique(events.column("item_id").to_numpy())[:100]
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
    many = store.get_users(np.unique(events.column("user_id").to_numpy()))
    assert len(sent) == 1 and many.num_rows > 10


def test_items_carry_their_attributes_and_unknown_ids_are_null(store, events):
    store.write_events(events)
    items = events.column("item_id").to_numpy()
    known = int(items[0])
    batch = store.get_items([known, 10**9])
    assert batch.column("item_id").to_pylist() == [known, 10**9]
    row = int(np.flatnonzero(items == known)[-1])
    assert batch.column("genres")[0].as_py() == events.column("genres")[row].as_py()
    assert batch.column("release_year")[0].as_py() == events.column("release_year")[row].as_py()
    assert batch.column("release_year")[1].as_py() is None

    unknown = store.get_users([10**9])
    assert unknown.column("age")[0].as_py() is None
    assert unknown.column("hist_item_id")[0].as_py() == []


def test_appended_sequences_stay_capped_newest_last(store):
    store.append_to_sequences([7] * 25, list(range(25)))
    store.append_to_sequences([7, 8], [100, 101])
    batch = store.get_users([7, 8])
    assert batch.column("hist_item_id")[0].as_py() == [*range(6, 25), 100]
    assert batch.column("hist_item_id")[1].as_py() == [101]


def test_values_are_compact_and_keys_namespaced(store, events):
    store.write_events(events)
    user = int(events.column("user_id")[0].as_py())
    client = store.client
    assert all(key.startswith(store.prefix.encode()) for key in client.keys(f"{store.prefix}:*"))
    assert client.hget(store.user_key(user), "age") == msgpack.packb(
        int(events.column("age")[0].as_py())
    )
    assert all(len(element) == 8 for element in client.lrange(store.sequence_key(user), 0, -1))
    assert client.llen(store.sequence_key(user)) <= 20


def test_writes_that_do_not_fit_the_schema_are_refused(store):
    with pytest.raises(InvalidFeatureValues, match=r"ids must be in \[0, 8\)"):
        store.write_users([1], {"age": [8]})
    with pytest.raises(InvalidFeatureValues, match="accepted: age, gender, occupation, zip_code"):
        store.write_users([1], {"colour": [1]})
    with pytest.raises(InvalidFeatureValues, match="accepted: release_year, genres"):
        store.write_items([1], {"release_year": [3]})
    with pytest.raises(InvalidFeatureValues, match="2 values for 1 ids"):
        store.write_users([1], {"age": [1, 2]})


def test_a_corrupt_stored_value_is_a_typed_error(store):
    store.write_users([5], {"age": [3]})
    store.client.hset(store.user_key(5), "age", b"\xc1")
    with pytest.raises(CorruptFeatureValue, match="not msgpack"):
        store.get_users([5])
    store.client.rpush(store.sequence_key(6), b"abc")
    with pytest.raises(CorruptFeatureValue, match="8-byte id"):
        store.get_users([6])


def test_a_data_set_without_a_layout_is_refused():
    schema = Schema("obd", (FeatureSpec("item_id", "categorical", 80),))
    with pytest.raises(NoOnlineLayout, match="movielens-1m"):
        OnlineFeatureStore(redis_client("redis://127.0.0.1:1/0"), schema)


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
