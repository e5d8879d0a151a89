"""Kafka client settings: env and SASL/SSL pass-through, topic creation, user partitioning."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from online_training.kafka import (
    KAFKA_CONSUMER_DEFAULTS,
    KafkaConfigError,
    KafkaSettings,
    Topics,
    ensure_topics,
    make_consumer,
    user_partitions,
)


def test_settings_come_from_the_environment_and_pass_through_sasl_and_ssl():
    environ = {
        "EMBTAB_KAFKA": "broker-1:9093,broker-2:9093",
        "EMBTAB_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "EMBTAB_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "EMBTAB_KAFKA_SASL_USERNAME": "trainer",
        "EMBTAB_KAFKA_SASL_PASSWORD": "s3cret",
        "EMBTAB_KAFKA_SSL_CAFILE": "/etc/ssl/ca.pem",
    }
    options = KafkaSettings.from_env(environ=environ).client_options()
    assert options == {
        "bootstrap_servers": "broker-1:9093,broker-2:9093",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "trainer",
        "sasl_plain_password": "s3cret",
        "ssl_cafile": "/etc/ssl/ca.pem",
        "client_id": "embtab",
        "bootstrap_timeout_ms": 30_000,
    }
    explicit = KafkaSettings.from_env("localhost:9092", environ=environ)
    assert explicit.bootstrap_servers == "localhost:9092"


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"bootstrap_servers": ""}, "EMBTAB_KAFKA"),
        ({"bootstrap_servers": "h:1", "security_protocol": "TLS"}, "SASL_SSL"),
        ({"bootstrap_servers": "h:1", "sasl_mechanism": "MD5"}, "SCRAM-SHA-256"),
        ({"bootstrap_servers": "h:1", "security_protocol": "SASL_PLAINTEXT"}, "needs a SASL"),
    ],
)
def test_settings_that_cannot_work_are_refused_with_what_is_accepted(settings, says):
    with pytest.raises(KafkaConfigError, match=says):
        KafkaSettings(**settings)


def test_consumers_get_the_quick_group_join_defaults(kafka):
    consumer = make_consumer(kafka, None)
    try:
        for name, value in KAFKA_CONSUMER_DEFAULTS.items():
            assert consumer.config[name] == value
        assert consumer.config["enable_auto_commit"] is False
    finally:
        consumer.close()


def test_topics_are_created_once_and_a_partition_mismatch_is_an_error(kafka):
    name = f"test-{uuid.uuid4().hex[:10]}.feature-log"
    assert ensure_topics(kafka, {name: 3}) == {name: 3}
    assert ensure_topics(kafka, {name: 3}) == {name: 3}
    with pytest.raises(KafkaConfigError, match="has 3 partitions, 4 are needed"):
        ensure_topics(kafka, {name: 4})


def test_topic_names_share_a_prefix_and_each_has_a_dead_letter_topic():
    topics = Topics(prefix="run7.")
    assert topics.all() == [
        "run7.feature-log",
        "run7.actions",
        "run7.examples",
        "run7.feature-log.dlq",
        "run7.actions.dlq",
        "run7.examples.dlq",
    ]


def test_default_consumer_groups_are_named_after_the_prefix_and_the_model():
    assert Topics(prefix="run7.").group_id("joiner") == "run7.embtab-joiner"
    assert Topics(prefix="run7.").group_id("trainer", "dcn") == "run7.embtab-trainer.dcn"
    assert Topics().group_id("joiner") == "embtab-joiner"


def test_a_user_always_lands_in_the_same_partition_and_users_spread_evenly():
    users = np.arange(100_000)
    partitions = user_partitions(users, 8)
    assert np.array_equal(partitions, user_partitions(users.copy(), 8))
    counts = np.bincount(partitions, minlength=8)
    assert counts.min() > 0.95 * counts.mean()
