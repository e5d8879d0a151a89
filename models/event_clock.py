"""The clock of collisionless tables: the event time of the newest example trained on.

Admission windows, expiry and LRU order are then in the data's own time, the same offline and
online: a table trained offline on last year's events and continued on today's stream compares
last-seen times of one clock, and a replay at any speed expires the same ids. Under shuffled
offline training the clock jumps to the newest event time of the first batches, so within an
epoch every id looks equally recent: time-based admission, expiry and LRU order mean something
on time-ordered data (the stream, or `shuffle: false`).
"""

from __future__ import annotations

import math

from models.base import Model


class EventClock:
    """Event time (seconds) of the newest example seen so far; 0 before the first one."""

    def __init__(self, start: float = -math.inf) -> None:
        self.newest = start

    def advance(self, event_time: float) -> None:
        """Move to `event_time` if it is newer (examples may come out of order, time never
        runs back)."""
        self.newest = max(self.newest, event_time)

    def __call__(self) -> float:
        return self.newest if math.isfinite(self.newest) else 0.0

    def attach(self, model: Model) -> None:
        """Make this the clock of every collisionless table of `model`."""
        for table in model.embeddings.self_managed.values():
            table.set_clock(self)
