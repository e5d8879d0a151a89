"""The streaming trainer's training thread: micro-batches, steps, delta syncs, state.

It takes the messages the consumer thread queued as micro-batches of whole messages, up to
`batch_size` examples, trains on them (`online_training.learner`) and every sync interval
pushes a delta (`online_training.sync`); after each sync the offsets it covers become
committable and the state checkpoint, if kept, is written (`online_training.trainer_state`).
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass

import pyarrow as pa
from kafka import TopicPartition

from embedding_tables.errors import EmbeddingTableError
from models.checkpoint import save_checkpoint
from models.errors import ModelError, NonFiniteLossError
from online_training import messages
from online_training.sync import SyncError, SyncRecord
from online_training.trainer_state import STATE_KEY, online_entry

log = logging.getLogger(__name__)

# Errors of a batch the model cannot read; raised before any update is applied.
UNTRAINABLE = (ModelError, EmbeddingTableError, pa.ArrowException)


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
class QueuedMessage:
    """One consumed message on its way to the training thread."""

    tp: TopicPartition
    next_offset: int
    epoch: int
    rows: pa.RecordBatch | None = None
    value: bytes | None = None


class TrainingThread:
    """The training thread's half of `Trainer`: takes queued messages as micro-batches, trains
    on them and pushes deltas. Its settings, learner, sync, report and the queue it shares with
    the consumer thread are the trainer's (`Trainer.__init__`)."""

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

    def _turn(self, taken: list[QueuedMessage]) -> Turn:
        return Turn(
            rows=any(message.rows is not None for message in taken),
            finished=self._finishing.is_set() and self._queue.empty(),
            sync_due=self.sync.due(),
            unsynced=self._unsynced or bool(taken),
            stopping=self._stop.is_set(),
        )

    def _take(self) -> list[QueuedMessage]:
        """Queued messages for one micro-batch: the first (none after 0.1 s), then more up to
        `batch_size` rows; while fewer than `min_batch_rows`, waiting for more up to
        `max_batch_wait_s` after the first (not when finishing or stopping)."""
        try:
            taken = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        rows = num_rows(taken[0])
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
            rows += num_rows(message)
        return taken

    def _apply(self, taken: list[QueuedMessage], turn: Turn) -> None:
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

    def _train(self, group: list[QueuedMessage]) -> None:
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

    def _dead_letter(self, message: QueuedMessage, error: Exception) -> None:
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
        online = online_entry(
            self.report.redis_model,
            self.sync.point,
            self.learner.event_time,
            offsets,
            self.start.examples + self.report.examples,
        )
        save_checkpoint(self.config.state_path, self.model, extra={STATE_KEY: online})


def num_rows(message: QueuedMessage) -> int:
    return message.rows.num_rows if message.rows is not None else 0
