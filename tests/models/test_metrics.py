"""The metric code against scikit-learn (a test-only dependency) on random data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, ndcg_score, roc_auc_score

from models.errors import MetricError
from models.metrics import auc, hits, logloss, logloss_from_logits, ndcg_at_k, recall_at_k


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(2, 3000), levels=st.integers(2, 50))
def test_auc_matches_sklearn_with_and_without_ties(seed, rows, levels):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, rows)
    labels[:2] = (0, 1)
    tied_scores = rng.integers(0, levels, rows).astype(np.float32)
    continuous = rng.normal(size=rows)
    assert auc(labels, tied_scores) == pytest.approx(roc_auc_score(labels, tied_scores), abs=1e-12)
    assert auc(labels, continuous) == pytest.approx(roc_auc_score(labels, continuous), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 3000))
def test_logloss_matches_sklearn(seed, rows):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, rows)
    logits = rng.normal(0, 3, rows)
    probabilities = 1 / (1 + np.exp(-logits))
    expected = log_loss(labels, probabilities, labels=[0, 1])
    assert logloss(labels, probabilities) == pytest.approx(expected, rel=1e-9)
    assert logloss_from_logits(labels, logits) == pytest.approx(expected, rel=1e-9)


def test_logloss_from_logits_stays_exact_where_sigmoid_saturates():
    labels = np.array([1, 0])
    logits = np.array([-800.0, 800.0])
    assert logloss_from_logits(labels, logits) == pytest.approx(800.0)


@pytest.mark.parametrize("k", [1, 5, 10, 30])
def test_ndcg_matches_sklearn_and_recall_a_direct_count(k):
    rng = np.random.default_rng(k)
    users, items = 40, 30
    relevant = rng.random((users, items)) < 0.15
    relevant[:, 0] |= ~relevant.any(axis=1)
    scores = rng.random((users, items))
    ranked = np.argsort(-scores, axis=1)
    rows, columns = np.nonzero(relevant)
    matrix = hits(ranked, rows, columns)
    num_relevant = relevant.sum(axis=1)
    assert ndcg_at_k(matrix, num_relevant, k) == pytest.approx(
        ndcg_score(relevant, scores, k=k), abs=1e-12
    )
    direct = np.mean(
        [
            len(set(ranked[u, :k]) & set(np.flatnonzero(relevant[u]))) / relevant[u].sum()
            for u in range(users)
        ]
    )
    assert recall_at_k(matrix, num_relevant, k) == pytest.approx(direct, abs=1e-12)


def test_undefined_metrics_are_typed_errors():
    with pytest.raises(MetricError, match="both classes"):
        auc(np.ones(4), np.arange(4))
    with pytest.raises(MetricError, match="must match"):
        auc(np.array([0, 1]), np.arange(3))
    with pytest.raises(MetricError, match="k must be in"):
        recall_at_k(np.zeros((2, 3), bool), np.ones(2), 4)
