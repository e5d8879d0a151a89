"""The batch trainer: Parquet -> batches -> train_step, validation, early stopping, checkpoints.

Dense parameters are trained by Adam; the embedding tables by their own fused sparse optimizer
(row-wise Adagrad), which runs inside `loss.backward()`. The collection keeps table weights out
of `model.parameters()`, so Adam never sees them. `train_step` is the one step shared with the
streaming trainer; `fit` runs epochs over a prepared data set, evaluates the validation split
(exactly, on all of it) `evals_per_epoch` times per epoch, keeps the best state in the
checkpoint and stops after `patience` evaluations without improvement.
"""

from __future__ import annotations

import contextlib
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from feature_store.offline import Dataset
from models.base import Model
from models.batches import Batch, BatchLoader
from models.build import build_model, graphhash_mappings, plan_model
from models.checkpoint import load_state, read_tensors, save_checkpoint
from models.config import RunConfig, TrainConfig, TwoTowerConfig, to_dict
from models.errors import NonFiniteLossError
from models.event_clock import EventClock
from models.metrics import auc, logloss_from_logits
from models.retrieval import RetrievalEvaluator

EVAL_BATCH_SIZE = 16384


def seed_everything(seed: int) -> None:
    """Seed the generators the models and trainer draw from (init, dropout, negatives)."""
    random.seed(seed)
    torch.manual_seed(seed)


def dense_optimizer(model: Model, config: TrainConfig) -> torch.optim.Optimizer | None:
    """Adam over the dense parameters; None for a model that has none (matrix factorisation)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        return None
    return torch.optim.Adam(parameters, lr=config.dense_lr, weight_decay=config.dense_weight_decay)


def train_step(
    model: Model, batch: Batch, optimizer: torch.optim.Optimizer | None, step: int = 0
) -> float:
    """One update: loss, backward (which also updates the touched table rows), Adam step.

    A NaN or inf loss raises NonFiniteLossError before backward, so neither the tables nor the
    dense parameters take the bad step.
    """
    model.train()
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    loss = model.training_loss(batch)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(step, value)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    return value


@torch.no_grad()
def predict(model: Model, batches: Iterable[Batch]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, logits) of every example in `batches`."""
    was_training = model.training
    model.eval()
    labels, logits = [], []
    try:
        for batch in batches:
            logits.append(model(batch.sparse, batch.dense).float().cpu().numpy())
            labels.append(batch.labels.cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(labels), np.concatenate(logits)


def evaluate(model: Model, batches: Iterable[Batch]) -> dict[str, float]:
    """Exact AUC and logloss over all of `batches` (AUC only for a retriever's scores)."""
    labels, logits = predict(model, batches)
    metrics = {"auc": auc(labels, logits), "examples": float(len(labels))}
    if model.task == "ranking":
        metrics["logloss"] = logloss_from_logits(labels, logits)
    return metrics


def split_evaluator(
    model: Model, dataset: Dataset, split: str, config: TrainConfig
) -> Callable[[Model], dict[str, float]]:
    """A function model -> metrics of `split`; the retrieval part reads its data once."""
    loader = BatchLoader(
        dataset,
        split,
        model.schema,
        max(config.batch_size, EVAL_BATCH_SIZE),
        prefetch=config.prefetch,
        rows=config.eval_rows,
    )
    retrieval = None
    if isinstance(model.config, TwoTowerConfig):
        retrieval = RetrievalEvaluator(
            dataset, model.schema, split, model.config.ks, EVAL_BATCH_SIZE, config.eval_rows
        )

    def run(model: Model) -> dict[str, float]:
        metrics = evaluate(model, loader)
        if retrieval is not None:
            metrics.update(retrieval(model))
        return metrics

    return run


def target_metric(model: Model) -> str:
    """What early stopping maximises: AUC, or recall at the largest k for a retriever."""
    if isinstance(model.config, TwoTowerConfig):
        return f"recall@{max(model.config.ks)}"
    return "auc"


@dataclass
class FitResult:
    steps: int
    examples: int
    train_seconds: float
    stopped_early: bool
    best: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.train_seconds if self.train_seconds else 0.0


def fit(
    model: Model,
    dataset: Dataset,
    config: TrainConfig,
    checkpoint: str | Path | None = None,
    *,
    extra_manifest: dict | None = None,
    progress: bool = True,
) -> FitResult:
    """Train with early stopping on the validation metric; the model ends in its best state.

    Each improvement is saved to `checkpoint` (a temporary file if None), so a crash or a NaN
    leaves the last good state on disk.
    """
    loader = BatchLoader(
        dataset,
        "train",
        model.schema,
        config.batch_size,
        shuffle=config.shuffle,
        seed=config.seed,
        prefetch=config.prefetch,
        rows=config.train_rows,
    )
    total_steps = len(loader) * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    with contextlib.ExitStack() as stack:
        if checkpoint is None:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="embtab-")))
            checkpoint = scratch / "best.safetensors"
        bar = stack.enter_context(
            tqdm(
                total=total_steps,
                desc=f"train {model.config.name}",
                unit="step",
                disable=not progress,
                leave=False,
            )
        )
        run = _Fit(
            model=model,
            config=config,
            optimizer=dense_optimizer(model, config),
            validate=split_evaluator(model, dataset, "valid", config),
            metric=target_metric(model),
            checkpoint=Path(checkpoint),
            manifest=extra_manifest or {},
            bar=bar,
            steps_per_epoch=len(loader),
            total_steps=total_steps,
        )
        run.clock.attach(model)
        for epoch in range(config.epochs):
            with contextlib.closing(iter(loader)) as batches:
                run.epoch(epoch, batches)
            if run.finished:
                break
        if run.best and run.best["step"] != run.steps:
            load_state(model, read_tensors(checkpoint), str(checkpoint))
    return FitResult(
        steps=run.steps,
        examples=run.examples,
        train_seconds=run.train_seconds,
        stopped_early=run.bad >= config.patience,
        best=run.best,
        history=run.history,
    )


@dataclass
class _Fit:
    """The state of one `fit`: counters, the best evaluation, and the step/eval loop."""

    model: Model
    config: TrainConfig
    optimizer: torch.optim.Optimizer | None
    validate: Callable[[Model], dict[str, float]]
    metric: str
    checkpoint: Path
    manifest: dict
    bar: tqdm
    steps_per_epoch: int
    total_steps: int
    steps: int = 0
    examples: int = 0
    train_seconds: float = 0.0
    loss: float = math.nan
    best_value: float = -math.inf
    best: dict[str, Any] = field(default_factory=dict)
    bad: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    clock: EventClock = field(default_factory=EventClock)

    @property
    def finished(self) -> bool:
        return self.steps >= self.total_steps or self.bad >= self.config.patience

    def epoch(self, epoch: int, batches: Iterable[Batch]) -> None:
        evals = self.config.evals_per_epoch
        eval_points = {max(1, round(self.steps_per_epoch * (j + 1) / evals)) for j in range(evals)}
        started = time.perf_counter()
        for index, batch in enumerate(batches, start=1):
            if batch.newest_event_time is not None:
                self.clock.advance(batch.newest_event_time)
            loss = train_step(self.model, batch, self.optimizer, self.steps + 1)
            self.steps += 1
            self.examples += batch.size
            self.loss = loss if math.isnan(self.loss) else 0.98 * self.loss + 0.02 * loss
            self.bar.update(1)
            self._show()
            if index in eval_points or self.steps >= self.total_steps:
                self.train_seconds += time.perf_counter() - started
                self._evaluate(round(epoch + index / self.steps_per_epoch, 3))
                started = time.perf_counter()
            if self.finished:
                return
        self.train_seconds += time.perf_counter() - started

    def _evaluate(self, epoch: float) -> None:
        metrics = self.validate(self.model)
        record = {"step": self.steps, "epoch": epoch, "train_loss": self.loss, **metrics}
        self.history.append(record)
        if metrics[self.metric] > self.best_value:
            self.best_value, self.best, self.bad = metrics[self.metric], record, 0
            save_checkpoint(
                self.checkpoint,
                self.model,
                metrics={"valid": metrics},
                extra={**self.manifest, "history": self.history},
            )
        else:
            self.bad += 1
        self._show()

    def _show(self) -> None:
        shown = f"loss {self.loss:.4f}"
        if self.best:
            shown += f" best valid {self.metric} {self.best_value:.4f}"
        self.bar.set_postfix_str(shown)


@dataclass
class TrainResult:
    model: Model
    fit: FitResult
    valid: dict[str, Any]
    test: dict[str, float]
    checkpoint: Path | None


def train(
    run: RunConfig,
    dataset: Dataset,
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Plan (every config error surfaces here, before data is read), build, fit, test.

    The checkpoint ends with the best validation state and both splits' metrics.
    """
    spec = plan_model(run, dataset.schema, dataset.preprocessor())
    if run.train.threads is not None:
        torch.set_num_threads(run.train.threads)
    seed_everything(run.train.seed)
    model = build_model(spec, graphhash_mappings(spec, dataset, run.train.seed))
    manifest = {"run": to_dict(run), "dataset": dataset.name}
    result = fit(model, dataset, run.train, checkpoint, extra_manifest=manifest, progress=progress)
    test = split_evaluator(model, dataset, "test", run.train)(model)
    valid = {key: value for key, value in result.best.items()}
    if checkpoint is not None:
        save_checkpoint(
            checkpoint,
            model,
            metrics={"valid": valid, "test": test},
            extra={**manifest, "history": result.history},
        )
    return TrainResult(
        model=model,
        fit=result,
        valid=valid,
        test=test,
        checkpoint=None if checkpoint is None else Path(checkpoint),
    )
