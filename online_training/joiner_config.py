"""The joiner's settings and their errors (`online_training.joiner`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from online_training import events, messages


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
