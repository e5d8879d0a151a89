"""The replay producer: event-time pacing, label delay in wall time, online features, errors."""

from __future__ import annotations

import uuid
from dataclasses import replace

import numpy as np
import pytest

from feature_store.online import OnlineFeatureStore
from online_training import messages
from online_training.producer import ProducerConfig, ReplayError, ReplayProducer
from tests.online_training.conftest import event_index, read_topic

EVENTS = 300
SPAN_S = 5_382  # event seconds between the first and the 300th event of the test split


def _decoded(kafka, topic: str, kind: str) -> list[messages.Batch]:
    return [messages.decode(record.value, kind) for record in read_topic(kafka, topic)]


def test_event_time_is_paced_and_the_label_delay_follows_the_speedup(kafka, topics, movielens):
    speedup, delay = SPAN_S / 1.0, 1_000.0  # the replay lasts ~1 s; clicks ~0.19 s later
    config = ProducerConfig(limit=EVENTS, speedup=speedup, label_delay_s=delay, linger_s=0.01)
    report = ReplayProducer(movielens, kafka, topics, config).run()
    assert report.impressions == EVENTS
    assert 0.9 <= report.seconds <= 2.0, report.seconds

    served = {}
    for batch in _decoded(kafka, topics.feature_log, messages.FEATURE_LOG):
        ids, produced = batch.column("request_id"), batch.column("produced_at")
        served.update(zip(ids.tolist(), produced.tolist(), strict=True))
    lags = []
    for batch in _decoded(kafka, topics.actions, messages.ACTIONS):
        assert np.allclose(batch.column("event_time") - batch.column("impression_time"), delay)
        for request_id, produced in zip(
            batch.column("request_id").tolist(), batch.column("produced_at").tolist(), strict=True
        ):
            lags.append(produced - served[request_id])
    assert len(lags) == report.actions > 0
    expected = delay / speedup
    assert abs(np.median(lags) - expected) < 0.05, (np.median(lags), expected)


def test_partitions_hold_their_users_in_time_order_with_watermarks(kafka, topics, movielens):
    ReplayProducer(movielens, kafka, topics, ProducerConfig(limit=EVENTS, batch_rows=16)).run()
    records = read_topic(kafka, topics.feature_log)
    users_by_partition: dict[int, set] = {}
    last_time: dict[int, float] = {}
    for record in records:
        batch = messages.decode(record.value, messages.FEATURE_LOG)
        times = batch.column("event_time")
        if batch.num_rows:
            assert np.all(np.diff(times) >= 0)
            assert times[0] >= last_time.get(record.partition, -np.inf)
            assert batch.watermark >= times[-1]
            last_time[record.partition] = times[-1]
            users = set(batch.column("user_id").tolist())
            users_by_partition.setdefault(record.partition, set()).update(users)
    seen = list(users_by_partition.values())
    assert sum(len(users) for users in seen) == len(set().union(*seen)), "a user in 2 partitions"
    ends = [r for r in records if messages.decode(r.value, messages.FEATURE_LOG).end_of_stream]
    assert sorted(r.partition for r in ends) == [0, 1, 2, 3]


def test_the_online_features_follow_the_replay(kafka, topics, movielens, redis_service):
    store = OnlineFeatureStore.from_url(
        redis_service.redis_url,
        movielens.schema,
        namespace=f"test-{uuid.uuid4().hex[:10]}",
        preprocessing=movielens.preprocessor(),
    )
    try:
        report = ReplayProducer(
            movielens, kafka, topics, ProducerConfig(limit=EVENTS), online=store
        ).run()
        assert report.online_user_writes > 0 and report.online_item_writes > 0
        prepared = movielens.read("test", ["user_id", "item_id", "age", "hist_item_id"])
        rows = store.raw_events(prepared.slice(0, EVENTS).combine_chunks().to_batches()[0])
        users = np.array(rows.column("user_id").to_pylist())
        online = store.get_users(np.unique(users).tolist())
        for position, user in enumerate(online.column("user_id").to_pylist()):
            last = int(np.flatnonzero(users == user)[-1])
            history = rows.column("hist_item_id")[last].as_py() + [
                rows.column("item_id")[last].as_py()
            ]
            assert online.column("hist_item_id")[position].as_py() == history[-20:]
            assert online.column("age")[position].as_py() == rows.column("age")[last].as_py()
    finally:
        store.clear()


def test_request_ids_number_the_events_of_a_run(kafka, topics, movielens):
    report = ReplayProducer(movielens, kafka, topics, ProducerConfig(limit=50, run_id=12345)).run()
    ids = [
        request_id
        for batch in _decoded(kafka, topics.feature_log, messages.FEATURE_LOG)
        for request_id in batch.column("request_id").tolist()
    ]
    assert report.run_id == 12345
    assert sorted(event_index(i) for i in ids) == list(range(50))
    assert {i >> 32 for i in ids} == {12345}


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"speedup": -1}, "speedup must be >= 0"),
        ({"label_delay_s": -5}, "label delay must be >= 0"),
        ({"limit": 0}, "limit must be >= 1"),
        ({"compression": "snappy"}, "accepted: None, lz4, zstd"),
    ],
)
def test_replay_settings_that_cannot_work_are_refused(config, says):
    with pytest.raises(ReplayError, match=says):
        ProducerConfig(**config)


def test_a_data_set_without_user_and_item_ids_cannot_be_replayed(kafka, topics, movielens):
    anonymous = replace(movielens, schema=replace(movielens.schema, id_columns={}))
    with pytest.raises(ReplayError, match="names no user and item id columns"):
        ReplayProducer(anonymous, kafka, topics, ProducerConfig())
