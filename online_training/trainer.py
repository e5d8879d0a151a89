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

This module is the run and the consumer thread; the training thread is
`online_training.training_thread`, the settings `trainer_config`, the reports `trainer_report`,
the state checkpoint `trainer_state`.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable

from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.errors import KafkaError

from online_training import messages
from online_training.batching import DeliveryError, Sender
from online_training.dead_letters import DeadLetters
from online_training.end_of_stream import ended_at_commit
from online_training.kafka import (
    KafkaSettings,
    RebalanceEvents,
    Topics,
    make_consumer,
    make_producer,
)
from online_training.learner import OnlineLearner
from online_training.sync import ParamSync, SyncError
from online_training.trainer_config import TrainerConfig, TrainerError, TrainerHooks
from online_training.trainer_report import TrainerReport, TrainerStatus
from online_training.trainer_state import StartingPoint
from online_training.training_thread import QueuedMessage, TrainingThread
from serving.publisher import ParamPublisher

log = logging.getLogger(__name__)

# What the trainer keeps of an example besides the model's columns: for hooks and freshness.
PASSTHROUGH_COLUMNS = ("request_id", "produced_at")


class Trainer(TrainingThread):
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
        self._queue: queue.SimpleQueue[QueuedMessage] = queue.SimpleQueue()
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
        self.dead_letters = DeadLetters(Sender(producer))
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
        message = QueuedMessage(tp, record.offset + 1, self._epoch)
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
        for event, partitions in self._rebalance.take():
            self._epoch += 1
            if event == "revoked":
                self.report.rebalances += bool(partitions)
                for tp in partitions:
                    self._ended.discard(tp.partition)
                    self._read.pop(tp, None)
            else:
                assigned = True
                self._recall_ended(consumer, partitions)
        return assigned

    def _recall_ended(self, consumer: KafkaConsumer, partitions: Iterable[TopicPartition]) -> None:
        """Count as ended the partitions whose end marker was read and committed before this
        run (`online_training.end_of_stream`): it is never read again."""
        if not self.config.stop_at_end:
            return
        kinds = {self.topics.examples: messages.EXAMPLES}
        for tp in ended_at_commit(self.kafka, consumer, partitions, kinds):
            log.info(
                "partition %d ended before this run (its end marker is committed)", tp.partition
            )
            self._ended.add(tp.partition)
            if tp.partition not in self.report.ended_partitions:
                self.report.ended_partitions.append(tp.partition)
