"""The streaming trainer on N ranks: one sharded model, each rank reading its own partitions.

Each rank is a `Trainer` (its consumer thread, queue, dead letters, backpressure and offset
commits are the one-process trainer's) whose model is the same torchrec DistributedModelParallel
model (`models.distributed`), so the ranks' training threads move in lockstep: every turn they
agree (one all-reduce) on whether anyone has rows to train, whether a delta is due, and whether
everyone is done. A step is taken by all ranks at once; a rank with fewer rows pads its batch
with rows that read nothing (empty bags) and leaves them out of the loss, which is the mean over
the real rows of all ranks, so N ranks take the step one process would take on the union of
their batches. The embeddings are exchanged by torchrec's sharded modules (all-to-all), the
dense gradients by DDP; collisionless ids go to their owners. Deltas: `sharded_sync`.

Partitions: rank r reads partitions p with p % N == r of the examples topic, assigned rather
than balanced by the group protocol (ranks that step together live and die together, so the
group has nothing to rebalance), committing offsets as the consumer group `group_id`. A
restart, on any number of ranks, resumes from the group's committed offsets and from the state
checkpoint (a sharded checkpoint, see `models.sharded_checkpoint`), which records the next
offset of every partition its model covers: messages before those are skipped, not re-applied.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist
import torch.nn.functional as F
from kafka import KafkaConsumer, TopicPartition
from torchrec.distributed.model_parallel import DistributedModelParallel

from models.batch_slices import pad_batch
from models.batches import empty_batch
from models.config import TrainConfig
from models.distributed import DistributedConfig
from models.errors import NonFiniteLossError
from models.event_clock import EventClock
from models.rank_launch import launch, launched_by_torchrun, torchrun_rank
from models.sharded_checkpoint import dense_parameters, save_sharded
from models.sharding_plan import load_sharded_model
from online_training import messages
from online_training.kafka import KafkaSettings, Topics, make_consumer
from online_training.learner import EVENT_TIME, LABEL, AppliedBatch, WindowedAUC, examples_batch
from online_training.sharded_sync import ShardedParamSync
from online_training.trainer import Trainer
from online_training.trainer_config import TrainerConfig, TrainerConfigError
from online_training.trainer_state import STATE_KEY, StartingPoint, online_entry, state_entry
from online_training.training_thread import UNTRAINABLE, QueuedMessage, Turn
from serving.publisher import ParamPublisher
from serving.redis_nodes import RedisConfig, RedisNodes

NO_ROWS = pa.RecordBatch.from_pydict({})
PARTITIONS_TIMEOUT_S = 30.0


class ShardedLearner:
    """`OnlineLearner` for a sharded model: each `apply` is one step taken by every rank."""

    def __init__(
        self,
        dmp: DistributedModelParallel,
        train: TrainConfig,
        *,
        auc_window: int = 10_000,
        event_time: float = -math.inf,
    ) -> None:
        self.dmp = dmp
        self.schema = dmp.module.schema
        self.optimizer = torch.optim.Adam(
            dense_parameters(dmp).values(), lr=train.dense_lr, weight_decay=train.dense_weight_decay
        )
        # Every rank advances it by the newest event of all ranks: owners expire ids alike.
        self.clock = EventClock(event_time)
        self.clock.attach(dmp.module)
        self.steps = 0
        self.progressive = WindowedAUC(auc_window)
        self._features = [spec.name for spec in self.schema.features]

    @property
    def columns(self) -> list[str]:
        return [*self._features, LABEL, EVENT_TIME]

    @property
    def event_time(self) -> float:
        return self.clock.newest

    def check(self, rows: pa.RecordBatch) -> None:
        """Raise what a step on `rows` would (missing columns, ids out of range), before the
        step: one rank cannot leave a collective step half-way."""
        self.dmp.module.embeddings.check(examples_batch(rows, self.schema).sparse)

    def apply(self, rows: pa.RecordBatch) -> AppliedBatch:
        """One step of every rank; `rows` (checked) may be empty on some ranks. Raises
        NonFiniteLossError on every rank alike, before any update."""
        batch = examples_batch(rows, self.schema) if rows.num_rows else empty_batch(self.schema)
        newest = float(pc.max(rows.column(EVENT_TIME)).as_py()) if rows.num_rows else -math.inf
        shapes = [torch.zeros(2, dtype=torch.float64) for _ in range(dist.get_world_size())]
        dist.all_gather(shapes, torch.tensor([batch.size, newest], dtype=torch.float64))
        sizes = [int(shape[0]) for shape in shapes]
        self.clock.advance(max(float(shape[1]) for shape in shapes))
        padded = pad_batch(batch, max(sizes))
        self.dmp.train()
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.dmp(padded.sparse, padded.dense)[: batch.size]
        loss_sum = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="sum")
        total = loss_sum.detach().clone()
        dist.all_reduce(total)
        mean = float(total) / sum(sizes)
        self.steps += 1
        if not math.isfinite(mean):
            raise NonFiniteLossError(self.steps, mean)
        # DDP averages dense gradients over ranks and torchrec divides sparse ones by the world
        # size, so each rank's share of the global mean is scaled back up by it.
        (loss_sum * (dist.get_world_size() / sum(sizes))).backward()
        self.optimizer.step()
        labels = batch.labels.numpy()
        scores = logits.detach().float().numpy()
        self.progressive.add(labels, scores)
        return AppliedBatch(rows=rows, labels=labels, scores=scores, loss=mean)


class ShardedTrainer(Trainer):
    """One rank of the streaming trainer of a sharded model (see the module's docstring).

    `staging`: a directory every rank can write, for full publishes (`ShardedParamSync`).
    """

    learner_class = ShardedLearner

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: Topics,
        start: StartingPoint,
        publisher: ParamPublisher,
        config: TrainerConfig,
        staging: Path,
    ) -> None:
        self.staging = Path(staging)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.partitions: list[int] = []
        super().__init__(kafka, topics, start, publisher, config)

    def _make_sync(self, publisher: ParamPublisher) -> ShardedParamSync:
        return ShardedParamSync(publisher, self.model, self.config.sync, self.staging)

    def _join(self, consumer: KafkaConsumer) -> None:
        """Take partitions p % N == rank of the examples topic; those whose end marker was
        committed count as ended (no rebalance event tells of an assignment made here)."""
        partitions = topic_partitions(consumer, self.topics.examples)
        self.partitions = rank_partitions(partitions, self.rank, self.world_size)
        assigned = [TopicPartition(self.topics.examples, p) for p in self.partitions]
        consumer.assign(assigned)
        self._recall_ended(consumer, assigned)

    def _turn(self, taken: list[QueuedMessage]) -> Turn:
        """This rank's turn agreed with every other rank's: anyone's rows, due delta, pending
        changes or stop count for all; finished only when every rank is."""
        mine = super()._turn(taken)
        flags = torch.tensor(
            [mine.rows, not mine.finished, mine.sync_due, mine.unsynced, mine.stopping],
            dtype=torch.int32,
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        rows, unfinished, sync_due, unsynced, stopping = (bool(flag) for flag in flags)
        return Turn(rows, not unfinished, sync_due, unsynced, stopping)

    def _train(self, group: list[QueuedMessage]) -> None:
        """Check the group's rows (dead-lettering the messages the model cannot read), then
        take the step with every other rank."""
        readable = self._readable(group)
        self._step(messages.concat(readable) if readable else NO_ROWS)

    def _readable(self, group: list[QueuedMessage]) -> list[pa.RecordBatch]:
        if not group:
            return []
        try:
            rows = messages.concat([message.rows for message in group])
            self.learner.check(rows)
            return [rows]
        except UNTRAINABLE as error:
            if len(group) == 1:
                self._dead_letter(group[0], error)
                return []
        readable = []
        for message in group:
            try:
                self.learner.check(message.rows)
                readable.append(message.rows)
            except UNTRAINABLE as error:
                self._dead_letter(message, error)
        return readable

    def _save_state(self, offsets: dict[TopicPartition, int]) -> None:
        """Every rank saves its shards; the state records every rank's covered offsets and
        examples (collective)."""
        if self.config.state_path is None or self.sync.point is None:
            return
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, (offsets, self.report.examples))
        merged: dict[TopicPartition, int] = {}
        for part, _ in everyone:
            for tp, offset in part.items():
                merged[tp] = max(offset, merged.get(tp, 0))
        examples = sum(count for _, count in everyone)
        online = online_entry(
            self.report.redis_model,
            self.sync.point,
            self.learner.event_time,
            merged,
            self.start.examples + examples,
        )
        save_sharded(self.config.state_path, self.model, extra={STATE_KEY: online})


def topic_partitions(consumer: KafkaConsumer, topic: str) -> list[int]:
    """The partitions of `topic` (waiting for the broker's metadata)."""
    deadline = time.monotonic() + PARTITIONS_TIMEOUT_S
    while not (partitions := consumer.partitions_for_topic(topic)):
        if time.monotonic() > deadline:
            raise TrainerConfigError(f"topic {topic!r} has no partitions (does it exist?)")
        time.sleep(0.2)
    return sorted(partitions)


def rank_partitions(partitions: list[int], rank: int, world_size: int) -> list[int]:
    """The partitions rank `rank` of `world_size` reads: every world_size-th, from its rank."""
    if len(partitions) < world_size:
        raise TrainerConfigError(
            f"the examples topic has {len(partitions)} partition(s) for {world_size} ranks; each "
            "rank reads partitions of its own, accepted: ranks <= partitions"
        )
    return [p for p in partitions if p % world_size == rank]


def starting_point(
    checkpoint: str | Path | None,
    state_path: str | Path | None,
    redis_model: str,
    config: DistributedConfig,
) -> StartingPoint:
    """The sharded model a rank starts from (collective): the trainer's own state if it has
    one, else the sharded checkpoint (of `embtab train --nproc`, any number of ranks)."""
    if state_path is not None and Path(state_path).exists():
        dmp, manifest = load_sharded_model(state_path, config.sharding)
        return StartingPoint.from_state(dmp, state_entry(manifest, Path(state_path), redis_model))
    if checkpoint is None:
        raise TrainerConfigError(
            "a sharded streaming trainer starts from a sharded checkpoint (embtab train --nproc "
            "N) or its own state; neither was given"
        )
    dmp, manifest = load_sharded_model(checkpoint, config.sharding)
    return StartingPoint(model=dmp, origin_manifest=manifest)


@dataclass(frozen=True)
class ShardedStreamJob:
    """What every rank of a sharded streaming trainer needs (picklable: sent to spawned ranks).

    `redis`: the parameter shards (a URL or URLs, as `RedisConfig.parse` reads them).
    """

    kafka: KafkaSettings
    topics: Topics
    redis: str
    redis_model: str
    trainer: TrainerConfig
    distributed: DistributedConfig
    staging: str
    checkpoint: str | None = None


def stream_rank(job: ShardedStreamJob) -> dict[str, Any]:
    """One rank's run (inside an initialised process group): its report and partitions.
    SIGINT and SIGTERM make every rank stop reading, push a last delta and commit."""
    torch.set_num_threads(job.distributed.threads)
    start = starting_point(job.checkpoint, job.trainer.state_path, job.redis_model, job.distributed)
    nodes = RedisNodes(RedisConfig.parse(job.redis, socket_timeout_s=5.0, retries=0))
    publisher = ParamPublisher(nodes, job.redis_model)
    trainer = ShardedTrainer(
        job.kafka, job.topics, start, publisher, job.trainer, Path(job.staging)
    )
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
    report = trainer.run(stop)
    return {"rank": trainer.rank, "partitions": trainer.partitions, **report.to_dict()}


def train_stream_distributed(job: ShardedStreamJob) -> list[dict[str, Any]]:
    """Run the sharded streaming trainer on `job.distributed.world_size` ranks: spawned here,
    or, started by torchrun, as this process's rank. Every rank's report, in rank order (only
    this rank's under torchrun)."""
    consumer = make_consumer(job.kafka, None)
    try:
        rank_partitions(
            topic_partitions(consumer, job.topics.examples), 0, job.distributed.world_size
        )
    finally:
        consumer.close()
    Path(job.staging).mkdir(parents=True, exist_ok=True)
    if launched_by_torchrun():
        distributed = job.distributed
        return [torchrun_rank(stream_rank, (job,), distributed.world_size, distributed.timeout_s)]
    return launch(stream_rank, (job,), job.distributed.world_size, job.distributed.timeout_s)
