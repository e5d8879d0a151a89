"""Join impressions with their clicks into labelled examples, within an event-time window.

An impression waits `window_s` event-seconds for its click. A click joins it at once (a
positive example goes out); an impression still without one when the window has passed
becomes a negative; a click that comes after its impression's window is dropped and counted.
"Passed" is judged by watermarks: per partition, the smaller of the feature log's and the
actions' watermarks, so a window never closes before every click that could fall into it has
been read, however far one topic runs ahead of the other.

Messages are embtab's Arrow batches, whose metadata carries the producer's watermark, or
per-event JSON from any producer (`online_training.events`), encoded through the data set's
preprocessing artifact. A topic-partition without producer watermarks gets one derived here:
the largest event time seen minus `allowed_lateness_s`; once it has been silent for
`idle_after_s` wall seconds it moves on with the wall clock, and at least to the other topic's
watermark of its partition, so windows close when traffic stops. An
event later than that is dropped and counted: an impression whose window has closed
(`stale_impressions`), a click whose impression went out as a negative (`late_clicks`).

Delivery is at least once: input offsets are committed only up to the oldest message whose
rows are not all joined, and only after the examples for everything before it are flushed to
Kafka. A restarted joiner so re-reads impressions (and the clicks that joined them) whose
examples may already be out; within a run, an impression read again is dropped (a request-id
index over the window, and the watermark beyond it), and so is a repeated click. Memory is
bounded: past `max_pending_rows` the oldest impressions are closed early as negatives, and
counted.
Undecodable or invalid messages go to `<topic>.dlq` with the reason; they never stop the join.

This module is the Kafka side: input decoding, output, commits and rebalances. The windows,
the request-id index and the waiting clicks are `online_training.join_state`, the watermarks
`watermarks`, the settings `joiner_config`, the report `joiner_report`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.errors import KafkaError, KafkaTimeoutError

from feature_store.artifact import Preprocessor
from online_training import events, messages, watermarks
from online_training.batching import PartitionBatcher, Sender
from online_training.dead_letters import DeadLetters
from online_training.end_of_stream import ended_at_commit
from online_training.join_state import PartitionState, Segment, WaitingAction, WindowedJoin
from online_training.joiner_config import JoinerConfig, JoinError
from online_training.joiner_report import JoinerReport
from online_training.kafka import (
    KafkaConfigError,
    KafkaSettings,
    RebalanceEvents,
    Topics,
    make_consumer,
    make_producer,
    message_limits,
)

log = logging.getLogger(__name__)


class Joiner(WindowedJoin):
    """Reads the feature-log and actions topics, writes labelled examples (see the module doc)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: Topics,
        config: JoinerConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        preprocessor: Preprocessor | None = None,
    ) -> None:
        self.kafka = kafka
        self.topics = topics
        self.config = config or JoinerConfig()
        self.group_id = self.config.group_id or topics.group_id("joiner")
        self.clock = clock
        self.report = JoinerReport()
        self.partitions: dict[int, PartitionState] = {}
        self.index: dict[int, tuple[Segment, int]] = {}
        self.waiting: dict[int, WaitingAction] = {}
        self.retained_rows = 0
        self.feature_schema: pa.Schema | None = None
        self._to_emit: dict[int, Segment] = {}
        self._ended: set[int] = set()
        self._rebalance = RebalanceEvents()
        self._last_input = 0.0
        self._first_input: float | None = None
        self._formats = {
            topics.feature_log: self.config.feature_log_format,
            topics.actions: self.config.actions_format,
        }
        self._events = (
            events.EventDecoder(preprocessor, self.config.max_future_s)
            if preprocessor is not None
            else None
        )
        if self._events is None and "json" in self._formats.values():
            raise JoinError(
                "per-event JSON is encoded through the data set's preprocessing artifact: give "
                "the joiner the data set (--dataset), or read Arrow batches (--format arrow)"
            )
        self._poll_records = self.config.max_poll_records

    def run(self, stop: threading.Event | None = None) -> JoinerReport:
        """Join until the stream ends (every assigned partition's end marker), the idle timeout
        passes, or `stop` is set; flushes and commits what it has before returning."""
        started = self.clock()
        consumer = make_consumer(
            self.kafka, self.group_id, max_poll_records=self.config.max_poll_records
        )
        inputs = [self.topics.feature_log, self.topics.actions]
        limits = message_limits(self.kafka, [self.topics.examples, *map(self.topics.dlq, inputs)])
        producer = make_producer(self.kafka, min(limits.values()))
        sender = Sender(producer, self.config.compression, limits)
        self._sender = sender
        self._dead_letters = DeadLetters(sender)
        try:
            consumer.subscribe(
                [self.topics.feature_log, self.topics.actions], listener=self._rebalance
            )
            output_partitions = self._check_partitions(consumer)
            self._output = PartitionBatcher(
                self.topics.examples,
                messages.EXAMPLES,
                output_partitions,
                sender,
                batch_rows=self.config.batch_rows,
                linger_s=self.config.linger_s,
                heartbeats=False,
            )
            self._loop(consumer, stop)
            self._commit(consumer)
        finally:
            consumer.close(autocommit=False)
            producer.close(timeout=self.config.flush_timeout_s)
            finished = self.clock()
            self.report.seconds = finished - started
            if self._first_input is not None:
                self.report.active_seconds = finished - self._first_input
            self.report.messages_out = sender.messages
            self.report.dlq = dict(self._dead_letters.counts)
        return self.report

    # The loop.

    def _loop(self, consumer: KafkaConsumer, stop: threading.Event | None) -> None:
        last_commit = self._last_input = self.clock()
        while stop is None or not stop.is_set():
            polled = consumer.poll(
                timeout_ms=self.config.poll_timeout_ms, max_records=self._poll_records
            )
            self._apply_rebalances(consumer)
            now = self.clock()
            arrow = False
            # Impressions first: a click polled together with its impression then joins at once.
            for tp in sorted(polled, key=lambda tp: tp.topic != self.topics.feature_log):
                for as_json, run in self._runs(tp, polled[tp]):
                    if as_json:
                        self._ingest_json(tp, run, now)
                        continue
                    arrow = True
                    for record in run:
                        self._ingest(tp, record, now)
            if polled:
                self._last_input = now
                if self._first_input is None:
                    self._first_input = now
                self._poll_records = (
                    self.config.max_poll_records if arrow else self.config.max_poll_events
                )
            self._close_windows(consumer, now)
            self._bound_memory()
            self._emit(now)
            if now - last_commit >= self.config.commit_interval_s:
                self._commit(consumer)
                last_commit = self.clock()
            if self._finished(consumer):
                return
            idle = self.config.idle_timeout_s
            if idle is not None and consumer.assignment() and now - self._last_input >= idle:
                return

    def _finished(self, consumer: KafkaConsumer) -> bool:
        if not self.config.stop_at_end:
            return False
        assigned = {tp.partition for tp in consumer.assignment()}
        return bool(assigned) and assigned <= self._ended and not self.index and not self.waiting

    def _check_partitions(self, consumer: KafkaConsumer) -> int:
        return check_partitions(consumer, self.topics)

    # Input.

    def _runs(self, tp: TopicPartition, records: list) -> list[tuple[bool, list]]:
        """The polled records of one partition as runs of (is JSON, records), in order."""
        fixed = self._formats[tp.topic]
        if fixed != "auto":
            return [(fixed == "json", records)]
        runs: list[tuple[bool, list]] = []
        for record in records:
            as_json = events.is_json(record.value)
            if runs and runs[-1][0] == as_json:
                runs[-1][1].append(record)
            else:
                runs.append((as_json, [record]))
        return runs

    def _track(self, state: PartitionState, is_log: bool, record, now: float) -> None:
        """Note a record's offset (counting re-deliveries) and that its topic is not silent."""
        expected = state.next_impression_offset if is_log else state.next_action_offset
        if expected is not None and record.offset < expected:
            # Read again (a rebalance, a retried fetch): the request-id index and the
            # watermark drop its rows where they were joined already.
            self.report.redelivered_messages += 1
        if is_log:
            state.next_impression_offset = record.offset + 1
            state.impression_input_at = now
        else:
            state.next_action_offset = record.offset + 1
            state.action_input_at = now

    def _ingest_json(self, tp: TopicPartition, records: list, now: float) -> None:
        """A run of per-event JSON messages of one partition: the good events join as one
        segment (committed from its first message), each bad one is dead-lettered."""
        state = self._state(tp.partition)
        is_log = tp.topic == self.topics.feature_log
        for record in records:
            self._track(state, is_log, record, now)
        if self._events is None:
            error = messages.MessageError(
                "no-artifact",
                "a JSON message, but this joiner was started without the data set's "
                "preprocessing artifact (--dataset); it reads Arrow batches only",
            )
            for record in records:
                self._dead_letter(tp, record, error)
            return
        values = [record.value for record in records]
        if is_log:
            produced = [_produced_at(record) for record in records]
            decoded, errors = self._events.impressions(values, produced)
        else:
            decoded, errors = self._events.actions(values)
        for index, error in sorted(errors.items()):
            self._dead_letter(tp, records[index], error)
        if decoded is None:
            return
        first_offset = records[int(decoded.message_index[0])].offset
        if is_log:
            batch = messages.Batch(messages.FEATURE_LOG, decoded.rows, watermark=-math.inf)
            try:
                self._check_features(batch)
            except messages.MessageError as error:
                for index in decoded.message_index.tolist():
                    self._dead_letter(tp, records[index], error)
                return
            self._ended.discard(tp.partition)
            self._add_impressions(state, tp.partition, first_offset, batch)
            latest = float(batch.column("event_time").max())
        else:
            self._add_actions(
                tp.partition,
                first_offset,
                decoded.request_id,
                decoded.click,
                decoded.impression_time,
                decoded.event_time,
            )
            latest = float(decoded.event_time.max())
        watermarks.derive(state, is_log, latest, self.config.allowed_lateness_s)
        self.report.messages_in += len(decoded.message_index)

    def _ingest(self, tp: TopicPartition, record, now: float) -> None:
        state = self._state(tp.partition)
        is_log = tp.topic == self.topics.feature_log
        self._track(state, is_log, record, now)
        kind = messages.FEATURE_LOG if is_log else messages.ACTIONS
        try:
            batch = messages.decode(record.value, kind)
            # A heartbeat carries no features; a zero-row batch with some must have the right ones.
            if is_log and (batch.num_rows or batch.feature_names):
                self._check_features(batch)
        except messages.MessageError as error:
            self._dead_letter(tp, record, error)
            return
        self.report.messages_in += 1
        if batch.num_rows:
            self._ended.discard(tp.partition)
            if is_log:
                self._add_impressions(state, tp.partition, record.offset, batch)
            else:
                self._add_actions(
                    tp.partition,
                    record.offset,
                    batch.column("request_id"),
                    batch.column("click"),
                    batch.column("impression_time"),
                    batch.column("event_time"),
                )
        if is_log:
            state.impression_clock = watermarks.advance(state.impression_clock, batch)
            state.impressions_ended = batch.end_of_stream
            state.impression_watermarked = True
        else:
            state.action_clock = watermarks.advance(state.action_clock, batch)
            state.actions_ended = batch.end_of_stream
            state.action_watermarked = True

    def _check_features(self, batch: messages.Batch) -> None:
        """Every feature-log batch must have the configured features, typed as the first one."""
        schema = batch.rows.schema
        expected = self.config.features
        if expected is not None and sorted(batch.feature_names) != sorted(expected):
            raise messages.MessageError(
                "schema-mismatch",
                f"features {batch.feature_names}; this joiner accepts {list(expected)}",
            )
        if self.feature_schema is None:
            self.feature_schema = schema
        elif not schema.equals(self.feature_schema):
            raise messages.MessageError(
                "schema-mismatch",
                f"columns {schema.names} ({', '.join(map(str, schema.types))}) differ from "
                f"the stream's {self.feature_schema.names}",
            )

    def _dead_letter(self, tp: TopicPartition, record, error: messages.MessageError) -> None:
        self._dead_letters.send(
            tp.topic, tp.partition, record.offset, record.value, error.reason, error.detail
        )

    # Windows and memory.

    def _close_windows(self, consumer: KafkaConsumer, now: float) -> None:
        config = self.config
        for partition, state in self.partitions.items():
            watermarks.advance_idle(
                consumer,
                self.topics,
                partition,
                state,
                now,
                config.idle_after_s,
                config.allowed_lateness_s,
            )
            self._close_due(state)
        self._expire_waiting()
        for partition, state in self.partitions.items():
            if state.impressions_ended and state.actions_ended:
                self._end_partition(partition, state)

    def _end_partition(self, partition: int, state: PartitionState) -> None:
        """Both topics ended: every window is closed; tell the examples topic, start afresh."""
        self._release(state, lambda segment: True)
        self._emit(self.clock())
        self._output.end(partition, self.clock())
        self._ended.add(partition)
        if partition not in self.report.ended_partitions:
            self.report.ended_partitions.append(partition)
        state.impression_clock = state.action_clock = state.closed_up_to = -math.inf
        state.impressions_ended = state.actions_ended = False

    # Output and commits.

    def _emit(self, now: float) -> None:
        """Turn the rows labelled since the last call into examples, and send full batches."""
        for segment in self._to_emit.values():
            rows = np.array(segment.to_emit, dtype=np.int64)
            segment.to_emit = []
            labels = segment.labels[rows]
            examples = messages.with_columns(
                segment.rows.take(pa.array(rows)), {"label": pa.array(labels, pa.int8())}
            )
            self._output.add_to(segment.partition, examples, now)
            positives = int(labels.sum())
            self.report.positives += positives
            self.report.negatives += len(rows) - positives
            self.report.examples += len(rows)
        self._to_emit.clear()
        for partition, state in self.partitions.items():
            self._output.flush_partition(partition, state.watermark, now, force=False)

    def _commit(self, consumer: KafkaConsumer) -> None:
        """Flush every example so far, then commit each input partition up to its oldest
        message with rows not yet joined (at-least-once)."""
        now = self.clock()
        self._emit(now)
        for partition, state in self.partitions.items():
            self._output.flush_partition(partition, state.watermark, now, force=True)
        try:
            self._sender.flush(self.config.flush_timeout_s)
        except KafkaTimeoutError as error:
            self.report.commit_failures += 1
            log.warning("examples not flushed in time, offsets not committed: %s", error)
            return
        offsets = {}
        for tp in consumer.assignment():
            position = self._committable(tp)
            if position is not None:
                offsets[tp] = OffsetAndMetadata(position, "", -1)
        if not offsets:
            return
        try:
            consumer.commit(offsets, timeout_ms=int(self.config.flush_timeout_s * 1000))
            self.report.commits += 1
        except KafkaError as error:
            self.report.commit_failures += 1
            log.warning("offset commit failed (will retry): %s", error)

    def _apply_rebalances(self, consumer: KafkaConsumer) -> None:
        """Drop the state of partitions taken away: their new owner re-reads them from the
        last commit (their uncommitted examples may so come out twice: at-least-once).
        Assigned partitions whose end markers were committed take them as read."""
        for event, partitions in self._rebalance.take():
            if event == "revoked" and partitions:
                self.report.rebalances += 1
            if event == "assigned":
                # Idle time counts from having partitions to read, not from joining the group.
                self._last_input = self.clock()
            for partition in {tp.partition for tp in partitions}:
                self._drop_partition(partition)
                self._ended.discard(partition)
            if event == "assigned":
                self._recall_ended(consumer, partitions)

    def _recall_ended(self, consumer: KafkaConsumer, partitions: set[TopicPartition]) -> None:
        """Take the end markers of the feature log and of the actions that were read and
        committed before this run (`online_training.end_of_stream`) as read: they are never
        read again. A partition whose two markers were committed has ended (its examples' end
        marker went out before that commit: a commit follows the flush of every example)."""
        if not self.config.stop_at_end:
            return
        kinds = {
            self.topics.feature_log: messages.FEATURE_LOG,
            self.topics.actions: messages.ACTIONS,
        }
        ended = ended_at_commit(self.kafka, consumer, partitions, kinds)
        for partition in sorted({tp.partition for tp in ended}):
            impressions = TopicPartition(self.topics.feature_log, partition) in ended
            actions = TopicPartition(self.topics.actions, partition) in ended
            if impressions and actions:
                log.info(
                    "partition %d ended before this run (its end markers are committed)", partition
                )
                self._ended.add(partition)
                if partition not in self.report.ended_partitions:
                    self.report.ended_partitions.append(partition)
                continue
            state = self._state(partition)
            if impressions:
                state.impression_clock, state.impressions_ended = math.inf, True
            else:
                state.action_clock, state.actions_ended = math.inf, True


def check_partitions(consumer: KafkaConsumer, topics: Topics) -> int:
    """The partition count the feature log, actions and examples topics share; a missing
    topic, or topics with different counts, is a KafkaConfigError that says how to fix it.

    Impressions and clicks are keyed by request id, and Kafka's default partitioner puts a key
    in partition hash(key) mod count: only with equal counts do a click and its impression meet
    in the same partition number, on the same joiner."""
    names = (topics.feature_log, topics.actions, topics.examples)
    counts = {topic: len(consumer.partitions_for_topic(topic) or ()) for topic in names}
    missing = [topic for topic, count in counts.items() if count == 0]
    if missing:
        present = max(counts.values()) or 4
        raise KafkaConfigError(
            f"topic(s) {', '.join(map(repr, missing))} do not exist at the broker; create them "
            f"with the partition count of the others, e.g. `kafka-topics.sh --create --topic "
            f"{missing[0]} --partitions {present}`, or let embtab create them "
            "(`embtab stream join` and `run` create missing topics with --partitions)"
        )
    if len(set(counts.values())) != 1:
        most = max(counts.values())
        raise KafkaConfigError(
            f"the feature log, actions and examples topics must have the same number of "
            f"partitions (a request id's impression and click go to partition hash(id) mod the "
            f"count), got {counts}; raise the smaller ones to {most} (`kafka-topics.sh --alter "
            f"--topic NAME --partitions {most}`) before producing to them, or recreate them"
        )
    return counts[topics.examples]


def _produced_at(record) -> float:
    """When a JSON event was produced: the Kafka record's timestamp (CreateTime), else now."""
    if record.timestamp is not None and record.timestamp > 0:
        return record.timestamp / 1000.0
    return time.time()
