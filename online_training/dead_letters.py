"""Dead letters: a message that cannot be used goes, as it came, to `<topic>.dlq`, with why.

Each dead letter carries the original bytes and headers `reason` (a short code for counting),
`error` (what was wrong and what is accepted), `source_topic`, `source_partition` and
`source_offset`, so it can be inspected, fixed and replayed. Safe to use from several threads:
the streaming trainer dead-letters from its consumer loop and from its training thread. The
joiner sends its dead letters through the sender of its examples, so one flush covers both.

The log says each reason's first dead letter in full, then at most one line per reason every
LOG_EVERY_S with how many more there were: a producer that gets one field wrong sends every
message wrong, and a warning per message would bury the log (the counts and the dead-letter
topic keep every one).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

from online_training.batching import Sender
from online_training.kafka import Topics

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0


class DeadLetters:
    """Sends unusable messages to their topic's dead-letter topic and counts them by reason."""

    def __init__(self, sender: Sender) -> None:
        self._sender = sender
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self._last_logged: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()

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
            now = time.monotonic()
            last = self._last_logged.get(reason)
            if last is not None and now - last < LOG_EVERY_S:
                self._unlogged[reason] += 1
                return
            self._last_logged[reason] = now
            more = self._unlogged.pop(reason, 0)
        if more:
            log.warning(
                "dead-lettered %d more %s messages since the last report; the latest, "
                "%s[%d]@%d: %s",
                more + 1,
                reason,
                topic,
                partition,
                offset,
                error,
            )
        else:
            log.warning("dead-lettered %s[%d]@%d: %s: %s", topic, partition, offset, reason, error)

    def flush(self, timeout_s: float) -> None:
        """Wait until Kafka holds every dead letter sent so far (kafka's KafkaTimeoutError, or
        batching's DeliveryError, if not): offsets past a dead letter are committed only then."""
        with self._lock:
            self._sender.flush(timeout_s)
