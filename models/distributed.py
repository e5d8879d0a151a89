"""Distributed batch training: torchrec's DistributedModelParallel over torch.distributed ranks.

The physical tables of every static method sit in torchrec modules
(`embedding_tables.sharding.ShardableEmbeddingCollection`) that torchrec's planner shards
(table-wise, row-wise, column-wise, table-column-wise) and DistributedModelParallel replaces by
their sharded versions; the dense part is wrapped in DistributedDataParallel. The index
transforms run in embtab before the sharded lookup, so a model never knows it is sharded.
Collisionless tables are owned by rank by hash (`embedding_tables.sharded_collisionless`).

Data: every rank reads the same global batches (same shuffle seed) and trains on its 1/N slice;
losses are the mean over the global batch, so N ranks follow the loss curve of one rank on the
same data (dense gradients are averaged by DDP, sparse ones divided by N by torchrec's
all-to-all). A last batch smaller than the global batch is dropped. Tables start from the same
seeded rows whatever the world size (`ShardableEmbeddingCollection.initial_rows`).

Failure: `launch` runs the ranks as processes (torch.multiprocessing, loopback TCP rendezvous,
gloo on CPU); every collective has the `timeout_s` of `init_process_group`, and when a rank dies
the launcher stops the others and raises RankFailedError naming it, within the timeout.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError
from torchrec.distributed.types import ShardingPlan
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embedding_tables.planning import TBE_DIM_MULTIPLE
from embedding_tables.sharding import (
    SHARDING_TYPES,
    ShardableEmbeddingCollection,
    sharders,
    torchrec_name,
)
from feature_store.offline import Dataset
from models.batches import Batch, BatchLoader
from models.build import MODEL_CLASSES, ModelSpec, graphhash_mappings, plan_model
from models.checkpoint import GRAPHHASH_PREFIX, graphhash_from_tensors, spec_from_manifest
from models.config import RunConfig, to_dict
from models.errors import ModelConfigError, NonFiniteLossError
from models.event_clock import EventClock
from models.metrics import auc, logloss_from_logits
from models.sharded_checkpoint import (
    SHARDED_PREFIXES,
    ShardedCheckpoint,
    dense_parameters,
    load_sharded,
    save_sharded,
)
from models.train import EVAL_BATCH_SIZE, seed_everything

# Ranking models whose only sparse input is pooled lookups (DIN reads unpooled sequences, the
# retrievers train on a ranking loss over in-batch negatives: neither is sharded yet).
DISTRIBUTED_MODELS = ("lr", "dlrm", "dcn", "deepfm")
# Data parallel is left out unless asked for: its tables would be trained by the dense
# optimizer, not by the fused row-wise Adagrad every other path uses.
DEFAULT_SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_column_wise")
MAX_COLUMN_SHARD = 128


class DistributedError(RuntimeError):
    """Distributed training that could not run: a rank died, timed out, or could not start (a
    failure of the run, not of its input: bad settings are ModelConfigError)."""


class RankFailedError(DistributedError):
    """A rank exited with an error or was killed; the other ranks were stopped."""


class ShardingPlanError(ModelConfigError):
    """torchrec's planner found no placement for a table under the given world size and types."""


@dataclass(frozen=True)
class DistributedConfig:
    """How to spread training: `world_size` ranks, each with `threads` torch threads;
    `sharding` pins physical tables (e.g. `item_id.r`) to a sharding type, the rest are the
    planner's choice among DEFAULT_SHARDING_TYPES; `timeout_s` bounds every collective and the
    rendezvous; `checkpoint_every` saves a sharded checkpoint every that many steps."""

    world_size: int = 2
    threads: int = 1
    sharding: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 120.0
    checkpoint_every: int | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ModelConfigError(f"world_size must be >= 1, got {self.world_size}")
        if self.threads < 1:
            raise ModelConfigError(f"threads must be >= 1, got {self.threads}")
        if not self.timeout_s > 0:
            raise ModelConfigError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ModelConfigError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        bad = {t: kind for t, kind in self.sharding.items() if kind not in SHARDING_TYPES}
        if bad:
            raise ModelConfigError(
                f"unknown sharding type(s) {bad}; accepted: {', '.join(SHARDING_TYPES)}"
            )


# ---- planning and building ----------------------------------------------------------------


def plan_sharding(
    model: nn.Module,
    world_size: int,
    sharding: Mapping[str, str],
    spec: ModelSpec,
    group: dist.ProcessGroup | None = None,
    compute_device: str = "cpu",
    topology: Topology | None = None,
) -> ShardingPlan:
    """torchrec's plan for `model`'s tables; with `group`, planned on rank 0 and broadcast."""
    collection: ShardableEmbeddingCollection = model.embeddings
    physical = {table.name: table for table in collection.physical_tables()}
    unknown = sorted(set(sharding) - set(physical))
    if unknown:
        raise ShardingPlanError(
            f"sharding names unknown physical table(s) {unknown}; accepted: {', '.join(physical)}"
        )
    constraints = {
        torchrec_name(name): ParameterConstraints(
            sharding_types=[sharding[name]] if name in sharding else list(DEFAULT_SHARDING_TYPES),
            min_partition=column_shard_width(table.dim),
        )
        for name, table in physical.items()
    }
    planner = EmbeddingShardingPlanner(
        topology=topology or Topology(world_size=world_size, compute_device=compute_device),
        constraints=constraints,
    )
    table_sharders = sharders(spec.sparse_optimizer)
    try:
        if group is None:
            return planner.plan(model, table_sharders)
        return planner.collective_plan(model, table_sharders, group)
    except (PlannerError, RuntimeError, ValueError) as error:
        raise ShardingPlanError(
            f"torchrec's planner cannot shard tables {list(physical)} over {world_size} rank(s) "
            f"with sharding {dict(sharding) or 'of its choice'}: {str(error).splitlines()[0]}"
        ) from error


def column_shard_width(dim: int) -> int:
    """The narrowest column shard the planner may cut: half a row (so small test tables can
    be split in two) but at least TBE's 4 columns and at most torchrec's usual 128."""
    return min(MAX_COLUMN_SHARD, max(TBE_DIM_MULTIPLE, dim // 2))


def sharded_model_shell(
    spec: ModelSpec,
    mappings: Mapping[str, nn.Module],
    group: dist.ProcessGroup | None = None,
) -> nn.Module:
    """The model with its tables on the meta device (nothing allocated), ready to be planned;
    with `group`, its collisionless tables are built, owned by the group's ranks."""
    if spec.model.name not in DISTRIBUTED_MODELS:
        raise ModelConfigError(
            f"model {spec.model.name!r} is not trained distributed; accepted: "
            f"{', '.join(DISTRIBUTED_MODELS)}"
        )
    embeddings = ShardableEmbeddingCollection(
        list(spec.tables),
        spec.feature_to_table,
        mappings,
        device="meta",
        optimizer=spec.sparse_optimizer,
        group=group,
    )
    model = MODEL_CLASSES[spec.model.name](spec.model, spec.schema, embeddings)
    model.spec = spec
    return model


def build_sharded_model(
    spec: ModelSpec,
    mappings: Mapping[str, nn.Module],
    config: DistributedConfig,
    seed: int,
) -> DistributedModelParallel:
    """The model sharded over the default process group, tables at their seeded initial rows."""
    seed_everything(seed)
    model = sharded_model_shell(spec, mappings, dist.GroupMember.WORLD)
    plan = plan_sharding(
        model, dist.get_world_size(), config.sharding, spec, group=dist.GroupMember.WORLD
    )
    dmp = DistributedModelParallel(
        model, device=torch.device("cpu"), plan=plan, sharders=sharders(spec.sparse_optimizer)
    )
    collection: ShardableEmbeddingCollection = dmp.module.embeddings
    names = {torchrec_name(table.name): table.name for table in collection.physical_tables()}
    with torch.no_grad():
        for key, value in dmp.state_dict().items():
            table = table_key(key)
            if table is None:
                continue
            rows = collection.initial_rows(names[table], seed)
            for shard in value.local_shards():
                (row, column), (count, width) = shard.metadata.shard_offsets, shard.tensor.shape
                shard.tensor.copy_(rows[row : row + count, column : column + width])
    return dmp


def load_sharded_model(
    path: str | Path, config: DistributedConfig
) -> tuple[DistributedModelParallel, dict[str, Any]]:
    """A sharded checkpoint written by any number of ranks, as the model sharded over the
    default process group (collective); and the checkpoint's manifest."""
    checkpoint = ShardedCheckpoint(path)
    manifest = checkpoint.manifest
    spec = spec_from_manifest(manifest)
    mapping_tensors = {
        key: checkpoint.full(key) for key in checkpoint.shapes if key.startswith(GRAPHHASH_PREFIX)
    }
    mappings = graphhash_from_tensors(manifest, mapping_tensors, str(path))
    dmp = build_sharded_model(spec, mappings, config, seed=0)
    load_sharded(dmp, path)
    return dmp, manifest


def table_key(key: str) -> str | None:
    """The torchrec table name of a state_dict key of a table weight, else None."""
    for prefix in SHARDED_PREFIXES:
        if key.startswith(prefix) and key.endswith(".weight"):
            return key[len(prefix) : -len(".weight")]
    return None


def plan_summary(dmp: DistributedModelParallel) -> dict[str, dict[str, Any]]:
    """Per torchrec table: its sharding type and the ranks/offsets/sizes of its shards."""
    summary = {}
    for module_plan in dmp.plan.plan.values():
        for table, parameter in module_plan.items():
            shards = parameter.sharding_spec.shards if parameter.sharding_spec else []
            summary[table] = {
                "sharding_type": parameter.sharding_type,
                "ranks": parameter.ranks,
                "shards": [
                    {
                        "rank": shard.placement.rank(),
                        "offsets": shard.shard_offsets,
                        "sizes": shard.shard_sizes,
                    }
                    for shard in shards
                ],
            }
    return summary


# ---- one rank's training --------------------------------------------------------------------


def local_slice(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rows [rank * B / N, (rank + 1) * B / N) of a batch (B divisible by N)."""
    size = batch.size // world_size
    return slice_batch(batch, rank * size, (rank + 1) * size)


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Rows [start, stop) of a batch."""
    return Batch(
        sparse=_slice_kjt(batch.sparse, start, stop),
        dense=batch.dense[start:stop],
        labels=None if batch.labels is None else batch.labels[start:stop],
    )


def pad_batch(batch: Batch, size: int) -> Batch:
    """`batch` followed by rows that read nothing (empty bags, zero dense features, label 0) up
    to `size` rows: ranks with fewer rows than others take part in a step of the same shape, and
    leave the padding out of their loss."""
    extra = size - batch.size
    if extra < 0:
        raise ModelConfigError(f"cannot pad a batch of {batch.size} rows to {size}")
    keys = batch.sparse.keys()
    lengths = batch.sparse.lengths().view(len(keys), -1)
    padding = torch.zeros(len(keys), extra, dtype=lengths.dtype)
    return Batch(
        sparse=KeyedJaggedTensor(
            keys=keys,
            values=batch.sparse.values(),
            lengths=torch.cat([lengths, padding], dim=1).flatten(),
            stride=size,
        ),
        dense=torch.cat([batch.dense, batch.dense.new_zeros(extra, batch.dense.shape[1])]),
        labels=None
        if batch.labels is None
        else torch.cat([batch.labels, batch.labels.new_zeros(extra)]),
        newest_event_time=batch.newest_event_time,
    )


def _slice_kjt(kjt: KeyedJaggedTensor, start: int, stop: int) -> KeyedJaggedTensor:
    """Rows [start, stop) of every feature of a KJT."""
    keys = kjt.keys()
    lengths = kjt.lengths().view(len(keys), -1)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.flatten().cumsum(0)])
    stride = lengths.shape[1]
    values = [
        kjt.values()[offsets[k * stride + start] : offsets[k * stride + stop]]
        for k in range(len(keys))
    ]
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.cat(values),
        lengths=lengths[:, start:stop].flatten(),
        stride=stop - start,
    )


@dataclass
class RankResult:
    """What rank 0 reports: the global loss per step, throughput, metrics, the plan."""

    losses: list[float]
    examples: int
    train_seconds: float
    valid: dict[str, float]
    plan: dict[str, dict[str, Any]]
    world_size: int
    start_step: int
    checkpoint: str | None

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.train_seconds if self.train_seconds else 0.0


def train_rank(
    run: RunConfig,
    dataset: Dataset,
    config: DistributedConfig,
    checkpoint: Path | None,
    resume: bool = False,
) -> RankResult:
    """One rank's part of a distributed run (inside an initialised process group): build,
    optionally resume from `checkpoint` (any world size), train, evaluate, save."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(config.threads)
    if run.train.batch_size % world:
        raise ModelConfigError(
            f"train.batch_size {run.train.batch_size} is not divisible by {world} ranks; "
            "accepted: a multiple of the world size"
        )
    spec = plan_model(run, dataset.schema)
    mappings = graphhash_mappings(spec, dataset, run.train.seed)
    dmp = build_sharded_model(spec, mappings, config, run.train.seed)
    clock = EventClock()  # every rank advances it by the same global batches
    clock.attach(dmp.module)
    optimizer = torch.optim.Adam(
        dense_parameters(dmp).values(),
        lr=run.train.dense_lr,
        weight_decay=run.train.dense_weight_decay,
    )
    start_step = 0
    if resume and checkpoint is not None and checkpoint.exists():
        start_step = int(load_sharded(dmp, checkpoint, optimizer).get("step", 0))
    loader = BatchLoader(
        dataset,
        "train",
        spec.schema,
        run.train.batch_size,
        shuffle=run.train.shuffle,
        seed=run.train.seed,
        prefetch=run.train.prefetch,
        rows=run.train.train_rows,
    )
    total = len(loader) * run.train.epochs
    if run.train.max_steps is not None:
        total = min(total, run.train.max_steps)
    losses: list[float] = []
    examples, seconds, step = 0, 0.0, 0
    extra = {"run": to_dict(run), "dataset": dataset.name}
    for batch in _global_batches(loader, run.train.epochs, run.train.batch_size):
        if step >= total:
            break
        step += 1
        if batch.newest_event_time is not None:
            clock.advance(batch.newest_event_time)
        if step <= start_step:
            continue  # replayed to the checkpoint's position: same order, no update
        started = time.perf_counter()
        loss = _train_step(dmp, optimizer, local_slice(batch, rank, world), step)
        seconds += time.perf_counter() - started
        examples += batch.size
        losses.append(loss)
        if config.checkpoint_every and step % config.checkpoint_every == 0 and checkpoint:
            save_sharded(checkpoint, dmp, optimizer, {**extra, "step": step})
    valid = _evaluate(dmp, dataset, spec, run)
    if checkpoint is not None:
        save_sharded(
            checkpoint, dmp, optimizer, {**extra, "step": step, "metrics": {"valid": valid}}
        )
    return RankResult(
        losses=losses,
        examples=examples,
        train_seconds=seconds,
        valid=valid,
        plan=plan_summary(dmp),
        world_size=world,
        start_step=start_step,
        checkpoint=None if checkpoint is None else str(checkpoint),
    )


def _global_batches(loader: BatchLoader, epochs: int, batch_size: int) -> Iterator[Batch]:
    for _ in range(epochs):
        for batch in loader:
            if batch.size == batch_size:
                yield batch


def _train_step(
    dmp: DistributedModelParallel, optimizer: torch.optim.Optimizer, batch: Batch, step: int
) -> float:
    """One update on this rank's slice; returns the global batch's mean loss."""
    dmp.train()
    optimizer.zero_grad(set_to_none=True)
    logits = dmp(batch.sparse, batch.dense)
    loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
    total = loss.detach().clone()
    dist.all_reduce(total)
    value = float(total) / dist.get_world_size()
    if not math.isfinite(value):
        raise NonFiniteLossError(step, value)
    loss.backward()
    optimizer.step()
    return value


@torch.no_grad()
def _evaluate(
    dmp: DistributedModelParallel, dataset: Dataset, spec: ModelSpec, run: RunConfig
) -> dict[str, float]:
    """AUC and logloss on the validation split: each rank scores its slice of each batch (the
    split's last batch is cut to a multiple of the world size), rank 0 gathers them."""
    rank, world = dist.get_rank(), dist.get_world_size()
    size = max(run.train.batch_size, EVAL_BATCH_SIZE) // world * world
    loader = BatchLoader(dataset, "valid", spec.schema, size, rows=run.train.eval_rows)
    dmp.eval()
    labels, logits = [], []
    for batch in loader:
        usable = batch.size // world * world
        if usable == 0:
            continue
        local = local_slice(slice_batch(batch, 0, usable), rank, world)
        logits.append(dmp(local.sparse, local.dense).float())
        labels.append(local.labels)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (torch.cat(labels).numpy(), torch.cat(logits).numpy()))
    all_labels = np.concatenate([part[0] for part in gathered])
    all_logits = np.concatenate([part[1] for part in gathered])
    return {
        "auc": auc(all_labels, all_logits),
        "logloss": logloss_from_logits(all_labels, all_logits),
        "examples": float(len(all_labels)),
    }


# ---- launching ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    timeout_s: float,
    target: Callable[..., Any],
    args: tuple,
    results: str,
) -> None:
    """A spawned rank: join the group (bounded by timeout_s), run target, write its result, or
    its error for the launcher to report."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        result = target(*args)
        Path(results, f"rank-{rank}.json").write_text(json.dumps(_jsonable(result)))
    except BaseException as error:
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        Path(results, f"rank-{rank}.error").write_text(f"{type(error).__name__}: {first_line}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _jsonable(result: Any) -> Any:
    return result.__dict__ if isinstance(result, RankResult) else result


def launch(target: Callable[..., Any], args: tuple, world_size: int, timeout_s: float) -> list[Any]:
    """Run `target(*args)` on `world_size` spawned ranks in one gloo group on loopback; the
    JSON results of every rank, in rank order. A rank that raises or dies stops the others and
    raises RankFailedError naming every failed rank and why, the first to fail first."""
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="embtab-ranks-") as results:
        port = free_port()
        processes = [
            context.Process(
                target=_rank_main,
                args=(rank, world_size, port, timeout_s, target, args, results),
                daemon=False,
            )
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        try:
            _wait(processes, timeout_s, Path(results))
        finally:
            for process in processes:
                if process.is_alive():
                    process.kill()
                process.join(5)
        return [
            json.loads(Path(results, f"rank-{rank}.json").read_text()) for rank in range(world_size)
        ]


# How long the other ranks get to fail by themselves (and say why) once one rank has failed.
SETTLE_SECONDS = 3.0


def _wait(processes: list[mp.Process], timeout_s: float, results: Path) -> None:
    """Until all exit 0. On the first failure the others get SETTLE_SECONDS to stop (gloo
    fails their pending collectives at once), then are killed; RankFailedError says why each
    failed. Ranks still running timeout_s + SETTLE_SECONDS after another finished are killed."""
    first_exit: float | None = None
    while True:
        codes = [process.exitcode for process in processes]
        if any(code not in (None, 0) for code in codes):
            deadline = time.monotonic() + SETTLE_SECONDS
            while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
                time.sleep(0.05)
            for process in processes:
                if process.is_alive():
                    process.kill()
                process.join(5)
            raise RankFailedError(_failure_report(processes, results))
        if all(code == 0 for code in codes):
            return
        if any(code == 0 for code in codes):
            first_exit = first_exit or time.monotonic()
            if time.monotonic() - first_exit > timeout_s + SETTLE_SECONDS:
                stuck = [rank for rank, code in enumerate(codes) if code is None]
                for process in processes:
                    process.kill()
                raise RankFailedError(
                    f"rank(s) {stuck} of {len(processes)} still running "
                    f"{timeout_s + SETTLE_SECONDS:.0f} s after the others finished; killed"
                )
        time.sleep(0.1)


def _failure_report(processes: list[mp.Process], results: Path) -> str:
    """Every failed rank and why; a rank killed by a signal (it could write nothing) or the
    earliest written error first, since the others' errors follow from it."""
    failures = []
    for rank, process in enumerate(processes):
        error = results / f"rank-{rank}.error"
        if error.exists():
            failures.append((error.stat().st_mtime, f"rank {rank}: {error.read_text()}"))
        elif process.exitcode is not None and process.exitcode < 0:
            failures.append((0.0, f"rank {rank}: killed by signal {-process.exitcode}"))
        elif process.exitcode not in (None, 0):
            failures.append((0.0, f"rank {rank}: exited with status {process.exitcode}"))
    failures.sort()
    return (
        f"{len(failures)} of {len(processes)} ranks failed; the others were stopped: "
        + "; ".join(text for _, text in failures)
    )


def train_distributed(
    run: RunConfig,
    dataset: Dataset,
    config: DistributedConfig,
    checkpoint: str | Path | None = None,
    resume: bool = False,
) -> RankResult:
    """Train on `config.world_size` ranks; this rank's result (every rank sees the same global
    losses). Config errors surface here, before any process starts.

    Started by torchrun (one process per rank, on one host or many), this process is one rank
    of torchrun's group (env:// rendezvous); otherwise it spawns `world_size` local ranks."""
    spec = plan_model(run, dataset.schema)
    shell = sharded_model_shell(spec, graphhash_mappings(spec, dataset, run.train.seed))
    plan_sharding(shell, config.world_size, config.sharding, spec)
    if run.train.batch_size % config.world_size:
        raise ModelConfigError(
            f"train.batch_size {run.train.batch_size} is not divisible by {config.world_size} "
            "ranks; accepted: a multiple of the world size"
        )
    path = None if checkpoint is None else Path(checkpoint)
    if launched_by_torchrun():
        return torchrun_rank(train_rank, (run, dataset, config, path, resume), config)
    results = launch(
        train_rank, (run, dataset, config, path, resume), config.world_size, config.timeout_s
    )
    return RankResult(**results[0])


def launched_by_torchrun() -> bool:
    """Whether this process is a rank started by torchrun (torch.distributed.run)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def torchrun_rank(target: Callable[..., Any], args: tuple, config: DistributedConfig) -> Any:
    """Run `target(*args)` as this process's rank of torchrun's group (env:// rendezvous)."""
    world = int(os.environ["WORLD_SIZE"])
    if world != config.world_size:
        raise ModelConfigError(
            f"torchrun started {world} ranks but {config.world_size} were asked for; accepted: "
            "the same number (--nproc equal to torchrun's nnodes x nproc-per-node)"
        )
    dist.init_process_group(
        "gloo", init_method="env://", timeout=datetime.timedelta(seconds=config.timeout_s)
    )
    try:
        return target(*args)
    finally:
        dist.destroy_process_group()
