"""Bad input at the joiner's start: a missing topic, topics with different partition counts, a
broker that does not answer. Each is a clear error, after a bounded wait at most."""

from __future__ import annotations

import socket
import time
import uuid

import pytest

from online_training.joiner import Joiner
from online_training.joiner_config import JoinerConfig
from online_training.kafka import (
    KafkaConfigError,
    KafkaSettings,
    KafkaUnavailableError,
    Topics,
    ensure_topics,
)


def _fresh_topics() -> Topics:
    return Topics(prefix=f"test-{uuid.uuid4().hex[:10]}.")


def _joiner(kafka: KafkaSettings, topics: Topics) -> Joiner:
    return Joiner(kafka, topics, JoinerConfig(group_id=f"j-{uuid.uuid4().hex[:8]}"))


def test_a_missing_topic_is_named_with_how_to_create_it(kafka):
    topics = _fresh_topics()
    ensure_topics(kafka, {topics.feature_log: 2, topics.examples: 2})
    ensure_topics(kafka, {Topics.dlq(t): 1 for t in (topics.feature_log, topics.actions)})
    with pytest.raises(KafkaConfigError) as raised:
        _joiner(kafka, topics).run()
    message = str(raised.value)
    assert repr(topics.actions) in message and "do not exist" in message
    assert f"--create --topic {topics.actions} --partitions 2" in message


def test_topics_with_different_partition_counts_are_refused(kafka):
    topics = _fresh_topics()
    ensure_topics(kafka, {topics.feature_log: 4, topics.actions: 2, topics.examples: 4})
    ensure_topics(kafka, {Topics.dlq(t): 1 for t in (topics.feature_log, topics.actions)})
    with pytest.raises(KafkaConfigError) as raised:
        _joiner(kafka, topics).run()
    message = str(raised.value)
    assert "same number of partitions" in message and "--partitions 4" in message
    assert f"'{topics.actions}': 2" in message


def test_an_unreachable_broker_is_a_clear_error_after_a_bounded_wait():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the socket is closed
    kafka = KafkaSettings(f"127.0.0.1:{port}", bootstrap_timeout_ms=1500)
    started = time.monotonic()
    with pytest.raises(KafkaUnavailableError, match=f"127.0.0.1:{port} within 1.5 s"):
        _joiner(kafka, _fresh_topics()).run()
    assert time.monotonic() - started < 10
