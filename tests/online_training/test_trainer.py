"""The streaming trainer on the session's real broker and Redis: every example applied, synced
and committed; poison messages dead-lettered; Redis down during a sync."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from kafka import KafkaProducer, TopicPartition

from online_training import messages
from online_training.kafka import KafkaSettings, Topics, make_consumer
from online_training.sync import SyncConfig
from online_training.trainer import Trainer
from online_training.trainer_config import TrainerConfig, TrainerHooks
from online_training.trainer_state import StartingPoint
from serving.reader import ParamReader
from tests.online_training.conftest import PARTITIONS, read_topic
from tests.online_training.example_stream import (
    example_rows,
    publisher_for,
    send_examples,
    small_model,
    stops_by_itself,
    unique_model_name,
)
from tests.online_training.test_sync import assert_redis_holds


def _trainer(kafka, topics, movielens, redis_url, applied: list, **config) -> Trainer:
    sync = config.pop("sync", SyncConfig(interval_s=1.0, dense_every=2))
    settings = TrainerConfig(
        group_id=f"trainer-{uuid.uuid4().hex[:8]}", auc_window=500, sync=sync, **config
    )
    hooks = TrainerHooks(
        on_applied=lambda batch: applied.append(batch.rows.column("request_id").to_numpy())
    )
    publisher = publisher_for(redis_url, unique_model_name())
    return Trainer(kafka, topics, StartingPoint(small_model(movielens)), publisher, settings, hooks)


def _committed(kafka: KafkaSettings, group: str, topic: str) -> dict[int, int | None]:
    consumer = make_consumer(kafka, group)
    try:
        return {
            p: consumer.committed(TopicPartition(topic, p), timeout_ms=5000)
            for p in range(PARTITIONS)
        }
    finally:
        consumer.close(autocommit=False)


def test_every_example_is_trained_synced_and_committed(kafka, topics, movielens, redis_service):
    rows = example_rows(movielens, 3000)
    sent = send_examples(kafka, topics.examples, rows, PARTITIONS)
    applied: list = []
    trainer = _trainer(kafka, topics, movielens, redis_service.redis_url, applied)
    report = trainer.run()

    ids = np.concatenate(applied)
    assert len(ids) == report.examples == 3000 and len(np.unique(ids)) == 3000
    assert report.positives == int(rows.column("label").to_numpy().sum())
    assert report.full_publishes == 1 and report.deltas >= 1 and report.dlq_messages == 0
    assert sorted(report.ended_partitions) == list(range(PARTITIONS))
    assert len(report.window_aucs) == 6 and report.last_window_auc is not None
    reader = ParamReader(trainer.sync.publisher.nodes, trainer.sync.publisher.model)
    assert reader.live_version() == report.version
    assert reader.head(report.version).delta == report.delta
    assert_redis_holds(reader, trainer.model)
    group = trainer.config.group_id
    assert _committed(kafka, group, topics.examples) == sent, "every message read is committed"
    status = trainer.status()
    assert status.examples == 3000 and status.lag == 0 and status.dead_letters == 0


def test_poison_messages_go_to_the_dead_letter_topic_and_training_goes_on(
    kafka, topics, movielens, redis_service
):
    good = example_rows(movielens, 1000)
    bad_ids = example_rows(movielens, 10, start=1000)
    user_column = bad_ids.schema.get_field_index("user_id")
    bad_ids = bad_ids.set_column(
        user_column, "user_id", pa.array(np.full(10, 10**9, dtype=np.int64))
    )
    no_genres = example_rows(movielens, 10, start=1010).drop_columns(["genres"])
    impressions = messages.Batch(
        messages.FEATURE_LOG, example_rows(movielens, 5).drop_columns(["label"]), watermark=0
    )
    poison = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    poison.send(topics.examples, os.urandom(300), partition=0)
    poison.send(topics.examples, messages.encode(impressions), partition=1)
    for partition, rows in ((2, no_genres), (3, bad_ids)):
        batch = messages.Batch(messages.EXAMPLES, rows, watermark=0)
        poison.send(topics.examples, messages.encode(batch), partition=partition)
    poison.flush()
    poison.close()
    sent = send_examples(kafka, topics.examples, good, PARTITIONS, batch_rows=100)
    sent.update(range(PARTITIONS))

    applied: list = []
    trainer = _trainer(kafka, topics, movielens, redis_service.redis_url, applied)
    report = trainer.run()

    assert report.dlq == {"undecodable": 1, "wrong-kind": 1, "schema-mismatch": 1, "untrainable": 1}
    ids = np.concatenate(applied)
    assert sorted(ids) == list(range(1000)), "every good example, none of the bad ones"
    dead = read_topic(kafka, Topics.dlq(topics.examples))
    reasons = sorted(dict(record.headers)["reason"].decode() for record in dead)
    assert reasons == ["schema-mismatch", "undecodable", "untrainable", "wrong-kind"]
    untrainable = next(r for r in dead if dict(r.headers)["reason"] == b"untrainable")
    assert b"outside [0, 6040)" in dict(untrainable.headers)["error"]
    assert messages.decode(untrainable.value, messages.EXAMPLES).num_rows == 10
    assert _committed(kafka, trainer.config.group_id, topics.examples) == sent


def test_offsets_wait_while_redis_is_down_and_the_sync_retries(
    kafka, topics, movielens, redis_service
):
    redis = redis_service.redis
    if redis is None:
        pytest.skip("Redis is not ours to pause (EMBTAB_REDIS is set)")
    applied: list = []
    trainer = _trainer(
        kafka,
        topics,
        movielens,
        redis_service.redis_url,
        applied,
        sync=SyncConfig(interval_s=0.5, retry_initial_s=0.1, retry_max_s=0.5),
    )
    group = trainer.config.group_id
    stop = threading.Event()
    thread = threading.Thread(target=trainer.run, args=(stop,), daemon=True)
    first = example_rows(movielens, 1000)
    sent = send_examples(kafka, topics.examples, first, PARTITIONS, end=False)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while _committed(kafka, group, topics.examples) != sent:
            assert time.monotonic() < deadline and thread.is_alive(), "the first part not synced"
            time.sleep(0.2)
        redis.pause()
        try:
            later = example_rows(movielens, 1000, start=1000)
            sent_later = send_examples(kafka, topics.examples, later, PARTITIONS)
            deadline = time.monotonic() + 30
            while trainer.sync.failures < 3:
                assert time.monotonic() < deadline, "no sync was tried while Redis was down"
                time.sleep(0.1)
            time.sleep(1.0)
            assert trainer.report.examples > 1000, "trained, not synced"
            assert _committed(kafka, group, topics.examples) == sent, "nothing more committed"
        finally:
            redis.resume()
        thread.join(timeout=60)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    report = trainer.report
    assert report.examples == 2000 and report.sync_failures >= 3 and not report.final_sync_failed
    assert sorted(np.concatenate(applied)) == list(range(2000))
    assert _committed(kafka, group, topics.examples) == sent + sent_later
    reader = ParamReader(trainer.sync.publisher.nodes, trainer.sync.publisher.model)
    assert_redis_holds(reader, trainer.model)


def test_a_slow_stream_is_trained_in_batches_of_at_least_min_batch_rows(
    kafka, topics, movielens, redis_service
):
    """Eight messages of 100 rows, 0.2 s apart: the trainer waits for 500 rows before a step
    rather than training on each message as it comes (the last batch may be short)."""
    applied: list = []
    trainer = _trainer(
        kafka,
        topics,
        movielens,
        redis_service.redis_url,
        applied,
        min_batch_rows=500,
        max_batch_wait_s=60.0,
    )
    reports: list = []
    running = threading.Thread(target=lambda: reports.append(trainer.run()), daemon=True)
    running.start()
    deadline = time.monotonic() + 60
    while trainer.status().version is None and time.monotonic() < deadline:
        time.sleep(0.1)
    rows = example_rows(movielens, 800)
    for start in range(0, 800, 100):
        send_examples(kafka, topics.examples, rows.slice(start, 100), PARTITIONS, end=False)
        time.sleep(0.2)
    send_examples(kafka, topics.examples, rows.slice(0, 0), PARTITIONS)
    running.join(timeout=120)
    assert reports and reports[0].examples == 800
    sizes = [len(batch) for batch in applied]
    assert sum(sizes) == 800 and all(size >= 500 for size in sizes[:-1]), sizes
    assert sizes[0] >= 500, sizes


def _end_markers(kafka: KafkaSettings, topic: str, partitions: list[int]) -> Counter[int]:
    """An end-of-stream marker on each of `partitions` of an examples topic."""
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all")
    try:
        marker = messages.encode(messages.heartbeat(messages.EXAMPLES, 0.0, end_of_stream=True))
        for partition in partitions:
            producer.send(topic, marker, partition=partition)
        producer.flush(timeout=30)
    finally:
        producer.close()
    return Counter(partitions)


def test_a_restart_after_end_markers_were_committed_stops_at_the_end(
    kafka, topics, movielens, redis_service
):
    """Partitions 0 and 1 end, and their markers are committed, before the trainer goes away
    (it stops on its idle timeout); the restarted trainer never reads those markers again, and
    must still stop once partitions 2 and 3 end (it used to wait for 0 and 1 forever)."""
    url = redis_service.redis_url
    group = f"trainer-{uuid.uuid4().hex[:8]}"

    def trainer(**config) -> Trainer:
        settings = TrainerConfig(group_id=group, sync=SyncConfig(interval_s=1.0), **config)
        publisher = publisher_for(url, unique_model_name())
        return Trainer(kafka, topics, StartingPoint(small_model(movielens)), publisher, settings)

    rows = example_rows(movielens, 1200)
    sent = send_examples(kafka, topics.examples, rows, PARTITIONS, batch_rows=100, end=False)
    sent += _end_markers(kafka, topics.examples, [0, 1])
    first = trainer(idle_timeout_s=2.0).run()
    assert sorted(first.ended_partitions) == [0, 1] and first.examples == 1200
    assert _committed(kafka, group, topics.examples) == sent, "the markers are committed"

    sent += _end_markers(kafka, topics.examples, [2, 3])
    restarted = trainer()
    assert stops_by_itself(restarted.run), (
        "the restarted trainer did not stop at the end of the stream"
    )
    assert sorted(restarted.report.ended_partitions) == list(range(PARTITIONS))
    assert restarted.report.examples == 0, "everything before the markers was committed"
    assert _committed(kafka, group, topics.examples) == sent
