"""Per-event JSON from a producer that sends no watermarks: joined through the data set's
artifact, with watermarks the joiner derives (lateness, the idle rule), late and future events,
and bad events dead-lettered while the good ones around them go through."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter

import numpy as np
import pytest
from kafka import KafkaProducer, TopicPartition

from bench.streaming import LibrdkafkaSink
from online_training.events import request_keys
from online_training.joiner import Joiner
from online_training.joiner_config import JoinerConfig, JoinError
from online_training.kafka import Topics, make_consumer
from online_training.producer import ProducerConfig, ReplayProducer
from online_training.watermarks import read_to_end
from tests.online_training.conftest import SLICE, event_index, read_examples, read_topic
from tests.online_training.raw_events import click, encoded, impression

IMPRESSIONS = 40


def _producer(kafka) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all")


def _send(producer: KafkaProducer, topic: str, values: list, partition: int | None = None):
    """Each value (an event, or raw bytes) as one message keyed by its request id."""
    for value in values:
        key = value["req"].encode() if isinstance(value, dict) else b"poison"
        payload = value if isinstance(value, bytes) else encoded(value)
        producer.send(topic, payload, key=key, partition=partition)
    producer.flush(timeout=30)


def _joiner(kafka, topics, raw_dataset, **config) -> Joiner:
    settings = {
        "group_id": f"joiner-{uuid.uuid4().hex[:8]}",
        "window_s": 2.0,
        "allowed_lateness_s": 1.0,
        "idle_after_s": 1.0,
        "idle_timeout_s": 8.0,
        **config,
    }
    return Joiner(kafka, topics, JoinerConfig(**settings), preprocessor=raw_dataset.preprocessor())


def test_json_events_join_and_bad_ones_are_dead_lettered(kafka, topics, raw_dataset):
    start = time.time() - 120
    shown = [impression(f"r{i}", start + i * 0.5, f"u{i % 7}") for i in range(IMPRESSIONS)]
    clicks = [click(f"r{i}", start + i * 0.5 + 1.0) for i in range(0, IMPRESSIONS, 4)]
    bad_impressions = [
        b"{truncated",
        {k: v for k, v in impression("m1", start).items() if k != "price"},
        {**impression("m2", start), "user": 17},
        {**impression("m3", start), "campaign": "never-seen"},
        impression("m4", time.time() + 86_400),
    ]
    bad_clicks = [b'{"req": ', {"req": "r1"}, {**click("r2", start), "ts": "soon"}]
    producer = _producer(kafka)
    _send(producer, topics.feature_log, shown[:20] + bad_impressions + shown[20:])
    _send(producer, topics.actions, clicks[:3] + bad_clicks + clicks[3:])
    producer.close()

    report = _joiner(kafka, topics, raw_dataset).run()
    assert report.examples == IMPRESSIONS
    assert report.positives == len(clicks)
    assert report.dlq == {
        "malformed-json": 2,
        "missing-field": 2,
        "wrong-type": 1,
        "unmappable": 1,
        "future-time": 1,
        "bad-time": 1,
    }
    labels, _ = read_examples(kafka, topics)
    clicked = set(request_keys([c["req"] for c in clicks]).tolist())
    keys = request_keys([e["req"] for e in shown]).tolist()
    assert sorted(labels) == sorted(keys)
    assert all(seen == [int(key in clicked)] for key, seen in labels.items())
    dead = read_topic(kafka, Topics.dlq(topics.feature_log))
    reasons = Counter(dict(record.headers)["reason"].decode() for record in dead)
    assert reasons == {
        "malformed-json": 1,
        "missing-field": 1,
        "wrong-type": 1,
        "unmappable": 1,
        "future-time": 1,
    }
    assert b"{truncated" in {record.value for record in dead}


def test_a_producer_that_gets_every_message_wrong_is_logged_once_not_per_message(
    kafka, topics, raw_dataset, caplog
):
    start = time.time() - 120
    broken = [
        {k: v for k, v in impression(f"b{i}", start + i).items() if k != "price"} for i in range(50)
    ]
    producer = _producer(kafka)
    _send(producer, topics.feature_log, broken)
    producer.close()
    with caplog.at_level(logging.WARNING, "online_training.dead_letters"):
        report = _joiner(kafka, topics, raw_dataset, idle_timeout_s=4.0).run()
    assert report.dlq == {"missing-field": 50}
    assert len(read_topic(kafka, Topics.dlq(topics.feature_log))) == 50
    logged = [r.getMessage() for r in caplog.records if r.name == "online_training.dead_letters"]
    assert len(logged) == 1 and "missing-field: no field 'price'" in logged[0]


def test_lateness_idle_rule_and_late_events(kafka, topics, raw_dataset):
    """All in partition 0: a jump in event time closes earlier windows (derived watermark);
    then a click for a closed impression is late, and so is an impression older than the
    watermark's window; the last impression closes by the idle rule, with no more input."""
    start = time.time() - 600
    producer = _producer(kafka)
    early = [impression(f"e{i}", start + i) for i in range(5)]
    _send(producer, topics.feature_log, early, partition=0)
    joiner = _joiner(kafka, topics, raw_dataset, idle_after_s=3.0, idle_timeout_s=None)
    stop = threading.Event()
    running = threading.Thread(target=joiner.run, args=(stop,), daemon=True)
    running.start()
    try:
        _wait(lambda: joiner.report.impressions == 5)
        # 100 s later: the watermark passes every early window (2 s + 1 s lateness).
        _send(producer, topics.feature_log, [impression("later", start + 100)], partition=0)
        _send(producer, topics.actions, [click("e0", start + 100)], partition=0)
        _wait(lambda: joiner.report.negatives >= 5)
        assert joiner.report.examples == 5, "the newest impression waits for its window"
        _send(producer, topics.actions, [click("e1", start + 2)], partition=0)
        _send(producer, topics.feature_log, [impression("stale", start + 10)], partition=0)
        _wait(lambda: joiner.report.stale_impressions == 1 and joiner.report.late_clicks == 2)
        # No more input: after idle_after_s the watermark moves on by the wall clock.
        _wait(lambda: joiner.report.examples == 6, timeout_s=20)
    finally:
        stop.set()
        running.join(timeout=30)
        producer.close()
    assert joiner.report.positives == 0


def test_json_needs_the_artifact(kafka, topics):
    with pytest.raises(JoinError, match="preprocessing artifact"):
        Joiner(kafka, topics, JoinerConfig(feature_log_format="json"))


def _wait(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.parametrize("client", ["kafka-python", "librdkafka"])
def test_a_json_replay_joins_to_the_prepared_rows(kafka, topics, movielens, slice_labels, client):
    """`--format json` replays raw values (the artifact's decode), encoded column-wise; the
    joiner encodes them back to exactly the prepared rows, with the data set's labels, whether
    kafka-python sends them or librdkafka (the bench's sink) does."""
    sink = LibrdkafkaSink(kafka.bootstrap_servers) if client == "librdkafka" else None
    produced = ReplayProducer(
        movielens, kafka, topics, ProducerConfig(limit=SLICE, label_delay_s=1, format="json")
    ).run(sink)
    assert produced.messages == SLICE + int(slice_labels.sum())
    report = Joiner(
        kafka,
        topics,
        JoinerConfig(
            group_id=f"joiner-{uuid.uuid4().hex[:8]}",
            window_s=3.0,
            allowed_lateness_s=1.0,
            idle_after_s=1.0,
            idle_timeout_s=6.0,
        ),
        preprocessor=movielens.preprocessor(),
    ).run()
    assert report.examples == SLICE and report.dlq_messages == 0
    assert report.positives == int(slice_labels.sum())
    labels, batches = read_examples(kafka, topics)
    for request_id, seen in labels.items():
        assert seen == [slice_labels[event_index(request_id)]]
    prepared = movielens.read("test").slice(0, SLICE)
    for batch in batches:
        rows = prepared.take([event_index(r) for r in batch.column("request_id").tolist()])
        for spec in movielens.schema.features:
            sent = batch.rows.column(spec.name)
            if spec.kind == "dense":
                np.testing.assert_allclose(sent, rows.column(spec.name), rtol=1e-6, atol=1e-6)
            else:
                assert sent.to_pylist() == rows.column(spec.name).to_pylist(), spec.name


def test_a_partition_counts_as_read_to_its_end_only_when_the_broker_says_so(kafka, topics):
    """The idle rule's test of silence: a consumer's last fetch said where the end was, then
    more clicks came; until it fetches again, only the broker knows they are there."""
    producer = _producer(kafka)
    _send(producer, topics.actions, [click(f"r{i}", 1_700_000_000 + i) for i in range(5)], 0)
    consumer = make_consumer(kafka, None)
    tp = TopicPartition(topics.actions, 0)
    consumer.assign([tp])
    read = 0
    deadline = time.monotonic() + 20
    while read < 5 and time.monotonic() < deadline:
        read += sum(len(records) for records in consumer.poll(timeout_ms=500).values())
    try:
        assert read == 5 and read_to_end(consumer, topics.actions, 0, 5)
        _send(producer, topics.actions, [click("r-more", 1_700_000_010)], 0)
        assert consumer.highwater(tp) == 5  # what the last fetch saw
        assert not read_to_end(consumer, topics.actions, 0, 5)
    finally:
        consumer.close()
        producer.close()
