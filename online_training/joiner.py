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
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.errors import IllegalStateError, KafkaError, KafkaTimeoutError

from feature_store.artifact import Preprocessor
from online_training import events, messages
from online_training.batching import PartitionBatcher, Sender
from online_training.end_of_stream import ended_at_commit
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

OPEN = -1
# How long the idle rule waits for the broker to confirm a partition's end offset.
END_OFFSETS_TIMEOUT_MS = 2000


class JoinError(ValueError):
    """A join setting that cannot work; the message says what is accepted."""


@dataclass(frozen=True)
class JoinerConfig:
    """How long an impression waits for its click, how much state is kept, how output flows."""

    window_s: float = 60.0
    # None: the topics' default group (Topics.group_id), unique to their prefix.
    group_id: str | None = None
    batch_rows: int = 2048
    linger_s: float = 0.1
    commit_interval_s: float = 1.0
    max_pending_rows: int = 1_000_000
    max_pending_actions: int = 1_000_000
    poll_timeout_ms: int = 100
    # Few messages per poll keep each loop turn short: a consumer that does not poll again
    # within max_poll_interval_ms (3 s with the quick-join defaults) is put out of its group.
    # An Arrow message holds thousands of rows, a JSON message one: after a poll of JSON only,
    # the next one takes up to max_poll_events messages (a poll of JSON is decoded at once, at
    # about 4x the per-message speed: 8000 take about as long as 2000 did one by one).
    max_poll_records: int = 8
    max_poll_events: int = 8000
    # The message format of each input topic: json, arrow, or auto (decided per message).
    feature_log_format: str = "auto"
    actions_format: str = "auto"
    # Derived watermarks (topic-partitions whose producer sends none): the largest event time
    # seen minus this, and after this many silent wall seconds, moved on by the wall clock.
    allowed_lateness_s: float = 5.0
    idle_after_s: float = 10.0
    # A JSON event more than this many seconds ahead of the wall clock is dead-lettered
    # (`future-time`): one bad clock never moves a watermark past every open window.
    max_future_s: float = 300.0
    stop_at_end: bool = True
    idle_timeout_s: float | None = None
    compression: str | None = messages.DEFAULT_COMPRESSION
    flush_timeout_s: float = 30.0
    # The feature columns a feature-log batch must have (e.g. the data set's features). Unset,
    # the first batch read decides, and batches with other features are dead-lettered.
    features: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not (self.window_s >= 0 and math.isfinite(self.window_s)):
            raise JoinError(f"window must be >= 0 event-seconds, got {self.window_s}")
        if self.max_pending_rows < 1 or self.max_pending_actions < 1:
            raise JoinError("max_pending_rows and max_pending_actions must be >= 1")
        if self.batch_rows < 1:
            raise JoinError(f"batch_rows must be >= 1, got {self.batch_rows}")
        if self.compression not in messages.COMPRESSIONS:
            raise JoinError(f"unknown compression {self.compression!r}; accepted: None, lz4, zstd")
        for name in (self.feature_log_format, self.actions_format):
            if name not in events.FORMATS:
                raise JoinError(
                    f"unknown message format {name!r}; accepted: {', '.join(events.FORMATS)}"
                )
        for name in ("allowed_lateness_s", "idle_after_s", "max_future_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise JoinError(f"{name} must be >= 0 seconds, got {value}")
        if self.max_poll_events < 1:
            raise JoinError(f"max_poll_events must be >= 1, got {self.max_poll_events}")


@dataclass
class JoinerReport:
    """What one run of the joiner read, joined, dropped and wrote."""

    impressions: int = 0
    actions: int = 0
    examples: int = 0
    positives: int = 0
    negatives: int = 0
    late_clicks: int = 0
    orphan_clicks: int = 0
    duplicate_impressions: int = 0
    duplicate_actions: int = 0
    stale_impressions: int = 0
    evicted_impressions: int = 0
    evicted_actions: int = 0
    redelivered_messages: int = 0
    messages_in: int = 0
    messages_out: int = 0
    dlq: dict[str, int] = field(default_factory=dict)
    commits: int = 0
    commit_failures: int = 0
    rebalances: int = 0
    ended_partitions: list[int] = field(default_factory=list)
    seconds: float = 0.0
    # From the first message read to the end: the join's own time, without the group join.
    active_seconds: float = 0.0

    @property
    def dlq_messages(self) -> int:
        return sum(self.dlq.values())

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.active_seconds if self.active_seconds else 0.0

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "dlq_messages": self.dlq_messages,
            "examples_per_s": round(self.examples_per_s, 1),
        }


@dataclass
class _Segment:
    """The impressions of one feature-log message, kept until their window has passed."""

    partition: int
    offset: int
    rows: pa.RecordBatch
    request_ids: np.ndarray
    event_times: np.ndarray
    labels: np.ndarray
    open_rows: int
    # The lowest actions offset whose click joined a row here while other rows are still open:
    # re-reading this segment after a restart must re-read that click too.
    held_action_offset: float = math.inf
    to_emit: list[int] = field(default_factory=list)

    @property
    def last_event_time(self) -> float:
        return float(self.event_times.max()) if len(self.event_times) else -math.inf


@dataclass
class _WaitingAction:
    """A click read before its impression (`impression_time` is its own event time when the
    message did not say: an upper bound, for expiring it)."""

    click: int
    impression_time: float
    partition: int
    offset: int
    event_time: float = math.nan


@dataclass
class _PartitionState:
    """What the joiner knows about input partition p (of both topics)."""

    impression_clock: float = -math.inf
    action_clock: float = -math.inf
    impressions_ended: bool = False
    actions_ended: bool = False
    next_impression_offset: int | None = None
    next_action_offset: int | None = None
    segments: deque[_Segment] = field(default_factory=deque)
    closed_up_to: float = -math.inf
    # Derived watermarks: the largest JSON event time of each topic, when a message of each
    # last came (the joiner's clock), and whether the producer sends watermarks itself.
    impression_latest: float = -math.inf
    action_latest: float = -math.inf
    impression_input_at: float = 0.0
    action_input_at: float = 0.0
    impression_watermarked: bool = False
    action_watermarked: bool = False

    @property
    def watermark(self) -> float:
        return min(self.impression_clock, self.action_clock)


class Joiner:
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
        self.partitions: dict[int, _PartitionState] = {}
        self.index: dict[int, tuple[_Segment, int]] = {}
        self.waiting: dict[int, _WaitingAction] = {}
        self.retained_rows = 0
        self.feature_schema: pa.Schema | None = None
        self._to_emit: dict[int, _Segment] = {}
        self._ended: set[int] = set()
        self._rebalance = RebalanceEvents()
        self._dlq = Counter()
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
            self._sender = sender
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
            self.report.dlq = dict(self._dlq)
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

    def _state(self, partition: int) -> _PartitionState:
        state = self.partitions.get(partition)
        if state is None:
            now = self.clock()
            state = self.partitions[partition] = _PartitionState(
                impression_input_at=now, action_input_at=now
            )
        return state

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

    def _track(self, state: _PartitionState, is_log: bool, record, now: float) -> None:
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
            state.impression_latest = max(state.impression_latest, latest)
            lateness = self.config.allowed_lateness_s
            state.impression_clock = max(state.impression_clock, latest - lateness)
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
            state.action_latest = max(state.action_latest, latest)
            state.action_clock = max(state.action_clock, latest - self.config.allowed_lateness_s)
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
            state.impression_clock = _advance(state.impression_clock, batch)
            state.impressions_ended = batch.end_of_stream
            state.impression_watermarked = True
        else:
            state.action_clock = _advance(state.action_clock, batch)
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
        self._dlq[error.reason] += 1
        headers = [
            ("reason", error.reason.encode()),
            ("error", str(error).encode()[:2000]),
            ("source_topic", tp.topic.encode()),
            ("source_partition", str(tp.partition).encode()),
            ("source_offset", str(record.offset).encode()),
        ]
        self._sender.send_raw(self.topics.dlq(tp.topic), record.value or b"", headers=headers)
        log.warning("dead-lettered %s[%d]@%d: %s", tp.topic, tp.partition, record.offset, error)

    def _add_impressions(
        self, state: _PartitionState, partition: int, offset: int, batch: messages.Batch
    ) -> None:
        ids = batch.column("request_id")
        times = batch.column("event_time")
        self.report.impressions += len(ids)
        keep = times + self.config.window_s >= state.watermark
        self.report.stale_impressions += int((~keep).sum())
        _, first = np.unique(ids, return_index=True)
        unique = np.zeros(len(ids), dtype=bool)
        unique[first] = True
        unseen = np.fromiter((rid not in self.index for rid in ids.tolist()), bool, len(ids))
        fresh = unique & unseen
        self.report.duplicate_impressions += int((keep & ~fresh).sum())
        keep &= fresh
        if not keep.any():
            return
        rows = batch.rows if keep.all() else batch.rows.filter(pa.array(keep))
        kept_ids = ids[keep]
        segment = _Segment(
            partition=partition,
            offset=offset,
            rows=rows,
            request_ids=kept_ids,
            event_times=times[keep],
            labels=np.full(len(kept_ids), OPEN, dtype=np.int8),
            open_rows=len(kept_ids),
        )
        state.segments.append(segment)
        self.retained_rows += len(kept_ids)
        kept = kept_ids.tolist()
        self.index.update(zip(kept, ((segment, row) for row in range(len(kept))), strict=True))
        if self.waiting:
            window = self.config.window_s
            for rid in self.waiting.keys() & set(kept):
                action = self.waiting.pop(rid)
                row = self.index[rid][1]
                if action.event_time - segment.event_times[row] > window:
                    self.report.late_clicks += 1
                    continue
                self._label(segment, row, action.click, action.offset)

    def _add_actions(
        self,
        partition: int,
        offset: int,
        ids: np.ndarray,
        clicks: np.ndarray,
        impression_times: np.ndarray,
        event_times: np.ndarray,
    ) -> None:
        """Join actions to their impressions; `impression_times` may be NaN (not sent): then
        the impression's own event time decides whether the click came within the window."""
        window = self.config.window_s
        watermark = self._state(partition).watermark
        late = event_times - impression_times > window
        self.report.actions += len(ids)
        self.report.late_clicks += int(late.sum())
        on_time = ~late
        for rid, click, impression_time, event_time in zip(
            ids[on_time].tolist(),
            clicks[on_time].tolist(),
            impression_times[on_time].tolist(),
            event_times[on_time].tolist(),
            strict=True,
        ):
            found = self.index.get(rid)
            if found is not None:
                segment, row = found
                label = segment.labels[row]
                if event_time - segment.event_times[row] > window or (label == 0 and click):
                    # After its window, or after the window closed it as a negative.
                    self.report.late_clicks += 1
                elif label == OPEN:
                    self._label(segment, row, click, offset)
                else:
                    self.report.duplicate_actions += 1
            elif rid in self.waiting:
                self.report.duplicate_actions += 1
            else:
                if math.isnan(impression_time):
                    impression_time = event_time
                if impression_time + window < watermark:
                    # Its impression's window has closed already (a negative went out).
                    self.report.late_clicks += 1
                    continue
                self.waiting[rid] = _WaitingAction(
                    click, impression_time, partition, offset, event_time
                )
        while len(self.waiting) > self.config.max_pending_actions:
            del self.waiting[next(iter(self.waiting))]
            self.report.evicted_actions += 1

    def _label(self, segment: _Segment, row: int, label: int, action_offset: int) -> None:
        segment.labels[row] = label
        segment.open_rows -= 1
        segment.to_emit.append(row)
        self._to_emit[id(segment)] = segment
        if segment.open_rows:
            segment.held_action_offset = min(segment.held_action_offset, action_offset)
        else:
            segment.held_action_offset = math.inf

    # Windows and memory.

    def _advance_idle(
        self, consumer: KafkaConsumer, partition: int, state: _PartitionState, now: float
    ) -> None:
        """Move on the derived watermark of a topic silent for idle_after_s wall seconds: by
        the wall time since its last event, and at least to the other topic's watermark (a
        silent topic holds nothing that the other's windows wait for). Silent means read up
        to its end: a partition this joiner lags behind on is not idle, only unread."""
        idle, lateness = self.config.idle_after_s, self.config.allowed_lateness_s
        if (
            not state.impression_watermarked
            and now - state.impression_input_at >= idle
            and _read_to_end(
                consumer, self.topics.feature_log, partition, state.next_impression_offset
            )
        ):
            silence = now - state.impression_input_at
            moved = max(state.impression_latest + silence - lateness, state.action_clock)
            state.impression_clock = max(state.impression_clock, moved)
        if (
            not state.action_watermarked
            and now - state.action_input_at >= idle
            and _read_to_end(consumer, self.topics.actions, partition, state.next_action_offset)
        ):
            silence = now - state.action_input_at
            moved = max(state.action_latest + silence - lateness, state.impression_clock)
            state.action_clock = max(state.action_clock, moved)

    def _close_windows(self, consumer: KafkaConsumer, now: float) -> None:
        window = self.config.window_s
        for partition, state in self.partitions.items():
            self._advance_idle(consumer, partition, state, now)
            watermark = state.watermark
            if watermark > state.closed_up_to:
                state.closed_up_to = watermark
                for segment in state.segments:
                    if segment.open_rows:
                        due = (segment.labels == OPEN) & (segment.event_times + window < watermark)
                        self._close(segment, np.flatnonzero(due))
                self._release(state, lambda s, w=watermark: s.last_event_time + window < w)
        marks = {partition: state.watermark for partition, state in self.partitions.items()}
        expired = [
            rid
            for rid, action in self.waiting.items()
            if action.impression_time + window < marks.get(action.partition, -math.inf)
        ]
        for rid in expired:
            del self.waiting[rid]
        self.report.orphan_clicks += len(expired)
        for partition, state in self.partitions.items():
            if state.impressions_ended and state.actions_ended:
                self._end_partition(partition, state)

    def _close(self, segment: _Segment, rows: np.ndarray) -> None:
        """Close these open rows as negatives."""
        if not len(rows):
            return
        segment.labels[rows] = 0
        segment.open_rows -= len(rows)
        segment.to_emit.extend(rows.tolist())
        self._to_emit[id(segment)] = segment
        if not segment.open_rows:
            segment.held_action_offset = math.inf

    def _release(self, state: _PartitionState, done: Callable[[_Segment], bool]) -> None:
        """Forget the closed segments that `done` says are past any re-delivery in the window."""
        kept: deque[_Segment] = deque()
        for segment in state.segments:
            if segment.open_rows or not done(segment):
                kept.append(segment)
            else:
                self._forget(segment)
        state.segments = kept

    def _forget(self, segment: _Segment) -> None:
        for rid in segment.request_ids.tolist():
            self.index.pop(rid, None)
        self.retained_rows -= len(segment.request_ids)

    def _end_partition(self, partition: int, state: _PartitionState) -> None:
        """Both topics ended: every window is closed; tell the examples topic, start afresh."""
        self._release(state, lambda segment: True)
        self._emit(self.clock())
        self._output.end(partition, self.clock())
        self._ended.add(partition)
        if partition not in self.report.ended_partitions:
            self.report.ended_partitions.append(partition)
        state.impression_clock = state.action_clock = state.closed_up_to = -math.inf
        state.impressions_ended = state.actions_ended = False

    def _bound_memory(self) -> None:
        """Past max_pending_rows, forget the oldest segments: closed ones first (that only
        narrows de-duplication), then open ones, closing their rows early as negatives."""
        cap = self.config.max_pending_rows
        if self.retained_rows <= cap:
            return
        closed = sorted(
            (segment.event_times.min(), id(segment), state, segment)
            for state in self.partitions.values()
            for segment in state.segments
            if not segment.open_rows
        )
        for _, _, state, segment in closed:
            if self.retained_rows <= cap:
                return
            state.segments.remove(segment)
            self._forget(segment)
        while self.retained_rows > cap:
            heads = [state for state in self.partitions.values() if state.segments]
            state = min(heads, key=lambda s: s.segments[0].event_times.min())
            oldest = state.segments.popleft()
            self.report.evicted_impressions += oldest.open_rows
            self._close(oldest, np.flatnonzero(oldest.labels == OPEN))
            self._forget(oldest)

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

    def _committable(self, tp: TopicPartition) -> int | None:
        state = self.partitions.get(tp.partition)
        if state is None:
            return None
        if tp.topic == self.topics.feature_log:
            position = state.next_impression_offset
            held = [s.offset for s in state.segments if s.open_rows]
        else:
            position = state.next_action_offset
            held = [s.held_action_offset for s in state.segments if s.open_rows]
            held += [a.offset for a in self.waiting.values() if a.partition == tp.partition]
        if position is None:
            return None
        return int(min([position, *held]))

    def _apply_rebalances(self, consumer: KafkaConsumer) -> None:
        """Drop the state of partitions taken away: their new owner re-reads them from the
        last commit (their uncommitted examples may so come out twice: at-least-once).
        Assigned partitions whose end markers were committed take them as read."""
        while True:
            try:
                event, partitions = self._rebalance.events.get_nowait()
            except queue.Empty:
                return
            if event == "revoked" and partitions:
                self.report.rebalances += 1
            if event == "assigned":
                # Idle time counts from having partitions to read, not from joining the group.
                self._last_input = self.clock()
            for partition in {tp.partition for tp in partitions}:
                state = self.partitions.pop(partition, None)
                for segment in state.segments if state is not None else ():
                    self._forget(segment)
                    self._to_emit.pop(id(segment), None)
                self.waiting = {
                    rid: a for rid, a in self.waiting.items() if a.partition != partition
                }
                self._ended.discard(partition)
            if event == "assigned":
                self._recall_ended(consumer, partitions)
            log.info("partitions %s: %s", event, sorted(map(tuple, partitions)))

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
        try:
            committed = {tp: consumer.committed(tp) for tp in partitions if tp.topic in kinds}
        except KafkaError as error:
            log.warning("committed offsets not read, ended partitions not recalled: %s", error)
            return
        ended = ended_at_commit(self.kafka, committed, kinds)
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


def _read_to_end(consumer: KafkaConsumer, topic: str, partition: int, next_offset) -> bool:
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


def _produced_at(record) -> float:
    """When a JSON event was produced: the Kafka record's timestamp (CreateTime), else now."""
    if record.timestamp is not None and record.timestamp > 0:
        return record.timestamp / 1000.0
    return time.time()


def _advance(clock: float, batch: messages.Batch) -> float:
    """A partition's clock after a batch: its watermark, or a fresh start after an ended one."""
    if batch.end_of_stream:
        return math.inf
    return batch.watermark if clock == math.inf else max(clock, batch.watermark)
