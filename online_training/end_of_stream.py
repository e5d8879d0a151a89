"""Which partitions a consumer group had read to their end, from its committed offsets.

A streaming consumer with `stop_at_end` stops once every partition it reads has ended, and a
partition ends with an end-of-stream marker. Once that marker is read and its offset committed,
a restarted consumer starts after it and never reads it again: it would wait for it forever.
So the committed state says it: a partition whose committed offset comes right after an end
marker (the message just before that offset is one) had ended as of that commit. Consumers ask
here when partitions are assigned to them; rows read after such a marker start the partition
again, as they would have without the restart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from online_training import messages
from online_training.kafka import KafkaSettings, make_consumer

log = logging.getLogger(__name__)

READ_BACK_TIMEOUT_S = 5.0


def ended_at_commit(
    settings: KafkaSettings,
    consumer: KafkaConsumer,
    partitions: Iterable[TopicPartition],
    kinds: Mapping[str, str],
    timeout_s: float = READ_BACK_TIMEOUT_S,
) -> set[TopicPartition]:
    """The partitions of `partitions` (of the topics in `kinds`: topic -> message kind) whose
    message just before `consumer`'s committed offset is an end-of-stream marker of the topic's
    kind, read back by a consumer of no group. None if the committed offsets cannot be read
    (logged: their end markers are then waited for)."""
    try:
        committed = {tp: consumer.committed(tp) for tp in partitions if tp.topic in kinds}
    except KafkaError as error:
        log.warning("committed offsets not read, ended partitions not recalled: %s", error)
        return set()
    wanted = {tp: offset - 1 for tp, offset in committed.items() if offset}
    if not wanted:
        return set()
    ended: set[TopicPartition] = set()
    consumer = make_consumer(settings, None)
    try:
        consumer.assign(list(wanted))
        for tp, offset in wanted.items():
            consumer.seek(tp, offset)
        pending = set(wanted)
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=100).items():
                record = next((r for r in records if r.offset >= wanted[tp]), None)
                if tp not in pending or record is None:
                    continue
                pending.discard(tp)
                consumer.pause(tp)
                if record.offset == wanted[tp] and _is_end(record.value, kinds[tp.topic]):
                    ended.add(tp)
    finally:
        consumer.close()
    if pending:
        log.warning(
            "could not read back the last committed message of %s within %.0f s; counting "
            "them as not ended (their end marker is waited for)",
            sorted(map(tuple, pending)),
            timeout_s,
        )
    return ended


def _is_end(value: bytes | None, kind: str) -> bool:
    try:
        return messages.decode(value or b"", kind).end_of_stream
    except messages.MessageError:
        return False
