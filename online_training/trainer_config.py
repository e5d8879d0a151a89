"""The streaming trainer's settings, its callbacks and its errors (`online_training.trainer`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from models.config import TrainConfig
from online_training.learner import AppliedBatch
from online_training.sync import SyncConfig, SyncRecord


class TrainerError(RuntimeError):
    """The training thread stopped on an error (chained) that is not about one message."""


class TrainerConfigError(ValueError):
    """Trainer settings, or a state file, that cannot work; the message says what is accepted."""


@dataclass(frozen=True)
class TrainerConfig:
    """The consumer group, micro-batching, backpressure, stopping and state-keeping settings.

    `state_path`: where the model is checkpointed after every sync (and resumed from, see
    `StartingPoint.resume`); None keeps no state. A micro-batch waits up to `max_batch_wait_s`
    for `min_batch_rows` examples: a slow stream otherwise trains on batches of a few dozen rows,
    whose mean-loss gradients are far larger per row than the offline batches' that filled the
    tables' Adagrad accumulators, and each such step moves the rows too far (on synthetic
    Criteo, 80-row batches lost 0.01-0.04 AUC against the frozen model where 1,000-row batches
    matched it). `train` gives the dense optimizer (Adam, its
    learning rate); the tables keep their checkpoint's sparse optimizer. `max_queued_rows`:
    examples read but not trained before reading pauses. Offsets are committed right after
    each sync; `commit_retry_s` is the wait before trying again after a failed commit.
    """

    # None: the topics' default group for the model trained (Topics.group_id).
    group_id: str | None = None
    batch_size: int = 4096
    min_batch_rows: int = 1024
    max_batch_wait_s: float = 1.0
    max_poll_records: int = 16
    poll_timeout_ms: int = 100
    max_queued_rows: int = 65_536
    auc_window: int = 10_000
    stop_at_end: bool = True
    idle_timeout_s: float | None = None
    commit_retry_s: float = 0.5
    commit_timeout_s: float = 2.0
    final_sync_timeout_s: float = 60.0
    startup_timeout_s: float = 120.0
    state_path: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)

    def __post_init__(self) -> None:
        for name in ("batch_size", "min_batch_rows", "max_poll_records", "max_queued_rows"):
            if getattr(self, name) < 1:
                raise TrainerConfigError(f"trainer {name} must be >= 1, got {getattr(self, name)}")
        if self.idle_timeout_s is not None and self.idle_timeout_s <= 0:
            raise TrainerConfigError(f"idle timeout must be > 0 seconds, got {self.idle_timeout_s}")
        if self.commit_retry_s < 0:
            raise TrainerConfigError(f"commit_retry_s must be >= 0, got {self.commit_retry_s}")
        if self.auc_window < 1:
            raise TrainerConfigError(f"trainer auc_window must be >= 1, got {self.auc_window}")
        if self.max_batch_wait_s < 0:
            raise TrainerConfigError(f"max_batch_wait_s must be >= 0, got {self.max_batch_wait_s}")
        for name in ("commit_timeout_s", "final_sync_timeout_s", "startup_timeout_s"):
            if not getattr(self, name) > 0:
                raise TrainerConfigError(f"trainer {name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainerHooks:
    """Callbacks on the training thread: after each trained batch, after each push went live."""

    on_applied: Callable[[AppliedBatch], None] | None = None
    on_synced: Callable[[SyncRecord], None] | None = None
