"""What one run of the joiner reports (`online_training.joiner`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
