"""Replay a data set in time order as live traffic: impressions to the feature log, clicks to
the actions topic, and the online features to Redis as they change.

Every event of the split is an impression (request) whose features are the data set's row, as
served at request time; every positive event also yields a click, `label_delay_s` event-seconds
later. Event time is paced to wall time by `speedup` (0: as fast as possible), so the label
delay in wall seconds is `label_delay_s / speedup`. Rows go out in batches per partition (the
partition comes from the user id, the same on both topics); each batch's watermark says that
every row of its partition with an earlier event time has been sent, and the last message of
each partition ends the stream, so a joiner knows when a window can no longer receive a click.

With `format="json"` it sends what a third-party producer sends instead: one JSON object per
event, the raw values as the source files hold them (the artifact's `decode` of the prepared
copy), keyed by request id and placed by Kafka's default partitioner, with no watermarks and no
end markers (the joiner derives watermarks; docs/streaming.md has the contract). The events are
encoded column-wise (`JsonEvents`), as a high-volume producer would, and go out through
kafka-python, or through any `JsonSink` given to `run` (bench/streaming.py gives librdkafka's,
a stand-in for a Java or Go ad server's client).
"""

from __future__ import annotations

import collections
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from kafka import KafkaProducer

from feature_store.offline import Dataset
from feature_store.online import OnlineFeatureStore
from online_training import events, messages
from online_training.batching import PartitionBatcher, Sender
from online_training.kafka import (
    KafkaConfigError,
    KafkaSettings,
    Topics,
    make_producer,
    message_limits,
    user_partitions,
)

REQUEST_SEQUENCE_BITS = 32
PRODUCER_FORMATS = ("arrow", "json")


class ReplayError(ValueError):
    """A data set or replay setting the producer cannot replay; the message says why."""


class JsonSink(Protocol):
    """Where a JSON replay's messages go (`batching.Sender` over kafka-python by default): each
    value to `topic` with its key, placed by the client's default partitioner; `flush` waits
    until the broker has every one (an error if it refused one). It counts what it sent."""

    messages: int
    heartbeats: int
    bytes: int

    def send_events(self, topic: str, keys: list[bytes], values: list[bytes]) -> None: ...

    def flush(self, timeout_s: float) -> None: ...


@dataclass(frozen=True)
class ProducerConfig:
    """How to replay: which rows, how fast, how late the clicks come, how rows are batched."""

    split: str = "test"
    speedup: float = 0.0
    label_delay_s: float = 0.0
    limit: int | None = None
    batch_rows: int = 2048
    linger_s: float = 0.05
    read_rows: int = 8192
    run_id: int | None = None
    compression: str | None = messages.DEFAULT_COMPRESSION
    flush_timeout_s: float = 120.0
    # arrow: embtab's batches with watermarks; json: one raw-valued JSON object per event.
    format: str = "arrow"

    def __post_init__(self) -> None:
        if self.format not in PRODUCER_FORMATS:
            raise ReplayError(
                f"unknown format {self.format!r}; accepted: {', '.join(PRODUCER_FORMATS)}"
            )
        if self.speedup < 0 or not math.isfinite(self.speedup):
            raise ReplayError(f"speedup must be >= 0 (0: as fast as possible), got {self.speedup}")
        if self.label_delay_s < 0 or not math.isfinite(self.label_delay_s):
            raise ReplayError(f"label delay must be >= 0 event-seconds, got {self.label_delay_s}")
        if self.limit is not None and self.limit < 1:
            raise ReplayError(f"limit must be >= 1 events, got {self.limit}")
        if self.batch_rows < 1 or self.read_rows < 1:
            raise ReplayError("batch_rows and read_rows must be >= 1")
        if self.run_id is not None and not 0 <= self.run_id < 2**31:
            raise ReplayError(f"run_id must be in [0, 2**31), got {self.run_id}")
        if self.compression not in messages.COMPRESSIONS:
            raise ReplayError(
                f"unknown compression {self.compression!r}; accepted: None, lz4, zstd"
            )


@dataclass
class ProducerReport:
    """What one replay sent."""

    dataset: str
    split: str
    run_id: int
    impressions: int = 0
    actions: int = 0
    messages: int = 0
    heartbeats: int = 0
    bytes: int = 0
    online_user_writes: int = 0
    online_item_writes: int = 0
    first_event_time: float | None = None
    last_event_time: float | None = None
    seconds: float = 0.0

    @property
    def impressions_per_s(self) -> float:
        return self.impressions / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "impressions_per_s": round(self.impressions_per_s, 1)}


class _EventSource:
    """The split's rows in time order, handed out up to an event-time clock."""

    def __init__(self, batches: Iterator[pa.RecordBatch], time_column: str, limit: int | None):
        self.batches = batches
        self.time_column = time_column
        self.remaining = math.inf if limit is None else limit
        self.chunk: pa.RecordBatch | None = None
        self.times = np.empty(0)
        self.position = 0
        self.emitted = 0
        self._load()

    def _load(self) -> None:
        while self.position >= len(self.times) and self.remaining > 0:
            batch = next(self.batches, None)
            if batch is None:
                self.remaining = 0
                break
            batch = batch.slice(0, int(min(batch.num_rows, self.remaining)))
            self.remaining -= batch.num_rows
            self.chunk = batch
            self.times = batch.column(self.time_column).to_numpy().astype(np.float64)
            self.position = 0

    @property
    def exhausted(self) -> bool:
        return self.position >= len(self.times)

    def next_time(self) -> float | None:
        return None if self.exhausted else float(self.times[self.position])

    def time_after(self, rows: int) -> float | None:
        """The event time `rows` rows ahead (at most the end of the loaded chunk)."""
        if self.exhausted:
            return None
        return float(self.times[min(self.position + rows, len(self.times)) - 1])

    def take_until(self, clock: float) -> list[tuple[pa.RecordBatch, np.ndarray, int]]:
        """Rows with event time <= clock, as (rows, times, index of the first row) pieces."""
        pieces = []
        while not self.exhausted and self.times[self.position] <= clock:
            end = int(np.searchsorted(self.times, clock, side="right"))
            rows = self.chunk.slice(self.position, end - self.position)
            pieces.append((rows, self.times[self.position : end], self.emitted))
            self.emitted += end - self.position
            self.position = end
            self._load()
        return pieces


class _ActionQueue:
    """Clicks waiting for their event time (sorted: every click has the same delay)."""

    def __init__(self) -> None:
        self.chunks: collections.deque[dict[str, np.ndarray]] = collections.deque()

    def push(self, columns: dict[str, np.ndarray]) -> None:
        if len(columns["event_time"]):
            self.chunks.append(columns)

    def next_due(self) -> float | None:
        return float(self.chunks[0]["event_time"][0]) if self.chunks else None

    def pop_until(self, clock: float) -> dict[str, np.ndarray] | None:
        taken = []
        while self.chunks and self.chunks[0]["event_time"][0] <= clock:
            chunk = self.chunks[0]
            end = int(np.searchsorted(chunk["event_time"], clock, side="right"))
            taken.append({name: values[:end] for name, values in chunk.items()})
            if end == len(chunk["event_time"]):
                self.chunks.popleft()
            else:
                self.chunks[0] = {name: values[end:] for name, values in chunk.items()}
        if not taken:
            return None
        return {name: np.concatenate([t[name] for t in taken]) for name in taken[0]}


class ReplayProducer:
    """Replays one split of a prepared data set to the feature-log and actions topics."""

    def __init__(
        self,
        dataset: Dataset,
        kafka: KafkaSettings,
        topics: Topics,
        config: ProducerConfig,
        online: OnlineFeatureStore | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        schema = dataset.schema
        if not {"user", "item"} <= schema.id_columns.keys():
            raise ReplayError(
                f"data set {dataset.name!r} names no user and item id columns, so its events "
                "cannot be keyed or clicked; replayable: movielens-1m, movielens-100k, obd"
            )
        self.dataset = dataset
        self.kafka = kafka
        self.topics = topics
        self.config = config
        self.online = online
        self.clock = clock
        self.sleep = sleep
        self.user_column = schema.id_columns["user"]
        self.item_column = schema.id_columns["item"]
        self.features = [spec.name for spec in schema.features]
        self.events: JsonEvents | None = None
        if config.format == "json":
            preprocessor = dataset.preprocessor()
            if preprocessor is None:
                raise ReplayError(
                    f"data set {dataset.name!r} was prepared without a preprocessing artifact, "
                    "so its raw values are unknown; prepare it again, or replay --format arrow"
                )
            self.events = JsonEvents(preprocessor, self.features)
        run_id = config.run_id if config.run_id is not None else random.randrange(1, 2**31)
        self.report = ProducerReport(dataset=dataset.name, split=config.split, run_id=run_id)

    def run(self, sink: JsonSink | None = None) -> ProducerReport:
        """Replay the split; a JSON replay goes to `sink` when one is given (the caller's
        client, which owns its partitioning), else to a kafka-python producer."""
        if sink is not None and self.events is None:
            raise ReplayError("a sink takes per-event JSON only; replay with format='json'")
        started = self.clock()
        if sink is not None:
            self._replay(sink, 0)
            sink.flush(self.config.flush_timeout_s)
        else:
            limits = message_limits(self.kafka, [self.topics.feature_log, self.topics.actions])
            producer = make_producer(self.kafka, min(limits.values()))
            try:
                sender = Sender(producer, self.config.compression, limits)
                self._replay(sender, self._partition_count(producer))
                sender.flush(self.config.flush_timeout_s)
            finally:
                producer.close(timeout=self.config.flush_timeout_s)
            sink = sender
        report = self.report
        report.messages, report.heartbeats, report.bytes = (
            sink.messages,
            sink.heartbeats,
            sink.bytes,
        )
        report.seconds = self.clock() - started
        return report

    def _replay(self, sender: Sender | JsonSink, partitions: int) -> None:
        """Send every row up to the event-time clock, then the clicks due; `partitions` places
        Arrow batches (JSON is placed by its sink's client)."""
        config, schema = self.config, self.dataset.schema
        feature_log, actions = (
            PartitionBatcher(
                topic,
                kind,
                partitions,
                sender,
                batch_rows=config.batch_rows,
                linger_s=config.linger_s,
                dataset=self.dataset.name,
            )
            if self.events is None
            else _JsonWriter(topic, sender)
            for topic, kind in (
                (self.topics.feature_log, messages.FEATURE_LOG),
                (self.topics.actions, messages.ACTIONS),
            )
        )
        columns = [*self.features, schema.time_column, schema.label]
        source = _EventSource(
            self.dataset.iter_batches(config.split, config.read_rows, columns),
            schema.time_column,
            config.limit,
        )
        queue = _ActionQueue()
        first_time = source.next_time()
        if first_time is None:
            raise ReplayError(f"split {config.split!r} of {self.dataset.name!r} has no rows")
        wall_start = self.clock()
        while True:
            now = self.clock()
            if config.speedup:
                clock = first_time + (now - wall_start) * config.speedup
            else:
                clock = source.time_after(config.batch_rows)
                clock = math.inf if clock is None else clock
            for rows, times, first_index in source.take_until(clock):
                self._impressions(rows, times, first_index, partitions, feature_log, queue, now)
            due = queue.pop_until(clock)
            if due is not None:
                self._actions(due, partitions, actions, now)
            finished = source.exhausted and queue.next_due() is None
            if self.events is None:  # JSON carries no watermarks
                feature_log.flush(clock, now, force=finished)
                actions.flush(clock, now, force=finished)
            if finished:
                break
            if config.speedup:
                upcoming = min(t for t in (source.next_time(), queue.next_due()) if t is not None)
                wait = wall_start + (upcoming - first_time) / config.speedup - self.clock()
                self.sleep(min(max(wait, 0.0), config.linger_s))
        for partition in range(partitions if self.events is None else 0):
            feature_log.end(partition, self.clock())
            actions.end(partition, self.clock())

    def _partition_count(self, producer: KafkaProducer) -> int:
        counts = {
            topic: len(producer.partitions_for(topic) or ())
            for topic in (self.topics.feature_log, self.topics.actions)
        }
        if len(set(counts.values())) != 1 or 0 in counts.values():
            raise KafkaConfigError(
                f"the feature log and actions topics must have the same partitions, got {counts}"
            )
        return counts[self.topics.feature_log]

    def _impressions(
        self,
        rows: pa.RecordBatch,
        times: np.ndarray,
        first_index: int,
        partitions: int,
        writer: PartitionBatcher | _JsonWriter,
        queue: _ActionQueue,
        now: float,
    ) -> None:
        count = rows.num_rows
        request_ids = (np.int64(self.report.run_id) << REQUEST_SEQUENCE_BITS) + np.arange(
            first_index, first_index + count, dtype=np.int64
        )
        users = rows.column(self.user_column).to_numpy()
        served = {
            "request_id": pa.array(request_ids),
            "event_time": pa.array(times),
            "produced_at": pa.array(np.full(count, time.time())),
        }
        served.update({name: rows.column(name) for name in self.features})
        if self.events is None:
            writer.add(pa.RecordBatch.from_pydict(served), user_partitions(users, partitions), now)
        else:
            writer.send(*self.events.impressions(request_ids, rows, times))
        clicked = rows.column(self.dataset.schema.label).to_numpy() == 1
        queue.push(
            {
                "request_id": request_ids[clicked],
                "user_id": users[clicked].astype(np.int64),
                "item_id": rows.column(self.item_column).to_numpy()[clicked].astype(np.int64),
                "impression_time": times[clicked],
                "event_time": times[clicked] + self.config.label_delay_s,
            }
        )
        if self.online is not None:
            written = self.online.write_events(self.online.raw_events(rows))
            self.report.online_user_writes += written.users
            self.report.online_item_writes += written.items
        report = self.report
        report.impressions += count
        if report.first_event_time is None:
            report.first_event_time = float(times[0])
        report.last_event_time = float(times[-1])

    def _actions(
        self,
        due: dict[str, np.ndarray],
        partitions: int,
        writer: PartitionBatcher | _JsonWriter,
        now: float,
    ) -> None:
        count = len(due["request_id"])
        self.report.actions += count
        if self.events is not None:
            writer.send(*self.events.clicks(due["request_id"], due["event_time"]))
            return
        rows = pa.RecordBatch.from_pydict(
            {
                "request_id": pa.array(due["request_id"]),
                "user_id": pa.array(due["user_id"]),
                "item_id": pa.array(due["item_id"]),
                "click": pa.array(np.ones(count, dtype=np.int8)),
                "impression_time": pa.array(due["impression_time"]),
                "event_time": pa.array(due["event_time"]),
                "produced_at": pa.array(np.full(count, time.time())),
            }
        )
        writer.add(rows, user_partitions(due["user_id"], partitions), now)


@dataclass(frozen=True)
class _JsonWriter:
    """One topic of a JSON replay: its messages go to the sink as they are encoded."""

    topic: str
    sink: Sender | JsonSink

    def send(self, keys: list[bytes], values: list[bytes]) -> None:
        self.sink.send_events(self.topic, keys, values)


class JsonEvents:
    """Impressions and clicks as per-event JSON with raw values, keyed by request id.

    Encoded column-wise, as a high-volume producer serializes: each column's values become JSON
    text at once (a distinct string or id once per run, numbers by Arrow's shortest round-trip
    formatting), and the objects are joined from them row by row in Arrow, so no Python object
    is built per event. A null, or a number that is not finite, is sent as `null` (a missing
    value); the objects parse to what `json.dumps` of the same values gives.
    """

    def __init__(self, preprocessor, features: list[str]) -> None:
        spec = preprocessor.spec
        self.preprocessor = preprocessor
        self.features = features
        self.fields = [spec.feature(name).column for name in features]
        self.request_field = events.request_field(spec)
        self.time_field = spec.time.column
        self.unit = spec.time.unit

    def impressions(
        self, request_ids: np.ndarray, rows: pa.RecordBatch, times: np.ndarray
    ) -> tuple[list[bytes], list[bytes]]:
        """The keys and values of one impression message per row."""
        columns = {
            self.request_field: pa.array(request_ids),
            self.time_field: pa.array(events.raw_times(times, self.unit)),
        }
        for name, field_name in zip(self.features, self.fields, strict=True):
            columns[field_name] = self.preprocessor.decode(name, rows.column(name))
        return _keys(request_ids), _objects(columns)

    def clicks(self, request_ids: np.ndarray, times: np.ndarray) -> tuple[list[bytes], list[bytes]]:
        """The keys and values of one click message per request."""
        columns = {
            self.request_field: pa.array(request_ids),
            self.time_field: pa.array(events.raw_times(times, self.unit)),
        }
        return _keys(request_ids), _objects(columns)


def _keys(request_ids: np.ndarray) -> list[bytes]:
    return pc.cast(pc.cast(pa.array(request_ids), pa.string()), pa.binary()).to_pylist()


def _objects(columns: dict[str, pa.Array]) -> list[bytes]:
    """One compact JSON object per row of the columns, fields in the columns' order."""
    parts: list[str | pa.Array] = []
    for name, column in columns.items():
        parts += [("," if parts else "{") + json.dumps(name) + ":", _json_text(column)]
    joined = pc.binary_join_element_wise(*parts, "}", "")
    return pc.cast(joined, pa.binary()).to_pylist()


def _json_text(column: pa.Array) -> pa.Array:
    """Each value of a column as JSON text (`null` for a null or a number not finite)."""
    kind = column.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        # Offsets from 0 over the slice's own items: from_arrays takes no nulls with a slice.
        offsets = column.offsets.to_numpy()
        items = _json_text(column.values.slice(offsets[0], offsets[-1] - offsets[0]))
        lists = type(column).from_arrays(
            pa.array(offsets - offsets[0], column.offsets.type), items, mask=column.is_null()
        )
        text = pc.binary_join_element_wise("[", pc.binary_join(lists, ","), "]", "")
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        distinct = column.dictionary_encode()
        quoted = pa.array(
            [json.dumps(value) for value in distinct.dictionary.to_pylist()], pa.string()
        )
        text = quoted.take(distinct.indices)
    elif pa.types.is_floating(kind):
        finite = pc.is_finite(column)
        text = pc.if_else(finite, pc.cast(column, pa.string()), pa.scalar(None, pa.string()))
    elif pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        text = pc.cast(column, pa.string())
    elif pa.types.is_null(kind):
        text = pa.nulls(len(column), pa.string())
    else:
        raise ReplayError(
            f"a raw column of type {kind} has no JSON form here; accepted: "
            "strings, numbers, booleans and lists of them"
        )
    return text.fill_null("null")
