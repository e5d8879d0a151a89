"""Streaming tests run against the session's real broker (and Redis), on unique topics."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict

import numpy as np
import pytest
from kafka import TopicPartition

from feature_store import datasets
from feature_store.offline import Dataset
from online_training import messages
from online_training.kafka import (
    KafkaSettings,
    Topics,
    ensure_topics,
    make_consumer,
    stream_topic_partitions,
)
from online_training.producer import REQUEST_SEQUENCE_BITS

PARTITIONS = 4
SLICE = 2_000


@pytest.fixture(scope="session")
def movielens() -> Dataset:
    return datasets.load("movielens-1m")


@pytest.fixture(scope="session")
def slice_labels(movielens: Dataset) -> np.ndarray:
    """Labels of the first SLICE events of the test split, in replay order."""
    return movielens.read("test", ["label"]).column("label").to_numpy()[:SLICE]


@pytest.fixture
def kafka(kafka_service) -> KafkaSettings:
    return KafkaSettings(kafka_service.kafka_bootstrap)


@pytest.fixture
def topics(kafka: KafkaSettings) -> Topics:
    """Fresh co-partitioned topics for one test."""
    created = Topics(prefix=f"test-{uuid.uuid4().hex[:10]}.")
    ensure_topics(kafka, stream_topic_partitions(created, PARTITIONS))
    return created


def event_index(request_id: int) -> int:
    """The replay position of a request (the producer numbers requests run_id << 32 | i)."""
    return request_id & ((1 << REQUEST_SEQUENCE_BITS) - 1)


def read_topic(kafka: KafkaSettings, topic: str, timeout_s: float = 20.0) -> list:
    """Every record of a topic up to its current end."""
    consumer = make_consumer(kafka, None)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        ends = consumer.end_offsets(partitions)
        records = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def read_examples(kafka: KafkaSettings, topics: Topics) -> tuple[dict[int, list[int]], list]:
    """Labels by request id (a list: re-delivered examples appear more than once), and batches."""
    labels: dict[int, list[int]] = defaultdict(list)
    batches = []
    for record in read_topic(kafka, topics.examples):
        batch = messages.decode(record.value, messages.EXAMPLES)
        batches.append(batch)
        ids = batch.column("request_id").tolist()
        for request_id, label in zip(ids, batch.column("label").tolist(), strict=True):
            labels[request_id].append(label)
    return labels, batches


@pytest.fixture(scope="session")
def raw_dataset(tmp_path_factory) -> Dataset:
    """A spec'd data set with raw string ids and request ids, prepared in a temporary cache."""
    from tests.online_training.raw_events import prepare_raw_dataset

    root = tmp_path_factory.mktemp("raw-events")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMBTAB_DATA", str(root / "cache"))
        return prepare_raw_dataset(root / "raw", f"raw-events-{uuid.uuid4().hex[:8]}")
