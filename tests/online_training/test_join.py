"""Produce -> join -> examples on the real broker: labels, windows, dead letters."""

from __future__ import annotations

import os
import threading
import uuid

import numpy as np
import pyarrow as pa
from kafka import KafkaProducer, TopicPartition

from online_training import messages
from online_training.joiner import Joiner
from online_training.joiner_config import JoinerConfig
from online_training.kafka import Topics, ensure_topics, make_consumer, stream_topic_partitions
from online_training.producer import ProducerConfig, ReplayProducer
from tests.online_training.conftest import (
    PARTITIONS,
    SLICE,
    event_index,
    read_examples,
    read_topic,
)
from tests.online_training.example_stream import stops_by_itself


def _join(kafka, topics, **config) -> Joiner:
    joiner = Joiner(
        kafka, topics, JoinerConfig(group_id=f"joiner-{uuid.uuid4().hex[:8]}", **config)
    )
    joiner.run()
    return joiner


def test_examples_carry_the_data_sets_labels_and_every_feature(
    kafka, topics, movielens, slice_labels
):
    produced = ReplayProducer(
        movielens, kafka, topics, ProducerConfig(limit=SLICE, label_delay_s=30)
    ).run()
    assert produced.impressions == SLICE
    assert produced.actions == int(slice_labels.sum())
    assert produced.messages >= 8, "rows travel in batches per partition, both topics"

    report = _join(kafka, topics, window_s=60).report
    assert report.examples == SLICE
    assert report.positives == int(slice_labels.sum())
    assert report.late_clicks == report.orphan_clicks == report.dlq_messages == 0
    assert sorted(report.ended_partitions) == [0, 1, 2, 3]

    labels, batches = read_examples(kafka, topics)
    assert len(labels) == SLICE
    for request_id, seen in labels.items():
        assert seen == [slice_labels[event_index(request_id)]]
    assert sum(batch.end_of_stream for batch in batches) == 4
    columns = batches[0].rows.schema.names
    features = [spec.name for spec in movielens.schema.features]
    assert set(columns) == {"request_id", "event_time", "produced_at", "label", *features}
    first = next(batch for batch in batches if batch.num_rows)
    assert pa.types.is_list(first.rows.schema.field("hist_item_id").type)
    assert (first.column("produced_at") > 1.6e9).all()


def test_clicks_later_than_the_window_are_dropped_and_counted(
    kafka, topics, movielens, slice_labels
):
    ReplayProducer(movielens, kafka, topics, ProducerConfig(limit=SLICE, label_delay_s=120)).run()
    report = _join(kafka, topics, window_s=60).report
    assert report.examples == SLICE
    assert report.positives == 0
    assert report.late_clicks == int(slice_labels.sum())
    labels, _ = read_examples(kafka, topics)
    assert len(labels) == SLICE and all(seen == [0] for seen in labels.values())


def test_poison_messages_go_to_the_dead_letter_topic_and_the_join_goes_on(
    kafka, topics, movielens, slice_labels
):
    rows = pa.RecordBatch.from_pydict(
        {
            "request_id": pa.array([1], pa.int64()),
            "event_time": pa.array([1.0]),
            "produced_at": pa.array([1.0]),
            "user_id": pa.array([3], pa.int64()),
        }
    )
    impressions = messages.encode(messages.Batch(messages.FEATURE_LOG, rows, watermark=0))
    poison = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    poison.send(topics.feature_log, os.urandom(300), partition=0)
    poison.send(topics.feature_log, b"", partition=1)
    poison.send(topics.actions, impressions, partition=2)
    poison.send(topics.feature_log, impressions.replace(b"request_id", b"request_xx"), partition=3)
    # Valid, but with other features than the data set's: it must not become the stream's schema.
    poison.send(topics.feature_log, impressions, partition=3)
    poison.flush()
    poison.close()
    ReplayProducer(movielens, kafka, topics, ProducerConfig(limit=500, label_delay_s=10)).run()

    features = tuple(spec.name for spec in movielens.schema.features)
    report = _join(kafka, topics, window_s=60, features=features).report
    assert report.examples == 500
    assert report.positives == int(slice_labels[:500].sum())
    assert report.dlq == {
        "undecodable": 2,
        "wrong-kind": 1,
        "missing-column": 1,
        "schema-mismatch": 1,
    }

    dead = read_topic(kafka, topics.dlq(topics.feature_log)) + read_topic(
        kafka, topics.dlq(topics.actions)
    )
    assert len(dead) == 5
    for record in dead:
        headers = dict(record.headers)
        assert headers["reason"].decode() in report.dlq
        assert headers["error"] and headers["source_offset"] in (b"0", b"1")
    assert {bytes(dict(r.headers)["source_topic"]) for r in dead} == {
        topics.feature_log.encode(),
        topics.actions.encode(),
    }


def test_state_is_bounded_and_what_is_closed_early_is_counted(kafka, topics, movielens):
    ReplayProducer(
        movielens, kafka, topics, ProducerConfig(limit=SLICE, label_delay_s=50, batch_rows=40)
    ).run()
    # A window longer than the replay: every impression would stay until the end markers.
    report = _join(kafka, topics, window_s=1e7, max_pending_rows=50).report
    assert report.examples == SLICE, "every impression still becomes exactly one example"
    assert report.evicted_impressions > 0
    assert report.negatives >= report.evicted_impressions
    labels, _ = read_examples(kafka, topics)
    assert len(labels) == SLICE
    assert np.all([len(seen) == 1 for seen in labels.values()])


def test_pipelines_with_other_topic_prefixes_never_share_a_default_consumer_group(kafka, movielens):
    """Two joiners left to their default group on one cluster: each commits in a group of its
    own prefix, and no group holds offsets of the other pipeline's topics."""
    pipelines = [Topics(prefix=f"test-{uuid.uuid4().hex[:10]}.") for _ in range(2)]
    for topics in pipelines:
        ensure_topics(kafka, stream_topic_partitions(topics, PARTITIONS))
        ReplayProducer(movielens, kafka, topics, ProducerConfig(limit=200)).run()
    joiners = [Joiner(kafka, topics, JoinerConfig(window_s=60)) for topics in pipelines]
    threads = [threading.Thread(target=joiner.run) for joiner in joiners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [joiner.report.examples for joiner in joiners] == [200, 200]
    for mine, other in (pipelines, pipelines[::-1]):
        consumer = make_consumer(kafka, f"{mine.prefix}embtab-joiner")
        try:
            committed = {
                topics.prefix: sum(
                    consumer.committed(TopicPartition(topics.feature_log, p), timeout_ms=5000) or 0
                    for p in range(PARTITIONS)
                )
                for topics in (mine, other)
            }
        finally:
            consumer.close(autocommit=False)
        assert committed[mine.prefix] > 0 and committed[other.prefix] == 0, committed


def _events(producer: KafkaProducer, topics, partition: int, rows: int = 10) -> None:
    """`rows` impressions on a partition (request ids partition * 100 + i, feature `f`), and a
    click for every other one."""
    ids = np.arange(partition * 100, partition * 100 + rows, dtype=np.int64)
    times = 1000.0 + np.arange(rows, dtype=np.float64)
    impressions = pa.RecordBatch.from_pydict(
        {
            "request_id": pa.array(ids),
            "event_time": pa.array(times),
            "produced_at": pa.array(times),
            "f": pa.array(ids % 7),
        }
    )
    clicked = slice(0, rows, 2)
    actions = pa.RecordBatch.from_pydict(
        {
            "request_id": pa.array(ids[clicked]),
            "user_id": pa.array(ids[clicked]),
            "item_id": pa.array(ids[clicked]),
            "click": pa.array(np.ones(len(ids[clicked]), np.int8)),
            "impression_time": pa.array(times[clicked]),
            "event_time": pa.array(times[clicked] + 1),
            "produced_at": pa.array(times[clicked] + 1),
        }
    )
    for topic, kind, batch in (
        (topics.feature_log, messages.FEATURE_LOG, impressions),
        (topics.actions, messages.ACTIONS, actions),
    ):
        message = messages.Batch(kind, batch, watermark=float(times[0]))
        producer.send(topic, messages.encode(message), partition=partition)


def _end(producer: KafkaProducer, topic: str, kind: str, partitions: list[int]) -> None:
    for partition in partitions:
        marker = messages.heartbeat(kind, 0.0, end_of_stream=True)
        producer.send(topic, messages.encode(marker), partition=partition)


def test_a_restart_after_end_markers_were_committed_stops_at_the_end(kafka, topics):
    """Partition 0 ends on both topics and partition 1 on the feature log only, and those
    markers are committed, before the joiner goes away (it stops on its idle timeout); the
    restarted joiner never reads them again and must still stop once every partition has ended
    (it used to wait for them forever)."""
    group = f"joiner-{uuid.uuid4().hex[:8]}"
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all")
    for partition in range(4):
        _events(producer, topics, partition)
    _end(producer, topics.feature_log, messages.FEATURE_LOG, [0, 1])
    _end(producer, topics.actions, messages.ACTIONS, [0])
    producer.flush(timeout=30)
    first = Joiner(kafka, topics, JoinerConfig(group_id=group, idle_timeout_s=2.0))
    assert sorted(first.run().ended_partitions) == [0]
    # Every click joined at once; only partition 0's windows closed (its unclicked five).
    assert (first.report.positives, first.report.negatives) == (20, 5)

    _end(producer, topics.feature_log, messages.FEATURE_LOG, [2, 3])
    _end(producer, topics.actions, messages.ACTIONS, [1, 2, 3])
    producer.flush(timeout=30)
    producer.close()
    restarted = Joiner(kafka, topics, JoinerConfig(group_id=group))
    assert stops_by_itself(restarted.run), (
        "the restarted joiner did not stop at the end of the stream"
    )
    assert sorted(restarted.report.ended_partitions) == [0, 1, 2, 3]
    labels, batches = read_examples(kafka, topics)
    assert sorted(labels) == [p * 100 + i for p in range(4) for i in range(10)]
    assert all(set(seen) == {1 - (rid % 100) % 2} for rid, seen in labels.items())
    assert sum(batch.end_of_stream for batch in batches) == 4, "one end marker per partition"
