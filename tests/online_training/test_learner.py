"""The online learner: progressive scores come before each update; windows of AUC."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.batches import batch_from_columns
from models.errors import BatchError
from online_training.learner import OnlineLearner, WindowedAUC
from tests.online_training.example_stream import example_rows, small_model


def test_a_batch_is_scored_by_the_model_before_it_trains_on_it(movielens):
    model = small_model(movielens)
    rows = example_rows(movielens, 512)
    columns = {name: rows.column(name) for name in model.sparse_features + model.dense_features}
    batch = batch_from_columns(columns, model.schema, with_labels=False)
    with torch.no_grad():
        before = model.eval()(batch.sparse, batch.dense).numpy()

    learner = OnlineLearner(model, auc_window=256)
    first = learner.apply(rows)
    assert np.allclose(first.scores, before, atol=1e-6)
    assert np.array_equal(first.labels, rows.column("label").to_numpy())
    assert learner.event_time == rows.column("event_time").to_numpy().max()
    assert len(learner.progressive.aucs) == 2
    second = learner.apply(rows)
    assert not np.allclose(second.scores, before, atol=1e-4), "the first step changed the model"
    OnlineLearner(model).apply(rows)
    assert not model._forward_hooks, "no hook outlives its step"


def test_rows_without_the_models_columns_are_refused_before_any_update(movielens):
    learner = OnlineLearner(small_model(movielens))
    with pytest.raises(BatchError, match="lack column.*genres"):
        learner.apply(example_rows(movielens, 10).drop_columns(["genres"]))
    assert learner.steps == 0


def test_windowed_auc_scores_consecutive_windows():
    windows = WindowedAUC(window=4)
    windows.add(np.array([0, 1, 0]), np.array([0.1, 0.9, 0.2]))
    assert windows.aucs == [] and windows.last is None
    windows.add(np.array([1, 1, 1, 0, 0]), np.array([0.8, 0.1, 0.2, 0.3, 0.4]))
    assert windows.aucs == [1.0, 0.0] and windows.last == 0.0
    windows.add(np.array([1]), np.array([0.5]))
    windows.add(np.ones(4, dtype=int), np.zeros(4))
    assert len(windows.aucs) == 3 and np.isnan(windows.aucs[2]) and windows.last == 0.0
