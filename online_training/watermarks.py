"""The joiner's per-partition watermarks: the producer's, or derived from event times.

A partition's watermark is the smaller of the feature log's and the actions' clocks: the
watermark an Arrow batch carries, or, for a topic-partition whose producer sends none (per-event
JSON), the largest event time seen minus `allowed_lateness_s`. A topic read to its end and silent
for `idle_after_s` wall seconds moves on with the wall clock, and at least to the other topic's
watermark of its partition, so windows close when traffic stops.
"""

from __future__ import annotations

import logging
import math

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import IllegalStateError, KafkaError

from online_training import messages
from online_training.join_state import PartitionState
from online_training.kafka import Topics

log = logging.getLogger(__name__)

# How long the idle rule waits for the broker to confirm a partition's end offset.
END_OFFSETS_TIMEOUT_MS = 2000


def advance(clock: float, batch: messages.Batch) -> float:
    """A partition's clock after a batch: its watermark, or a fresh start after an ended one."""
    if batch.end_of_stream:
        return math.inf
    return batch.watermark if clock == math.inf else max(clock, batch.watermark)


def derive(state: PartitionState, is_log: bool, latest: float, lateness: float) -> None:
    """Move a topic's derived watermark on after events up to `latest` (event time)."""
    if is_log:
        state.impression_latest = max(state.impression_latest, latest)
        state.impression_clock = max(state.impression_clock, latest - lateness)
    else:
        state.action_latest = max(state.action_latest, latest)
        state.action_clock = max(state.action_clock, latest - lateness)


def advance_idle(
    consumer: KafkaConsumer,
    topics: Topics,
    partition: int,
    state: PartitionState,
    now: float,
    idle: float,
    lateness: float,
) -> None:
    """Move on the derived watermark of a topic silent for `idle` wall seconds: by the wall
    time since its last event (less `lateness`), and at least to the other topic's watermark (a
    silent topic holds nothing that the other's windows wait for). Silent means read up
    to its end: a partition this joiner lags behind on is not idle, only unread."""
    if (
        not state.impression_watermarked
        and now - state.impression_input_at >= idle
        and read_to_end(consumer, topics.feature_log, partition, state.next_impression_offset)
    ):
        silence = now - state.impression_input_at
        moved = max(state.impression_latest + silence - lateness, state.action_clock)
        state.impression_clock = max(state.impression_clock, moved)
    if (
        not state.action_watermarked
        and now - state.action_input_at >= idle
        and read_to_end(consumer, topics.actions, partition, state.next_action_offset)
    ):
        silence = now - state.action_input_at
        moved = max(state.action_latest + silence - lateness, state.impression_clock)
        state.action_clock = max(state.action_clock, moved)


def read_to_end(consumer: KafkaConsumer, topic: str, partition: int, next_offset) -> bool:
    """Whether this joiner has read a topic-partition up to its end: the last fetch says so and
    the broker confirms it. A fetch's end can be old (a joiner busy with other partitions has
    not fetched this one since); taken for the end, it would let the idle rule close windows
    whose clicks are not read yet."""
    tp = TopicPartition(topic, partition)
    try:
        end = consumer.highwater(tp)
    except IllegalStateError:  # taken away by a rebalance this turn has not applied yet
        return False
    if end is None or (next_offset or 0) < end:
        return False
    try:
        end = consumer.end_offsets([tp], timeout_ms=END_OFFSETS_TIMEOUT_MS)[tp]
    except KafkaError as error:
        log.info("end offset of %s[%d] not read, not idle this turn: %s", topic, partition, error)
        return False
    return (next_offset or 0) >= end
