"""Train a model on a stream of example batches, scoring each batch before training on it.

The stream is its own validation set (progressive validation): the logits of a batch's
training forward come before that batch's update, so they are the scores of a model that has
not seen those examples yet. Their AUC over consecutive windows of examples is what the trainer
shows live and what the streaming benchmark compares with a frozen model.

Time is event time: collisionless tables read their clock from the latest event time trained
on, so ids are admitted and expire by the stream's time, whatever the wall clock says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from feature_store.schema import Schema
from models.base import Model
from models.batches import Batch, batch_from_columns
from models.config import TrainConfig
from models.errors import BatchError, MetricError
from models.event_clock import EventClock
from models.metrics import auc
from models.train import dense_optimizer, train_step

LABEL = "label"
EVENT_TIME = "event_time"


@dataclass(frozen=True)
class AppliedBatch:
    """One trained batch: its rows, their labels and their scores before the update (None for
    a retrieval model, whose training forward scores pairs rather than examples)."""

    rows: pa.RecordBatch
    labels: np.ndarray
    scores: np.ndarray | None
    loss: float

    @property
    def size(self) -> int:
        return self.rows.num_rows


@dataclass
class WindowedAUC:
    """AUC over consecutive windows of `window` examples; a window with one class has none."""

    window: int
    aucs: list[float] = field(default_factory=list)
    _labels: list[np.ndarray] = field(default_factory=list)
    _scores: list[np.ndarray] = field(default_factory=list)
    _count: int = 0

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"an AUC window must hold >= 1 examples, got {self.window}")

    @property
    def last(self) -> float | None:
        """The AUC of the last full window with both classes (None before there is one)."""
        finite = [value for value in self.aucs if not math.isnan(value)]
        return finite[-1] if finite else None

    def add(self, labels: np.ndarray, scores: np.ndarray) -> None:
        start = 0
        while start < len(labels):
            take = min(self.window - self._count, len(labels) - start)
            self._labels.append(labels[start : start + take])
            self._scores.append(scores[start : start + take])
            self._count += take
            start += take
            if self._count == self.window:
                self._close()

    def _close(self) -> None:
        labels, scores = np.concatenate(self._labels), np.concatenate(self._scores)
        try:
            self.aucs.append(auc(labels, scores))
        except MetricError:
            self.aucs.append(math.nan)
        self._labels, self._scores, self._count = [], [], 0


def examples_batch(rows: pa.RecordBatch, schema: Schema) -> Batch:
    """The model batch of example rows (the schema's features, `label`, `event_time`)."""
    needed = [*(spec.name for spec in schema.features), LABEL, EVENT_TIME]
    missing = [name for name in needed if name not in rows.schema.names]
    if missing:
        raise BatchError(
            f"examples lack column(s) {', '.join(missing)}; this model reads {', '.join(needed)}"
        )
    columns = {spec.name: rows.column(spec.name) for spec in schema.features}
    columns[schema.label] = rows.column(LABEL)
    return batch_from_columns(columns, schema)


class OnlineLearner:
    """Applies example batches to a model: event clock, train step, progressive scores."""

    def __init__(
        self,
        model: Model,
        train: TrainConfig | None = None,
        *,
        auc_window: int = 10_000,
        event_time: float = -math.inf,
    ) -> None:
        self.model = model
        self.optimizer = dense_optimizer(model, train or TrainConfig())
        self.clock = EventClock(event_time)
        self.clock.attach(model)
        self.steps = 0
        self.examples = 0
        self.progressive = WindowedAUC(auc_window)
        self._scores: list[torch.Tensor] = []
        self._columns = [spec.name for spec in model.schema.features]

    @property
    def columns(self) -> list[str]:
        """The columns a batch needs: the model's features, `label` and `event_time`."""
        return [*self._columns, LABEL, EVENT_TIME]

    @property
    def event_time(self) -> float:
        """Event time of the newest example trained on (-inf before the first one)."""
        return self.clock.newest

    def apply(self, rows: pa.RecordBatch) -> AppliedBatch:
        """Train on `rows` (examples with the model's feature columns, `label`, `event_time`).

        Raises models' BatchError or embedding_tables' errors for rows the model cannot read
        (before any update), NonFiniteLossError for a step it refused to take.
        """
        batch = examples_batch(rows, self.model.schema)
        self.clock.advance(float(pc.max(rows.column(EVENT_TIME)).as_py()))
        self._scores.clear()
        # The hook lives for this step only, so that learners made one after another on the
        # same model (a trainer per replayed split) do not pile hooks up on it.
        hook = (
            self.model.register_forward_hook(self._keep_scores)
            if self.model.task == "ranking"
            else None
        )
        try:
            loss = train_step(self.model, batch, self.optimizer, self.steps + 1)
        finally:
            if hook is not None:
                hook.remove()
        self.steps += 1
        self.examples += rows.num_rows
        labels = batch.labels.numpy()
        scores = None
        if self._scores:
            scores = self._scores[-1].float().numpy()
            self.progressive.add(labels, scores)
        return AppliedBatch(rows=rows, labels=labels, scores=scores, loss=loss)

    def _keep_scores(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._scores.append(output.detach())
