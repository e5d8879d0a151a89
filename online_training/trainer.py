"""The streaming trainer: a consumer group on `examples`, micro-batches, delta sync, commits.

Two threads. The consumer thread (the caller of `run`) owns the Kafka consumer: it polls,
decodes, dead-letters what it cannot use, queues the rest and commits offsets, and never blocks
for long, so the group keeps it (a member that does not poll within max_poll_interval_ms, 3 s
with the quick-join defaults, is put out of its group). The training thread owns the model: it
takes queued messages as micro-batches of whole messages, up to `batch_size` examples, trains
on them (`online_training.learner`) and every sync interval pushes a delta
(`online_training.sync`). When training falls behind, or a push keeps failing because Redis is
down, the queue fills up and the consumer thread pauses its partitions: it goes on polling,
and so stays in the group, but reads nothing more until the queue drains.

Delivery is at least once. A message's offset becomes committable only after the delta that
covers its update went live (and the trainer's state checkpoint, if it keeps one, was written),
so a crash re-delivers at most the messages applied since the last sync. Re-applying them is
safe for what serving reads: a delta overwrites whole rows and moves the version head in one
step. A trainer that keeps a state checkpoint (`state_path`) resumes from the model as of its
last sync and continues that version's deltas; one that does not restarts from its checkpoint
and publishes a full version unless Redis holds that checkpoint's publish unchanged.

Undecodable messages, messages without the model's columns and messages the model cannot read
(ids out of range, wrong types) go to `<topic>.dlq` with the reason and are counted; a step
with a non-finite loss is skipped (nothing is updated) and counted. Neither stops the trainer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.errors import KafkaError

from embedding_tables.errors import EmbeddingTableError
from models.base import Model
from models.checkpoint import load_checkpoint, read_manifest, save_checkpoint
from models.config import TrainConfig
from models.errors import ModelError, NonFiniteLossError
from online_training import messages
from online_training.batching import DeliveryError
from online_training.dead_letters import DeadLetters
from online_training.end_of_stream import ended_at_commit
from online_training.kafka import (
    KafkaSettings,
    RebalanceEvents,
    Topics,
    make_consumer,
    make_producer,
)
from online_training.learner import AppliedBatch, OnlineLearner
from online_training.sync import ParamSync, SyncConfig, SyncError, SyncPoint, SyncRecord
from serving.publisher import ParamPublisher

log = logging.getLogger(__name__)

# What the trainer keeps of an example besides the model's columns: for hooks and freshness.
PASSTHROUGH_COLUMNS = ("request_id", "produced_at")
STATE_KEY = "online"
# Errors of a batch the model cannot read; raised before any update is applied.
UNTRAINABLE = (ModelError, EmbeddingTableError, pa.ArrowException)


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


@dataclass
class StartingPoint:
    """The model a trainer starts from, and what Redis may already hold of it.

    `origin_manifest`: the manifest of the checkpoint the model was loaded from (Redis may hold
    its unchanged publish). `resumed`: the sync the trainer's own state was saved at, and
    `offsets` the next offset per partition that sync covered: messages before them are in the
    state already, so a restart skips them even where their commit did not happen.
    """

    model: Model
    origin_manifest: dict[str, Any] | None = None
    resumed: SyncPoint | None = None
    event_time: float = -math.inf
    examples: int = 0
    offsets: dict[TopicPartition, int] = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> StartingPoint:
        """An offline checkpoint (models' `save_checkpoint`)."""
        checkpoint = load_checkpoint(path)
        return cls(model=checkpoint.model, origin_manifest=checkpoint.manifest)

    @classmethod
    def resume(cls, state_path: str | Path, redis_model: str) -> StartingPoint | None:
        """The trainer's own state at `state_path`, or None if there is none yet.

        A state saved for another published model is an error: its version and deltas say
        nothing about this one.
        """
        path = Path(state_path)
        if not path.exists():
            return None
        online = state_entry(read_manifest(path), path, redis_model)
        return cls.from_state(load_checkpoint(path).model, online)

    @classmethod
    def from_state(cls, model: Model, online: dict[str, Any]) -> StartingPoint:
        """A model restored from a trainer's state, and that state's `online` entry."""
        event_time = online.get("event_time")
        return cls(
            model=model,
            origin_manifest=None,
            resumed=SyncPoint(
                int(online["version"]), int(online["delta"]), str(online.get("publish_id", ""))
            ),
            event_time=-math.inf if event_time is None else float(event_time),
            examples=int(online.get("examples", 0)),
            offsets={
                TopicPartition(topic, int(partition)): int(offset)
                for topic, partitions in online.get("offsets", {}).items()
                for partition, offset in partitions.items()
            },
        )


def state_entry(manifest: dict[str, Any], path: Path, redis_model: str) -> dict[str, Any]:
    """The `online` entry of a trainer's state checkpoint, checked to belong to `redis_model`."""
    online = manifest.get(STATE_KEY)
    if not isinstance(online, dict) or "version" not in online:
        raise TrainerConfigError(
            f"{path} is a checkpoint but not a streaming trainer's state (no {STATE_KEY!r} "
            "entry); give --state a path of its own"
        )
    if online.get("redis_model") != redis_model:
        raise TrainerConfigError(
            f"{path} is the state of published model {online.get('redis_model')!r}, not "
            f"{redis_model!r}; use another state path for this model"
        )
    return online


@dataclass(frozen=True)
class TrainerHooks:
    """Callbacks on the training thread: after each trained batch, after each push went live."""

    on_applied: Callable[[AppliedBatch], None] | None = None
    on_synced: Callable[[SyncRecord], None] | None = None


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


@dataclass(frozen=True)
class Turn:
    """What the training thread does in one turn of its loop: train (`rows`: a batch with rows
    was taken), then push a last delta and stop (`finished`: the stream is done and nothing is
    left), or push a delta (`sync_due` and `unsynced`, unless `stopping`). One process decides
    alone; ranks training one sharded model decide together (`online_training.sharded_trainer`).
    """

    rows: bool
    finished: bool
    sync_due: bool
    unsynced: bool
    stopping: bool


@dataclass
class _Message:
    """One consumed message on its way to the training thread."""

    tp: TopicPartition
    next_offset: int
    epoch: int
    rows: pa.RecordBatch | None = None
    value: bytes | None = None


class Trainer:
    """Trains a model on the examples topic and keeps its published version fresh."""

    learner_class = OnlineLearner

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: Topics,
        start: StartingPoint,
        publisher: ParamPublisher,
        config: TrainerConfig | None = None,
        hooks: TrainerHooks | None = None,
    ) -> None:
        self.kafka = kafka
        self.topics = topics
        self.start = start
        self.config = config or TrainerConfig()
        self.hooks = hooks or TrainerHooks()
        self.model = start.model
        self.learner = self.learner_class(
            start.model,
            self.config.train,
            auc_window=self.config.auc_window,
            event_time=start.event_time,
        )
        self.sync = self._make_sync(publisher)
        self.report = TrainerReport(redis_model=publisher.model)
        self.group_id = self.config.group_id or topics.group_id("trainer", publisher.model)
        self.dead_letters: DeadLetters | None = None
        self._columns = [*self.learner.columns, *PASSTHROUGH_COLUMNS]
        self._queue: queue.SimpleQueue[_Message] = queue.SimpleQueue()
        self._queued_rows = 0
        self._lock = threading.Lock()
        self._rebalance = RebalanceEvents()
        self._epoch = 0
        self._ended: set[int] = set()
        self._read: dict[TopicPartition, int] = {}
        # Training thread -> consumer thread: (epoch, next offset) applied, and synced.
        self._applied: dict[TopicPartition, tuple[int, int]] = {}
        self._synced: dict[TopicPartition, tuple[int, int]] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._syncs = 0
        self._unsynced = False
        self._trained_since_dense = False
        self._stop = threading.Event()
        self._finishing = threading.Event()
        self._failure: BaseException | None = None
        self._last_sync_wall: float | None = None
        self._rate_samples: deque[tuple[float, int]] = deque(maxlen=64)
        self._lag: int | None = None
        self._first_input: float | None = None

    def _make_sync(self, publisher: ParamPublisher) -> ParamSync:
        return ParamSync(publisher, self.model, self.config.sync)

    # Running.

    def run(self, stop: threading.Event | None = None) -> TrainerReport:
        """Train until the stream ends (every assigned partition's end marker, with
        `stop_at_end`), the idle timeout passes, or `stop` is set; then push a last delta and
        commit what it covers. Raises TrainerError if training failed on something that is not
        one message's fault (the offsets of unsynced work are then not committed)."""
        started = time.monotonic()
        self._stop = stop or threading.Event()
        producer = make_producer(self.kafka)
        self.dead_letters = DeadLetters(producer)
        try:
            record = self.sync.attach(
                self.start.origin_manifest,
                self.start.resumed,
                cancel=self._stop,
                deadline=time.monotonic() + self.config.startup_timeout_s,
            )
            if record is not None:
                self._published(record)
            self._save_state(self.start.offsets)
            self._consume_and_train()
        except SyncError as error:
            if not self._stop.is_set():
                raise TrainerError(f"could not reach the parameter store: {error}") from error
        finally:
            producer.close(timeout=self.config.commit_timeout_s)
            finished = time.monotonic()
            self.report.seconds = finished - started
            if self._first_input is not None:
                self.report.active_seconds = finished - self._first_input
            self.report.dlq = dict(self.dead_letters.counts)
            self.report.sync_failures = self.sync.failures
            self.report.window_aucs = list(self.learner.progressive.aucs)
        if self._failure is not None:
            raise TrainerError(f"the training thread failed: {self._failure}") from self._failure
        return self.report

    def status(self) -> TrainerStatus:
        """A snapshot of the live counters (safe to call from any thread)."""
        now = time.monotonic()
        examples = self.report.examples
        self._rate_samples.append((now, examples))
        recent = [(t, n) for t, n in self._rate_samples if now - t <= 5.0]
        rate = 0.0
        if len(recent) >= 2 and recent[-1][0] > recent[0][0]:
            rate = (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])
        point = self.sync.point
        return TrainerStatus(
            examples=examples,
            examples_per_s=rate,
            lag=self._lag,
            last_sync_age_s=(
                None if self._last_sync_wall is None else time.time() - self._last_sync_wall
            ),
            last_window_auc=self.learner.progressive.last,
            dead_letters=self.dead_letters.total if self.dead_letters else 0,
            version=None if point is None else point.version,
            delta=None if point is None else point.delta,
            sync_failures=self.sync.failures,
        )

    def _consume_and_train(self) -> None:
        consumer = make_consumer(
            self.kafka, self.group_id, max_poll_records=self.config.max_poll_records
        )
        worker = threading.Thread(target=self._train_loop, name="embtab-trainer", daemon=True)
        try:
            self._join(consumer)
            worker.start()
            self._consume(consumer)
            self._finish(consumer, worker)
        finally:
            consumer.close(autocommit=False)

    def _join(self, consumer: KafkaConsumer) -> None:
        """Join the consumer group on the examples topic: the group spreads its partitions."""
        consumer.subscribe([self.topics.examples], listener=self._rebalance)

    # The consumer thread.

    def _consume(self, consumer: KafkaConsumer) -> None:
        last_input = last_lag = time.monotonic()
        committed_syncs, last_commit = 0, -math.inf
        while not self._stop.is_set() and self._failure is None:
            self._backpressure(consumer)
            polled = consumer.poll(timeout_ms=self.config.poll_timeout_ms)
            if self._apply_rebalances(consumer):
                last_input = time.monotonic()
            now = time.monotonic()
            for tp, records in polled.items():
                for record in records:
                    self._ingest(tp, record)
            if polled:
                last_input = now
                if self._first_input is None:
                    self._first_input = now
            syncs = self._syncs
            if syncs != committed_syncs and now - last_commit >= self.config.commit_retry_s:
                if self._commit(consumer):
                    committed_syncs = syncs
                last_commit = time.monotonic()
            if now - last_lag >= 0.5:
                self._lag = self._measure_lag(consumer)
                last_lag = now
            assigned = {tp.partition for tp in consumer.assignment()}
            if self.config.stop_at_end and assigned and assigned <= self._ended:
                return
            idle = self.config.idle_timeout_s
            if idle is not None and consumer.assignment() and now - last_input >= idle:
                return

    def _finish(self, consumer: KafkaConsumer, worker: threading.Thread) -> None:
        """Let the training thread drain its queue and push a last delta, staying in the group
        meanwhile (partitions paused), then commit what that delta covers."""
        self._finishing.set()
        while worker.is_alive():
            consumer.pause(*consumer.assignment())
            consumer.poll(timeout_ms=self.config.poll_timeout_ms)
            self._apply_rebalances(consumer)
            self._lag = self._measure_lag(consumer)
            worker.join(timeout=0.05)
        self._commit(consumer)
        self._lag = self._measure_lag(consumer)

    def _ingest(self, tp: TopicPartition, record) -> None:
        self.report.messages_in += 1
        self._read[tp] = record.offset + 1
        message = _Message(tp, record.offset + 1, self._epoch)
        if record.offset < self.start.offsets.get(tp, 0):
            self.report.skipped_in_state += 1
            self._queue.put(message)
            return
        try:
            batch = messages.decode(record.value, messages.EXAMPLES)
            missing = [name for name in self._columns if name not in batch.rows.schema.names]
            # A heartbeat carries no features; a zero-row batch with some must have them all.
            if missing and (batch.num_rows or batch.feature_names):
                raise messages.MessageError(
                    "schema-mismatch",
                    f"examples lack column(s) {', '.join(missing)}; this model reads "
                    f"{', '.join(self._columns)}",
                )
        except messages.MessageError as error:
            self.dead_letters.send(
                tp.topic, tp.partition, record.offset, record.value, error.reason, error.detail
            )
        else:
            if batch.end_of_stream:
                self._ended.add(tp.partition)
                if tp.partition not in self.report.ended_partitions:
                    self.report.ended_partitions.append(tp.partition)
            elif batch.num_rows:
                self._ended.discard(tp.partition)
            if batch.num_rows:
                message.rows = batch.rows.select(self._columns)
                message.value = record.value
            else:
                self.report.heartbeats += 1
        with self._lock:
            self._queued_rows += message.rows.num_rows if message.rows is not None else 0
        self._queue.put(message)

    def _backpressure(self, consumer: KafkaConsumer) -> None:
        """Pause every assigned partition while the queue is full; resume below half of it."""
        limit = self.config.max_queued_rows
        if self._queued_rows >= limit:
            unpaused = consumer.assignment() - consumer.paused()
            if unpaused:
                consumer.pause(*unpaused)
        elif self._queued_rows <= limit // 2 and consumer.paused():
            consumer.resume(*consumer.paused())

    def _commit(self, consumer: KafkaConsumer) -> bool:
        """Commit, per assigned partition, the offset after the last message a live delta covers
        (dead letters before it flushed to Kafka first); whether nothing is left to commit."""
        with self._lock:
            synced = dict(self._synced)
        assigned = consumer.assignment()
        offsets = {
            tp: OffsetAndMetadata(offset, "", -1)
            for tp, (epoch, offset) in synced.items()
            if epoch == self._epoch and tp in assigned and offset > self._committed.get(tp, -1)
        }
        if not offsets:
            return True
        try:
            self.dead_letters.flush(self.config.commit_timeout_s)
            consumer.commit(offsets, timeout_ms=int(self.config.commit_timeout_s * 1000))
        except (KafkaError, DeliveryError) as error:
            self.report.commit_failures += 1
            log.warning("offsets not committed (will retry): %s", error)
            return False
        self._committed.update({tp: meta.offset for tp, meta in offsets.items()})
        self.report.commits += 1
        return True

    def _measure_lag(self, consumer: KafkaConsumer) -> int | None:
        """Messages of the assigned partitions not applied yet (by the last fetched high water
        marks; None before any is known)."""
        with self._lock:
            applied = {tp: offset for tp, (_, offset) in self._applied.items()}
        lag, known = 0, False
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            position = applied.get(tp, self._read.get(tp))
            if highwater is not None and position is not None:
                lag += max(0, highwater - position)
                known = True
        return lag if known else None

    def _apply_rebalances(self, consumer: KafkaConsumer) -> bool:
        """Take rebalance events: a new epoch, so that offsets applied under an earlier
        assignment are never committed (another member may have moved past them); assigned
        partitions whose end was committed count as ended. Returns whether partitions were
        assigned."""
        assigned = False
        while True:
            try:
                event, partitions = self._rebalance.events.get_nowait()
            except queue.Empty:
                return assigned
            self._epoch += 1
            if event == "revoked":
                self.report.rebalances += bool(partitions)
                for tp in partitions:
                    self._ended.discard(tp.partition)
                    self._read.pop(tp, None)
            else:
                assigned = True
                self._recall_ended(consumer, partitions)
            log.info("partitions %s: %s", event, sorted(map(tuple, partitions)))

    def _recall_ended(self, consumer: KafkaConsumer, partitions: Iterable[TopicPartition]) -> None:
        """Count as ended the partitions whose end marker was read and committed before this
        run (`online_training.end_of_stream`): it is never read again."""
        if not self.config.stop_at_end:
            return
        try:
            committed = {tp: consumer.committed(tp) for tp in partitions}
        except KafkaError as error:
            log.warning("committed offsets not read, ended partitions not recalled: %s", error)
            return
        for tp in ended_at_commit(self.kafka, committed, {self.topics.examples: messages.EXAMPLES}):
            log.info(
                "partition %d ended before this run (its end marker is committed)", tp.partition
            )
            self._ended.add(tp.partition)
            if tp.partition not in self.report.ended_partitions:
                self.report.ended_partitions.append(tp.partition)

    # The training thread.

    def _train_loop(self) -> None:
        try:
            while True:
                taken = self._take()
                turn = self._turn(taken)
                if taken or turn.rows:
                    self._apply(taken, turn)
                if turn.finished:
                    if turn.unsynced:
                        self._sync(final=True)
                    return
                if turn.unsynced and turn.sync_due and not turn.stopping:
                    self._sync(final=False)
        except BaseException as error:  # handed to the consumer thread, which raises it
            self._failure = error
            log.exception("the training thread failed")

    def _turn(self, taken: list[_Message]) -> Turn:
        return Turn(
            rows=any(message.rows is not None for message in taken),
            finished=self._finishing.is_set() and self._queue.empty(),
            sync_due=self.sync.due(),
            unsynced=self._unsynced or bool(taken),
            stopping=self._stop.is_set(),
        )

    def _take(self) -> list[_Message]:
        """Queued messages for one micro-batch: the first (none after 0.1 s), then more up to
        `batch_size` rows; while fewer than `min_batch_rows`, waiting for more up to
        `max_batch_wait_s` after the first (not when finishing or stopping)."""
        try:
            taken = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        rows = _num_rows(taken[0])
        deadline = time.monotonic() + self.config.max_batch_wait_s
        while rows < self.config.batch_size:
            try:
                message = self._queue.get_nowait()
            except queue.Empty:
                wait = deadline - time.monotonic()
                enough = rows >= self.config.min_batch_rows or wait <= 0
                if enough or self._finishing.is_set() or self._stop.is_set():
                    break
                try:
                    message = self._queue.get(timeout=min(wait, 0.05))
                except queue.Empty:
                    continue
            taken.append(message)
            rows += _num_rows(message)
        return taken

    def _apply(self, taken: list[_Message], turn: Turn) -> None:
        with_rows = [message for message in taken if message.rows is not None]
        if turn.rows:
            started = time.perf_counter()
            self._train(with_rows)
            self.report.train_seconds += time.perf_counter() - started
        with self._lock:
            for message in taken:
                self._applied[message.tp] = (message.epoch, message.next_offset)
            self._queued_rows -= sum(m.rows.num_rows for m in with_rows)
        self._unsynced = True

    def _train(self, group: list[_Message]) -> None:
        """One step on the group's rows; if the model cannot read them, one step per message,
        dead-lettering the messages it cannot read (a failed step changes nothing)."""
        try:
            rows = messages.concat([message.rows for message in group])
            self._step(rows)
            return
        except UNTRAINABLE as error:
            if len(group) == 1:
                self._dead_letter(group[0], error)
                return
        for message in group:
            try:
                self._step(message.rows)
            except UNTRAINABLE as error:
                self._dead_letter(message, error)

    def _step(self, rows: pa.RecordBatch) -> None:
        try:
            applied = self.learner.apply(rows)
        except NonFiniteLossError as error:
            self.report.skipped_batches += 1
            log.warning("skipped a batch of %d examples: %s", rows.num_rows, error)
            return
        if not applied.size:  # a rank's share of a sharded step that held none of its rows
            return
        self.report.examples += applied.size
        self.report.positives += int(applied.labels.sum())
        self.report.batches += 1
        self._trained_since_dense = True
        if self.hooks.on_applied is not None:
            self.hooks.on_applied(applied)

    def _dead_letter(self, message: _Message, error: Exception) -> None:
        self.dead_letters.send(
            message.tp.topic,
            message.tp.partition,
            message.next_offset - 1,
            message.value,
            "untrainable",
            f"the model cannot train on these examples: {error}",
        )

    def _sync(self, final: bool) -> None:
        """Push a delta covering everything applied so far; then the applied offsets become
        committable. The last one also pushes the dense parameters, and gives up (committing
        nothing more) after `final_sync_timeout_s`; the others retry until they succeed or the
        trainer is stopped."""
        with self._lock:
            applied = dict(self._applied)
        try:
            if final:
                record = self.sync.sync(
                    dense=self._trained_since_dense,
                    deadline=time.monotonic() + self.config.final_sync_timeout_s,
                )
            else:
                record = self.sync.sync(cancel=self._stop)
        except SyncError as error:
            if final:
                self.report.final_sync_failed = True
                log.error("the last delta did not go out; its offsets stay uncommitted: %s", error)
            return
        if record is not None:
            self._published(record)
        covered = dict(self.start.offsets)
        with self._lock:
            for tp, (_, offset) in [*self._synced.items(), *applied.items()]:
                covered[tp] = max(offset, covered.get(tp, 0))
        self._save_state(covered)
        with self._lock:
            self._synced.update(applied)
        self._syncs += 1
        self._unsynced = False
        if record is not None and self.hooks.on_synced is not None:
            self.hooks.on_synced(record)

    def _published(self, record: SyncRecord) -> None:
        report = self.report
        if record.kind == "full":
            report.full_publishes += 1
        else:
            report.deltas += 1
            report.ids_deleted += record.deleted
        report.rows_pushed += record.rows
        if record.dense:
            report.dense_pushes += 1
            self._trained_since_dense = False
        report.version, report.delta = record.version, record.delta
        report.last_sync = record.to_dict()
        self._last_sync_wall = record.published_at

    def _save_state(self, offsets: dict[TopicPartition, int]) -> None:
        """Checkpoint the model as of the sync just made: where it stands in Redis, and the
        offsets that sync covers."""
        if self.config.state_path is None or self.sync.point is None:
            return
        online = self._state_entry(offsets, self.start.examples + self.report.examples)
        save_checkpoint(self.config.state_path, self.model, extra={STATE_KEY: online})

    def _state_entry(self, offsets: dict[TopicPartition, int], examples: int) -> dict[str, Any]:
        """The state checkpoint's `online` entry (see `StartingPoint.resume`)."""
        event_time = self.learner.event_time
        by_topic: dict[str, dict[str, int]] = {}
        for tp, offset in offsets.items():
            by_topic.setdefault(tp.topic, {})[str(tp.partition)] = offset
        return {
            "redis_model": self.report.redis_model,
            "version": self.sync.point.version,
            "delta": self.sync.point.delta,
            "publish_id": self.sync.point.publish_id,
            "event_time": event_time if math.isfinite(event_time) else None,
            "examples": examples,
            "offsets": by_topic,
        }


def _num_rows(message: _Message) -> int:
    return message.rows.num_rows if message.rows is not None else 0
