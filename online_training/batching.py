"""Rows to Kafka messages: buffered per partition, sent as batches of many rows, with watermarks.

Python clients cost about the same per message whatever its size, so rows never travel alone:
a partition's rows go out when `batch_rows` of them have gathered, or when the oldest has
waited `linger_s` (freshness), and a partition with nothing to send still gets a heartbeat now
and then so that its watermark keeps moving. A batch too large for its topic's
max.message.bytes goes out as several smaller ones.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from kafka import KafkaProducer

from online_training import messages
from online_training.kafka import MAX_MESSAGE_BYTES, RECORD_BATCH_OVERHEAD


class DeliveryError(RuntimeError):
    """Kafka did not take a message within the producer's delivery timeout."""


class MessageTooLargeError(ValueError):
    """One row alone encodes larger than its topic takes; the message says both sizes."""


class Sender:
    """Encodes and sends messages, counts them, and notices deliveries that failed.

    `limits`: the largest record batch each topic takes (`kafka.message_limits`); a batch that
    encodes larger is split in halves until every piece fits (topics not named: the producer's
    MAX_MESSAGE_BYTES).
    """

    def __init__(
        self,
        producer: KafkaProducer,
        compression: str | None = messages.DEFAULT_COMPRESSION,
        limits: Mapping[str, int] | None = None,
    ) -> None:
        self.producer = producer
        self.compression = compression
        self.limits = dict(limits or {})
        self.messages = 0
        self.heartbeats = 0
        self.bytes = 0
        self._pending: collections.deque = collections.deque()

    def send(self, topic: str, partition: int, batch: messages.Batch) -> None:
        value = messages.encode(batch, self.compression)
        fits = self.limits.get(topic, MAX_MESSAGE_BYTES) - RECORD_BATCH_OVERHEAD
        if len(value) > fits:
            if batch.num_rows < 2:
                raise MessageTooLargeError(
                    f"one row of {topic} encodes to {len(value)} bytes; the topic takes "
                    f"messages of at most {fits} (its max.message.bytes less "
                    f"{RECORD_BATCH_OVERHEAD}): raise max.message.bytes"
                )
            for piece in _halves(batch):
                self.send(topic, partition, piece)
            return
        self.send_raw(topic, value, partition=partition)
        if batch.num_rows == 0:
            self.heartbeats += 1

    def send_raw(
        self,
        topic: str,
        value: bytes,
        *,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        key: bytes | None = None,
    ) -> None:
        future = self.producer.send(
            topic, value=value, key=key, partition=partition, headers=headers
        )
        self._pending.append(future)
        self.messages += 1
        self.bytes += len(value)
        while self._pending and self._pending[0].is_done:
            self._check(self._pending.popleft())

    def send_events(self, topic: str, keys: list[bytes], values: list[bytes]) -> None:
        """One message per value, with its key, placed by the producer's default partitioner."""
        for key, value in zip(keys, values, strict=True):
            self.send_raw(topic, value, key=key)

    def flush(self, timeout_s: float) -> None:
        """Wait until Kafka has every message sent so far (kafka's KafkaTimeoutError if not in
        time); a DeliveryError if it refused one."""
        self.producer.flush(timeout=timeout_s)
        while self._pending:
            self._check(self._pending.popleft())

    @staticmethod
    def _check(future) -> None:
        if future.failed():
            raise DeliveryError(f"Kafka did not take a message: {future.exception}")


def _halves(batch: messages.Batch) -> tuple[messages.Batch, messages.Batch]:
    """The batch's rows in two batches, in order; the first one's watermark stays below the
    second one's rows, which are not sent yet when it arrives."""
    middle = batch.num_rows // 2
    first, second = batch.rows.slice(0, middle), batch.rows.slice(middle)
    earliest_left = float(np.min(second.column("event_time").to_numpy()))
    return (
        messages.Batch(
            batch.kind, first, watermark=min(batch.watermark, earliest_left), dataset=batch.dataset
        ),
        messages.Batch(
            batch.kind,
            second,
            watermark=batch.watermark,
            end_of_stream=batch.end_of_stream,
            dataset=batch.dataset,
        ),
    )


@dataclass
class _PartitionBuffer:
    pieces: list[pa.RecordBatch] = field(default_factory=list)
    rows: int = 0
    oldest_wall: float = 0.0
    last_sent_wall: float = -math.inf
    last_watermark: float = -math.inf


class PartitionBatcher:
    """Rows of one topic, buffered per partition and sent as batches.

    A batch's watermark is the event-time clock given to `flush` (every row of the partition
    with an earlier event time has been added), or, when rows stay behind in the buffer, the
    event time of the first of them, so the watermark never overtakes a row not yet sent.
    """

    def __init__(
        self,
        topic: str,
        kind: str,
        partitions: int,
        sender: Sender,
        *,
        batch_rows: int,
        linger_s: float,
        dataset: str = "",
        heartbeats: bool = True,
    ) -> None:
        self.topic = topic
        self.kind = kind
        self.sender = sender
        self.batch_rows = batch_rows
        self.linger_s = linger_s
        self.dataset = dataset
        self.heartbeats = heartbeats
        self.buffers = [_PartitionBuffer() for _ in range(partitions)]

    @property
    def buffered_rows(self) -> int:
        return sum(buffer.rows for buffer in self.buffers)

    def add(self, rows: pa.RecordBatch, partitions: np.ndarray, now: float) -> None:
        """Add rows (in event-time order) to the partitions given row by row."""
        if not rows.num_rows:
            return
        order = np.argsort(partitions, kind="stable")
        bounds = np.searchsorted(partitions[order], np.arange(len(self.buffers) + 1))
        grouped = rows.take(pa.array(order))
        for partition, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            if end > start:
                self.add_to(partition, grouped.slice(start, end - start), now)

    def add_to(self, partition: int, rows: pa.RecordBatch, now: float) -> None:
        if not rows.num_rows:
            return
        buffer = self.buffers[partition]
        if not buffer.rows:
            buffer.oldest_wall = now
        buffer.pieces.append(rows)
        buffer.rows += rows.num_rows

    def flush(self, clock: float, now: float, force: bool = False) -> None:
        for partition in range(len(self.buffers)):
            self.flush_partition(partition, clock, now, force)

    def flush_partition(self, partition: int, clock: float, now: float, force: bool) -> None:
        """Send full batches; partial ones once they have waited `linger_s` (or if `force`);
        a heartbeat when nothing was sent for `linger_s` and the clock has moved."""
        buffer = self.buffers[partition]
        lingered = force or now - buffer.oldest_wall >= self.linger_s
        if buffer.rows >= self.batch_rows or (buffer.rows and lingered):
            rows = messages.concat(buffer.pieces)
            start = 0
            while rows.num_rows - start >= self.batch_rows:
                end = start + self.batch_rows
                watermark = clock
                if end < rows.num_rows:
                    watermark = min(clock, rows.column("event_time")[end].as_py())
                self._send(partition, rows.slice(start, self.batch_rows), watermark, now)
                start = end
            rest = rows.num_rows - start
            if rest and lingered:
                self._send(partition, rows.slice(start, rest), clock, now)
                rest = 0
            buffer.pieces = [rows.slice(start, rest)] if rest else []
            buffer.rows = rest
            if rest:
                buffer.oldest_wall = now
        elif (
            self.heartbeats
            and not buffer.rows
            and buffer.last_watermark < clock
            and (force or now - buffer.last_sent_wall >= self.linger_s)
        ):
            self._send(partition, None, clock, now)

    def end(self, partition: int, now: float) -> None:
        """The partition's last message: a marker that nothing more will come."""
        if self.buffers[partition].rows:
            self.flush_partition(partition, math.inf, now, force=True)
        marker = messages.heartbeat(self.kind, math.inf, end_of_stream=True, dataset=self.dataset)
        self.sender.send(self.topic, partition, marker)
        self.buffers[partition].last_sent_wall = now

    def _send(
        self, partition: int, rows: pa.RecordBatch | None, watermark: float, now: float
    ) -> None:
        if rows is None:
            batch = messages.heartbeat(self.kind, watermark, dataset=self.dataset)
        else:
            batch = messages.Batch(self.kind, rows, watermark=watermark, dataset=self.dataset)
        self.sender.send(self.topic, partition, batch)
        buffer = self.buffers[partition]
        buffer.last_sent_wall = now
        buffer.last_watermark = watermark
