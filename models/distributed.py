"""Distributed batch training: torchrec's DistributedModelParallel over torch.distributed ranks.

The tables are sharded by torchrec's planner (`models.sharding_plan`), the dense part is wrapped
in DistributedDataParallel, and the ranks run as local processes or under torchrun
(`models.rank_launch`).

Data: every rank reads the same global batches (same shuffle seed) and trains on its 1/N slice
(`models.batch_slices`); losses are the mean over the global batch, so N ranks follow the loss
curve of one rank on the same data (dense gradients are averaged by DDP, sparse ones divided by
N by torchrec's all-to-all). A last batch smaller than the global batch is dropped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchrec.distributed.model_parallel import DistributedModelParallel

from embedding_tables.sharding import SHARDING_TYPES
from feature_store.offline import Dataset
from models.batch_slices import local_slice, slice_batch
from models.batches import Batch, BatchLoader
from models.build import ModelSpec, graphhash_mappings, plan_model
from models.config import RunConfig, to_dict
from models.errors import ModelConfigError, NonFiniteLossError
from models.event_clock import EventClock
from models.metrics import auc, logloss_from_logits
from models.rank_launch import launch, launched_by_torchrun, torchrun_rank
from models.sharded_checkpoint import dense_parameters, load_sharded, save_sharded
from models.sharding_plan import (
    build_sharded_model,
    plan_sharding,
    plan_summary,
    sharded_model_shell,
)
from models.train import EVAL_BATCH_SIZE


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
    dmp = build_sharded_model(spec, mappings, config.sharding, run.train.seed)
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
        return torchrun_rank(
            train_rank, (run, dataset, config, path, resume), config.world_size, config.timeout_s
        )
    results = launch(
        train_rank, (run, dataset, config, path, resume), config.world_size, config.timeout_s
    )
    return RankResult(**results[0])
