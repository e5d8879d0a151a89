"""Poison on the real broker: random bytes and Arrow batches of wrong schemas, sent to the
joiner's and the trainer's input topics ahead of good traffic, must all end in the dead-letter
topics, as they came, while every good row still goes through.

Wrong schemas are drawn around the real ones: the right or another kind (or no metadata), a
required column dropped or retyped, nulls, unsupported feature types, a forged end-of-stream or
infinite watermark, and zero-row batches (heartbeats) of a bad shape. Each example makes fresh
topics and runs the joiner (or trainer) to the end of the stream, so examples are few and big:
see EXAMPLES and POISON_PER_EXAMPLE.
"""

from __future__ import annotations

import uuid
from collections import Counter

import pyarrow as pa
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kafka import KafkaProducer

from online_training import messages
from online_training.joiner import Joiner
from online_training.joiner_config import JoinerConfig
from online_training.kafka import KafkaSettings, Topics, ensure_topics, stream_topic_partitions
from online_training.producer import ProducerConfig, ReplayProducer
from online_training.sync import SyncConfig
from online_training.trainer import Trainer
from online_training.trainer_config import TrainerConfig
from online_training.trainer_state import StartingPoint
from tests.online_training.conftest import PARTITIONS, read_topic
from tests.online_training.example_stream import (
    example_rows,
    publisher_for,
    send_examples,
    small_model,
    unique_model_name,
)

EXAMPLES = 2  # per pipeline (joiner, trainer); each runs the pipeline once, ~5-10 s
POISON_PER_EXAMPLE = 60
GOOD_EVENTS = 200
IDLE_S = 30.0  # a run whose end marker never comes stops (and fails) instead of hanging

ARROW_TYPES = {
    "int64": pa.int64(),
    "float64": pa.float64(),
    "int8": pa.int8(),
    "string": pa.string(),
    "bool": pa.bool_(),
    "list<int64>": pa.list_(pa.int64()),
}
NAME_OF = {arrow_type: name for name, arrow_type in ARROW_TYPES.items()}


def _column(kind: str, rows: int, nulls: bool) -> pa.Array:
    arrow_type = ARROW_TYPES[kind]
    values = [None if nulls and i == 0 else i for i in range(rows)]
    if kind == "string":
        values = [None if v is None else f"v{v}" for v in values]
    elif kind == "bool":
        values = [None if v is None else bool(v % 2) for v in values]
    elif kind == "list<int64>":
        values = [None if v is None else [v, v + 1] for v in values]
    elif kind == "float64":
        values = [None if v is None else v + 0.5 for v in values]
    return pa.array(values, arrow_type)


@st.composite
def wrong_schema(draw, kind: str, features: tuple[str, ...]) -> bytes:
    """An Arrow IPC message that decodes but is not a valid `kind` batch of these features."""
    required = dict(messages.REQUIRED_COLUMNS[kind])
    names = [*required, *features]
    kept = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    types = {name: NAME_OF[required.get(name, pa.int64())] for name in kept}
    for name in draw(st.lists(st.sampled_from(kept), unique=True)) if kept else []:
        types[name] = draw(st.sampled_from(sorted(ARROW_TYPES)))
    extra = draw(st.lists(st.text("abcxyz_", min_size=1, max_size=6), unique=True, max_size=2))
    for name in extra:
        if name not in types:
            types[name] = draw(st.sampled_from(sorted(ARROW_TYPES)))
    rows = draw(st.integers(0, 5))
    nulls = rows > 0 and draw(st.booleans())
    metadata = {
        "embtab.kind": draw(st.sampled_from([kind, kind, *messages.KINDS, "nonsense"])),
        "embtab.version": draw(st.sampled_from(["1", "1", "2", "x"])),
        "embtab.watermark": draw(st.sampled_from(["0", "inf", "-1e300", "nan", "soon"])),
    }
    if draw(st.booleans()):
        metadata["embtab.end_of_stream"] = "1"
    if draw(st.booleans()):
        metadata = {}
    # What every consumer refuses, whatever features it reads (extra or missing features alone
    # may be fine for a trainer whose model does not read them).
    broken = (
        metadata.get("embtab.kind") != kind
        or metadata["embtab.version"] != "1"
        or metadata["embtab.watermark"] in ("nan", "soon")
        or any(types.get(name) != NAME_OF[t] for name, t in required.items())
        or nulls
        or any(t in ("string", "bool") for t in types.values())
    )
    if not broken:  # drawn acceptable: break it the plainest way
        types.pop("request_id")
    batch = pa.RecordBatch.from_pydict(
        {name: _column(t, rows, nulls) for name, t in types.items()}
    ).replace_schema_metadata(metadata)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def partial_heartbeat(kind: str, features: tuple[str, ...]) -> bytes:
    """A zero-row batch with the kind's columns and only some of the features: not a heartbeat
    (those carry no features), not a batch of this stream. Both pipelines once took it as one."""
    heartbeat = messages.heartbeat(kind, 0.0, end_of_stream=True).rows
    rows = heartbeat.append_column(features[-1], pa.array([], pa.float32()))
    return messages.encode(messages.Batch(kind, rows, watermark=0.0, end_of_stream=True))


def poison(kind: str, features: tuple[str, ...]) -> st.SearchStrategy[tuple[int, bytes]]:
    """(partition, message): random bytes or a wrong-schema batch."""
    payload = st.binary(max_size=600) | wrong_schema(kind, features)
    return st.tuples(st.integers(0, PARTITIONS - 1), payload)


def _fresh_topics(kafka: KafkaSettings) -> Topics:
    topics = Topics(prefix=f"fuzz-{uuid.uuid4().hex[:10]}.")
    ensure_topics(kafka, stream_topic_partitions(topics, PARTITIONS))
    return topics


def _send(kafka: KafkaSettings, sends: list[tuple[str, int, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all")
    try:
        for topic, partition, value in sends:
            producer.send(topic, value, partition=partition)
        producer.flush(timeout=30)
    finally:
        producer.close()


def _assert_dead_lettered(kafka, topics_and_sends: dict[str, list[bytes]], report_dlq) -> None:
    """Every poison message, byte for byte, in its topic's DLQ, and counted by reason."""
    for topic, sent in topics_and_sends.items():
        dead = read_topic(kafka, Topics.dlq(topic))
        assert Counter(record.value for record in dead) == Counter(sent), topic
        for record in dead:
            headers = dict(record.headers)
            assert headers["reason"] and headers["error"], headers
    assert sum(report_dlq.values()) == sum(len(sent) for sent in topics_and_sends.values())


# No shrinking: each run is seconds of broker traffic, and a failure shows its messages anyway.
FUZZ = settings(
    max_examples=EXAMPLES,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


@FUZZ
@given(data=st.data())
def test_poison_for_the_joiner_all_ends_in_the_dead_letter_topics(kafka, movielens, data):
    features = tuple(spec.name for spec in movielens.schema.features)
    topics = _fresh_topics(kafka)
    sends = []
    for _ in range(POISON_PER_EXAMPLE):
        topic = data.draw(st.sampled_from([topics.feature_log, topics.actions]))
        kind = messages.FEATURE_LOG if topic == topics.feature_log else messages.ACTIONS
        partition, value = data.draw(poison(kind, features))
        sends.append((topic, partition, value))
    sends.append((topics.feature_log, 0, partial_heartbeat(messages.FEATURE_LOG, features)))
    _send(kafka, sends)
    config = ProducerConfig(limit=GOOD_EVENTS, label_delay_s=10)
    ReplayProducer(movielens, kafka, topics, config).run()

    joiner = Joiner(
        kafka,
        topics,
        JoinerConfig(
            group_id=f"fuzz-{uuid.uuid4().hex[:8]}",
            window_s=60,
            features=features,
            idle_timeout_s=IDLE_S,
        ),
    )
    joiner.run()
    assert joiner.report.examples == GOOD_EVENTS
    by_topic = {topics.feature_log: [], topics.actions: []}
    for topic, _, value in sends:
        by_topic[topic].append(value)
    _assert_dead_lettered(kafka, by_topic, joiner.report.dlq)


@FUZZ
@given(data=st.data())
def test_poison_for_the_trainer_all_ends_in_the_dead_letter_topic(
    kafka, movielens, redis_service, data
):
    features = tuple(spec.name for spec in movielens.schema.features)
    topics = _fresh_topics(kafka)
    sends = [
        (topics.examples, *data.draw(poison(messages.EXAMPLES, features)))
        for _ in range(POISON_PER_EXAMPLE)
    ]
    sends.append((topics.examples, 0, partial_heartbeat(messages.EXAMPLES, features)))
    _send(kafka, sends)
    good = example_rows(movielens, GOOD_EVENTS)
    send_examples(kafka, topics.examples, good, PARTITIONS, batch_rows=50)

    trainer = Trainer(
        kafka,
        topics,
        StartingPoint(small_model(movielens)),
        publisher_for(redis_service.redis_url, unique_model_name("fuzz")),
        TrainerConfig(
            group_id=f"fuzz-{uuid.uuid4().hex[:8]}",
            sync=SyncConfig(interval_s=60, dense_every=1),
            idle_timeout_s=IDLE_S,
        ),
    )
    report = trainer.run()
    assert report.examples == GOOD_EVENTS
    _assert_dead_lettered(kafka, {topics.examples: [value for _, _, value in sends]}, report.dlq)
