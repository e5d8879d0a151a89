"""What the streaming trainer reports: after a run, and live while it runs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainerReport:
    """What one run of the trainer read, trained, dead-lettered, pushed and committed."""

    redis_model: str = ""
    examples: int = 0
    positives: int = 0
    batches: int = 0
    skipped_batches: int = 0
    messages_in: int = 0
    heartbeats: int = 0
    # Messages read again after a restart whose update the resumed state already holds.
    skipped_in_state: int = 0
    dlq: dict[str, int] = field(default_factory=dict)
    full_publishes: int = 0
    deltas: int = 0
    dense_pushes: int = 0
    rows_pushed: int = 0
    ids_deleted: int = 0
    sync_failures: int = 0
    final_sync_failed: bool = False
    commits: int = 0
    commit_failures: int = 0
    rebalances: int = 0
    ended_partitions: list[int] = field(default_factory=list)
    version: int | None = None
    delta: int | None = None
    last_sync: dict[str, Any] | None = None
    window_aucs: list[float] = field(default_factory=list)
    seconds: float = 0.0
    # From the first message read to the end: the trainer's own time, without the group join.
    active_seconds: float = 0.0
    train_seconds: float = 0.0

    @property
    def dlq_messages(self) -> int:
        return sum(self.dlq.values())

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.active_seconds if self.active_seconds else 0.0

    @property
    def last_window_auc(self) -> float | None:
        finite = [value for value in self.window_aucs if not math.isnan(value)]
        return finite[-1] if finite else None

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "window_aucs": [None if math.isnan(v) else round(v, 5) for v in self.window_aucs],
            "dlq_messages": self.dlq_messages,
            "examples_per_s": round(self.examples_per_s, 1),
            "last_window_auc": self.last_window_auc,
        }


@dataclass(frozen=True)
class TrainerStatus:
    """Live counters: for a progress line while the trainer runs."""

    examples: int
    examples_per_s: float
    lag: int | None  # messages in assigned partitions not yet applied
    last_sync_age_s: float | None
    last_window_auc: float | None
    dead_letters: int
    version: int | None
    delta: int | None
    sync_failures: int
