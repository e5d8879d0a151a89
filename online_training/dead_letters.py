"""Dead letters: a message that cannot be used goes, as it came, to `<topic>.dlq`, with why.

Each dead letter carries the original bytes and headers `reason` (a short code for counting),
`error` (what was wrong and what is accepted), `source_topic`, `source_partition` and
`source_offset`, so it can be inspected, fixed and replayed. Safe to use from several threads:
the streaming trainer dead-letters from its consumer loop and from its training thread. The
joiner sends its dead letters through the sender of its examples, so one flush covers both.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

from online_training.batching import Sender
from online_training.kafka import Topics

log = logging.getLogger(__name__)


class DeadLetters:
    """Sends unusable messages to their topic's dead-letter topic and counts them by reason."""

    def __init__(self, sender: Sender) -> None:
        self._sender = sender
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def send(
        self, topic: str, partition: int, offset: int, value: bytes | None, reason: str, error: str
    ) -> None:
        headers = [
            ("reason", reason.encode()),
            ("error", error.encode()[:2000]),
            ("source_topic", topic.encode()),
            ("source_partition", str(partition).encode()),
            ("source_offset", str(offset).encode()),
        ]
        with self._lock:
            self._sender.send_raw(Topics.dlq(topic), value or b"", headers=headers)
            self.counts[reason] += 1
        log.warning("dead-lettered %s[%d]@%d: %s: %s", topic, partition, offset, reason, error)

    def flush(self, timeout_s: float) -> None:
        """Wait until Kafka holds every dead letter sent so far (kafka's KafkaTimeoutError, or
        batching's DeliveryError, if not): offsets past a dead letter are committed only then."""
        with self._lock:
            self._sender.flush(timeout_s)
