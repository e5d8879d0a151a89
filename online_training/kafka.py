"""Kafka client settings in one place: where the brokers are, how to authenticate, topic layout.

Every producer, consumer and admin client of the streaming loop is built here, so SASL/SSL
settings and the consumer-group timings apply to all of them alike.
"""

from __future__ import annotations

import logging
import os
import queue
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields

import numpy as np
from kafka import (
    ConsumerRebalanceListener,
    KafkaAdminClient,
    KafkaConsumer,
    KafkaProducer,
    TopicPartition,
)
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import KafkaError, KafkaTimeoutError

# Tansu completes a consumer group's join only after the rebalance timeout, which kafka-python
# takes from max_poll_interval_ms (300 s by default). These make a group join in about 3 s.
log = logging.getLogger(__name__)

KAFKA_CONSUMER_DEFAULTS = {
    "max_poll_interval_ms": 3000,
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 1000,
}

# One message holds a whole batch of rows; these leave room for batches of a few MB. Topics
# are created with this as their max.message.bytes, so the broker takes what the producer may
# send; a topic that exists already keeps its own limit, and batches are split to fit it.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Kafka's default max.message.bytes (1 MiB + 12): the limit of a topic whose broker reports none.
KAFKA_DEFAULT_MESSAGE_BYTES = 1_048_588
# What the record batch around a message adds to its value (batch and record headers, the
# dead-letter headers): a value may take a topic's limit less this.
RECORD_BATCH_OVERHEAD = 4096
# The producer's record batches: up to this much of one partition's messages travel together.
PRODUCER_BATCH_BYTES = 1024 * 1024

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI")

# Environment variables read by KafkaSettings.from_env, by setting name.
ENVIRONMENT = {
    "bootstrap_servers": "EMBTAB_KAFKA",
    "security_protocol": "EMBTAB_KAFKA_SECURITY_PROTOCOL",
    "sasl_mechanism": "EMBTAB_KAFKA_SASL_MECHANISM",
    "sasl_plain_username": "EMBTAB_KAFKA_SASL_USERNAME",
    "sasl_plain_password": "EMBTAB_KAFKA_SASL_PASSWORD",
    "ssl_cafile": "EMBTAB_KAFKA_SSL_CAFILE",
    "ssl_certfile": "EMBTAB_KAFKA_SSL_CERTFILE",
    "ssl_keyfile": "EMBTAB_KAFKA_SSL_KEYFILE",
    "ssl_password": "EMBTAB_KAFKA_SSL_PASSWORD",
}


class KafkaConfigError(ValueError):
    """Kafka settings or a topic layout that cannot work; the message says what is accepted."""


class KafkaUnavailableError(KafkaError):
    """No broker answered at the bootstrap address within the settings' bootstrap timeout: a
    failure of the service (or of the address given), not bad input."""


@dataclass(frozen=True)
class KafkaSettings:
    """Where the brokers are and how to reach them; passed through to every kafka-python client.
    Passwords are left out of the repr, so settings can be logged."""

    bootstrap_servers: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = field(default=None, repr=False)
    client_id: str = "embtab"
    # How long a client waits for a first broker to answer before KafkaUnavailableError.
    bootstrap_timeout_ms: int = 30_000

    def __post_init__(self) -> None:
        if not self.bootstrap_servers:
            raise KafkaConfigError(
                "no Kafka bootstrap servers; give host:port[,host:port] (--kafka or EMBTAB_KAFKA)"
            )
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise KafkaConfigError(
                f"unknown Kafka security protocol {self.security_protocol!r}; "
                f"accepted: {', '.join(SECURITY_PROTOCOLS)}"
            )
        if self.sasl_mechanism is not None and self.sasl_mechanism not in SASL_MECHANISMS:
            raise KafkaConfigError(
                f"unknown SASL mechanism {self.sasl_mechanism!r}; "
                f"accepted: {', '.join(SASL_MECHANISMS)}"
            )
        if self.bootstrap_timeout_ms < 1:
            raise KafkaConfigError(
                f"bootstrap timeout must be >= 1 ms, got {self.bootstrap_timeout_ms}"
            )
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism is None:
            raise KafkaConfigError(
                f"security protocol {self.security_protocol} needs a SASL mechanism "
                f"({', '.join(SASL_MECHANISMS)})"
            )

    @classmethod
    def from_env(
        cls, bootstrap_servers: str | None = None, environ: Mapping[str, str] | None = None
    ) -> KafkaSettings:
        """Settings from the EMBTAB_KAFKA* variables; an explicit bootstrap address wins."""
        environ = os.environ if environ is None else environ
        values = {name: environ[var] for name, var in ENVIRONMENT.items() if environ.get(var)}
        if bootstrap_servers:
            values["bootstrap_servers"] = bootstrap_servers
        return cls(**{"bootstrap_servers": "", **values})

    def client_options(self) -> dict:
        """The settings as kafka-python keyword arguments (unset ones left to its defaults)."""
        options = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: value for name, value in options.items() if value is not None}


@dataclass(frozen=True)
class Topics:
    """The names of the streaming topics; a prefix keeps runs (and tests) apart."""

    prefix: str = ""

    @property
    def feature_log(self) -> str:
        return f"{self.prefix}feature-log"

    @property
    def actions(self) -> str:
        return f"{self.prefix}actions"

    @property
    def examples(self) -> str:
        return f"{self.prefix}examples"

    def group_id(self, role: str, model: str = "") -> str:
        """The default consumer group of a role ("joiner", "trainer"), named after the prefix
        (and the model a trainer trains): pipelines with other prefixes on one cluster, or two
        models trained from one examples topic, never join one group and split its partitions."""
        return f"{self.prefix}embtab-{role}" + (f".{model}" if model else "")

    @staticmethod
    def dlq(topic: str) -> str:
        """Where undecodable or invalid messages of `topic` go."""
        return f"{topic}.dlq"

    def all(self) -> list[str]:
        streams = [self.feature_log, self.actions, self.examples]
        return streams + [self.dlq(topic) for topic in streams]


class RebalanceEvents(ConsumerRebalanceListener):
    """Hands rebalance callbacks (made on kafka-python's IO thread) to the consumer's loop,
    which applies them between polls: `events` holds ("revoked" | "assigned", partitions)."""

    def __init__(self) -> None:
        self.events: queue.SimpleQueue[tuple[str, set[TopicPartition]]] = queue.SimpleQueue()

    def on_partitions_revoked(self, revoked) -> None:
        self.events.put(("revoked", set(revoked)))

    def on_partitions_assigned(self, assigned) -> None:
        self.events.put(("assigned", set(assigned)))

    def on_partitions_lost(self, lost) -> None:
        self.events.put(("revoked", set(lost)))

    def take(self) -> Iterator[tuple[str, set[TopicPartition]]]:
        """The events not taken yet, oldest first; each is logged once the caller has applied
        it (a process watching the log then knows the assignment is in effect)."""
        while True:
            try:
                event, partitions = self.events.get_nowait()
            except queue.Empty:
                return
            yield event, partitions
            log.info("partitions %s: %s", event, sorted(map(tuple, partitions)))


def make_producer(
    settings: KafkaSettings, max_message_bytes: int = MAX_MESSAGE_BYTES, **overrides
) -> KafkaProducer:
    """A producer that waits for all in-sync replicas and retries within its delivery timeout.

    `max_message_bytes`: the smallest limit of the topics it writes (`message_limits`); the
    record batches it gathers several messages into stay within it, as the broker requires.
    """
    options = {
        "acks": "all",
        "linger_ms": 5,
        "max_request_size": MAX_MESSAGE_BYTES,
        "batch_size": min(PRODUCER_BATCH_BYTES, max_message_bytes - RECORD_BATCH_OVERHEAD),
        **settings.client_options(),
        **overrides,
    }
    return _connected(settings, lambda: KafkaProducer(**options))


def make_consumer(settings: KafkaSettings, group_id: str | None, **overrides) -> KafkaConsumer:
    """A consumer that commits only when told to, reads from the start of new partitions, and
    assigns partition i of every subscribed topic to the same member (co-partitioned topics)."""
    options = {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "partition_assignment_strategy": (RangePartitionAssignor,),
        "max_partition_fetch_bytes": MAX_MESSAGE_BYTES,
        "fetch_max_bytes": 4 * MAX_MESSAGE_BYTES,
        **KAFKA_CONSUMER_DEFAULTS,
        **settings.client_options(),
        **overrides,
    }
    return _connected(settings, lambda: KafkaConsumer(**options))


def make_admin(settings: KafkaSettings, **overrides) -> KafkaAdminClient:
    return _connected(
        settings, lambda: KafkaAdminClient(**{**settings.client_options(), **overrides})
    )


def _connected(settings: KafkaSettings, build):
    """`build()`, a client that bootstraps from the brokers; none answering within the
    bootstrap timeout is a KafkaUnavailableError that says where it looked."""
    try:
        return build()
    except KafkaTimeoutError as error:
        raise KafkaUnavailableError(
            f"no Kafka broker answered at {settings.bootstrap_servers} within "
            f"{settings.bootstrap_timeout_ms / 1000:g} s ({error}); check the address "
            "(--kafka or EMBTAB_KAFKA), that the broker is running and that this host reaches it"
        ) from error


def ensure_topics(settings: KafkaSettings, partitions: Mapping[str, int]) -> dict[str, int]:
    """Create the topics that do not exist yet; returns every topic's partition count.

    A topic that exists with another partition count is an error: co-partitioned topics (the
    feature log, the actions and the examples) must agree on it.
    """
    admin = make_admin(settings)
    try:
        requested = {
            name: {
                "num_partitions": count,
                "replication_factor": -1,
                "configs": {"max.message.bytes": str(MAX_MESSAGE_BYTES)},
            }
            for name, count in partitions.items()
        }
        response = admin.create_topics(requested, raise_errors=False)
        for topic in response["topics"]:
            # 0: created; 36: it exists already (checked below).
            if topic["error_code"] not in (0, 36):
                raise KafkaConfigError(
                    f"could not create topic {topic['name']!r}: error {topic['error_code']} "
                    f"{topic['error_message'] or ''}".rstrip()
                )
        actual = {
            topic["name"]: len(topic["partitions"])
            for topic in admin.describe_topics(list(partitions))
        }
    except KafkaError as error:
        raise KafkaConfigError(
            f"could not create topics at {settings.bootstrap_servers}: {error}"
        ) from error
    finally:
        admin.close()
    for name, count in partitions.items():
        if actual.get(name) != count:
            raise KafkaConfigError(
                f"topic {name!r} has {actual.get(name)} partitions, {count} are needed; "
                "use another topic prefix or the existing partition count"
            )
    return actual


def message_limits(settings: KafkaSettings, topics: Iterable[str]) -> dict[str, int]:
    """The largest record batch each topic takes (its max.message.bytes, at most the producer's
    MAX_MESSAGE_BYTES; Kafka's default where the broker reports none)."""
    names = list(dict.fromkeys(topics))
    admin = make_admin(settings)
    try:
        # Every config of each topic: asking for one by name disconnects Tansu 0.6.
        described = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name) for name in names],
            config_filter="all",
        ).get("topic", {})
    except KafkaError as error:
        raise KafkaConfigError(
            f"could not read the configs of topics {names} at {settings.bootstrap_servers}: {error}"
        ) from error
    finally:
        admin.close()
    limits = {}
    for name in names:
        value = described.get(name, {}).get("max.message.bytes", {}).get("value")
        limit = KAFKA_DEFAULT_MESSAGE_BYTES if value is None else int(value)
        if limit <= RECORD_BATCH_OVERHEAD:
            raise KafkaConfigError(
                f"topic {name!r} takes messages of at most {limit} bytes; embtab needs "
                f"max.message.bytes > {RECORD_BATCH_OVERHEAD} (it creates topics with "
                f"{MAX_MESSAGE_BYTES})"
            )
        limits[name] = min(limit, MAX_MESSAGE_BYTES)
    return limits


def stream_topic_partitions(topics: Topics, partitions: int) -> dict[str, int]:
    """Partition counts for a streaming loop: the three streams co-partitioned, each DLQ one."""
    if partitions < 1:
        raise KafkaConfigError(f"partitions must be >= 1, got {partitions}")
    streams = [topics.feature_log, topics.actions, topics.examples]
    return {**dict.fromkeys(streams, partitions), **{topics.dlq(t): 1 for t in streams}}


def user_partitions(user_ids: np.ndarray, partitions: int) -> np.ndarray:
    """The partition of each row, from its user id (splitmix64, so that ids in a range spread).

    Rows of one user always land in the same partition number of every co-partitioned topic,
    which keeps one user's impressions, actions and examples in order and on one joiner.
    """
    mixed = np.asarray(user_ids).astype(np.uint64)
    with np.errstate(over="ignore"):
        mixed = mixed + np.uint64(0x9E3779B97F4A7C15)
        mixed = (mixed ^ (mixed >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        mixed = (mixed ^ (mixed >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        mixed = mixed ^ (mixed >> np.uint64(31))
    return (mixed % np.uint64(partitions)).astype(np.int64)
