"""What a real Kafka broker refuses or sends that the embedded one let pass: messages over a
topic's max.message.bytes (Kafka's default is 1 MiB), and record batches compressed by other
producers (lz4, snappy, zstd, gzip).

Tansu 0.6 stores a topic's max.message.bytes and reports it, but takes larger messages all the
same; so the size test checks that no message written exceeds the topic's limit, and that every
row still arrives.
"""

from __future__ import annotations

import uuid

import confluent_kafka
from kafka.admin import NewTopic

from online_training import messages
from online_training.joiner import Joiner
from online_training.joiner_config import JoinerConfig
from online_training.kafka import (
    MAX_MESSAGE_BYTES,
    Topics,
    ensure_topics,
    make_admin,
    message_limits,
    stream_topic_partitions,
)
from online_training.producer import ProducerConfig, ReplayProducer
from tests.online_training.conftest import PARTITIONS as PARTITIONS_OF_FIXTURE
from tests.online_training.conftest import SLICE, event_index, read_examples, read_topic

MIB = 2**20
PARTITIONS = 2
# About 270 bytes a row without compression: 6,000 rows a partition is about 1.6 MB.
EVENTS = 12_000


def _topics_limited_to(kafka, limit: int) -> Topics:
    """Stream topics that exist already, created by someone else with max.message.bytes."""
    topics = Topics(prefix=f"test-{uuid.uuid4().hex[:10]}.")
    admin = make_admin(kafka)
    try:
        admin.create_topics(
            [
                NewTopic(name, count, -1, topic_configs={"max.message.bytes": str(limit)})
                for name, count in stream_topic_partitions(topics, PARTITIONS).items()
            ]
        )
    finally:
        admin.close()
    return topics


def test_topics_are_created_with_the_producers_message_limit(kafka):
    topics = Topics(prefix=f"test-{uuid.uuid4().hex[:10]}.")
    ensure_topics(kafka, stream_topic_partitions(topics, 1))
    assert message_limits(kafka, topics.all()) == dict.fromkeys(topics.all(), MAX_MESSAGE_BYTES)


def test_batches_are_split_to_fit_a_topic_limited_to_1_mib(kafka, movielens):
    topics = _topics_limited_to(kafka, MIB)
    assert message_limits(kafka, topics.all()) == dict.fromkeys(topics.all(), MIB)
    produced = ReplayProducer(
        movielens,
        kafka,
        topics,
        ProducerConfig(limit=EVENTS, batch_rows=EVENTS, compression=None, label_delay_s=30),
    ).run()
    assert produced.impressions == EVENTS
    report = Joiner(
        kafka,
        topics,
        JoinerConfig(
            group_id=f"joiner-{uuid.uuid4().hex[:8]}", batch_rows=EVENTS, compression=None
        ),
    ).run()
    assert report.examples == EVENTS and report.dlq_messages == 0

    for topic in (topics.feature_log, topics.actions, topics.examples):
        records = read_topic(kafka, topic)
        largest = max(record.serialized_value_size for record in records)
        assert largest <= MIB, f"{topic}: a {largest}-byte message on a 1 MiB topic"
        if topic != topics.actions:  # only the clicks: a few hundred KB in all
            assert largest > MIB // 2, f"{topic}: the batches were not near the limit"
    rows = sum(
        messages.decode(record.value, messages.FEATURE_LOG).num_rows
        for record in read_topic(kafka, topics.feature_log)
    )
    assert rows == EVENTS
    labels, _ = read_examples(kafka, topics)
    assert sorted(event_index(request_id) for request_id in labels) == list(range(EVENTS))


# Partition p of the copy is written with CODECS[p], by another client than embtab's.
CODECS = ("lz4", "snappy", "zstd", "gzip")


def test_the_joiner_reads_batches_compressed_with_every_kafka_codec(
    kafka, topics, movielens, slice_labels
):
    """A replay copied record by record into topics by confluent-kafka (librdkafka, what most
    producer teams use), one compression codec a partition; the joiner reads all four."""
    ReplayProducer(
        movielens, kafka, topics, ProducerConfig(limit=SLICE, label_delay_s=30, compression=None)
    ).run()
    copy = Topics(prefix=f"test-{uuid.uuid4().hex[:10]}.")
    ensure_topics(kafka, stream_topic_partitions(copy, len(CODECS)))
    assert len(CODECS) == PARTITIONS_OF_FIXTURE
    for topic, target in ((topics.feature_log, copy.feature_log), (topics.actions, copy.actions)):
        records = read_topic(kafka, topic)
        for partition, codec in enumerate(CODECS):
            producer = confluent_kafka.Producer(
                {
                    "bootstrap.servers": kafka.bootstrap_servers,
                    "compression.type": codec,
                    "linger.ms": 20,
                    "message.max.bytes": MAX_MESSAGE_BYTES,
                }
            )
            for record in records:
                if record.partition == partition:
                    producer.produce(target, record.value, partition=partition)
            assert producer.flush(30) == 0, f"{codec}: messages not delivered"
    report = Joiner(
        kafka, copy, JoinerConfig(group_id=f"joiner-{uuid.uuid4().hex[:8]}", window_s=60)
    ).run()
    assert sorted(report.ended_partitions) == [0, 1, 2, 3]
    assert report.examples == SLICE and report.dlq_messages == 0
    assert report.positives == int(slice_labels.sum())
    labels, _ = read_examples(kafka, copy)
    for request_id, seen in labels.items():
        assert seen == [slice_labels[event_index(request_id)]]
