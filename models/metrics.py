"""Exact evaluation metrics: AUC and logloss over a whole split, recall@k and NDCG@k.

All take numpy arrays and compute in float64 on the complete set (no streaming approximation,
no binning), so they agree with scikit-learn to rounding.
"""

from __future__ import annotations

import numpy as np

from models.errors import MetricError


def _binary(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise MetricError(f"{len(labels)} labels for {len(scores)} scores; they must match")
    if len(labels) == 0:
        raise MetricError("no examples to evaluate")
    if not np.isin(labels, (0, 1)).all():
        raise MetricError("labels must be 0 or 1")
    return labels.astype(bool), scores


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic, tied scores counted one half."""
    positive, scores = _binary(labels, scores)
    n_positive = int(positive.sum())
    n_negative = len(positive) - n_positive
    if n_positive == 0 or n_negative == 0:
        raise MetricError(
            f"AUC needs both classes; got {n_positive} positives and {n_negative} negatives"
        )
    order = np.argsort(scores, kind="stable")
    _, inverse, counts = np.unique(scores[order], return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mid_ranks = ends - (counts - 1) / 2.0  # 1-based average rank of each group of ties
    positive_rank_sum = mid_ranks[inverse][positive[order]].sum()
    return float(
        (positive_rank_sum - n_positive * (n_positive + 1) / 2.0) / n_positive / n_negative
    )


def logloss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [eps, 1 - eps] like scikit-learn)."""
    positive, probabilities = _binary(labels, probabilities)
    eps = np.finfo(np.float64).eps
    probabilities = np.clip(probabilities, eps, 1.0 - eps)
    return float(-np.mean(np.where(positive, np.log(probabilities), np.log1p(-probabilities))))


def logloss_from_logits(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy from logits, exact even where sigmoid rounds to 0 or 1."""
    positive, logits = _binary(labels, logits)
    return float(np.mean(np.logaddexp(0.0, np.where(positive, -logits, logits))))


def hits(
    top_items: np.ndarray, relevant_rows: np.ndarray, relevant_items: np.ndarray
) -> np.ndarray:
    """[users, k] bool: whether each ranked item is relevant to its row's user.

    `relevant_rows[j]` is the row (user) of relevant item `relevant_items[j]`.
    """
    top_items = np.asarray(top_items, dtype=np.int64)
    users, _ = top_items.shape
    width = int(max(top_items.max(initial=0), np.max(relevant_items, initial=0))) + 1
    ranked_keys = np.arange(users, dtype=np.int64)[:, None] * width + top_items
    relevant_keys = np.asarray(relevant_rows, dtype=np.int64) * width + relevant_items
    return np.isin(ranked_keys, relevant_keys)


def recall_at_k(hit_matrix: np.ndarray, num_relevant: np.ndarray, k: int) -> float:
    """Mean over users with relevant items of |top-k ∩ relevant| / |relevant|."""
    hit_matrix, num_relevant = _ranking_inputs(hit_matrix, num_relevant, k)
    return float(np.mean(hit_matrix[:, :k].sum(axis=1) / num_relevant))


def ndcg_at_k(hit_matrix: np.ndarray, num_relevant: np.ndarray, k: int) -> float:
    """Mean binary NDCG@k: DCG of the hits over the DCG of an ideal ranking of min(k, |rel|)."""
    hit_matrix, num_relevant = _ranking_inputs(hit_matrix, num_relevant, k)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (hit_matrix[:, :k] * discounts).sum(axis=1)
    ideal = np.cumsum(discounts)[np.minimum(num_relevant, k) - 1]
    return float(np.mean(dcg / ideal))


def _ranking_inputs(
    hit_matrix: np.ndarray, num_relevant: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    hit_matrix = np.asarray(hit_matrix, dtype=bool)
    num_relevant = np.asarray(num_relevant, dtype=np.int64)
    if hit_matrix.ndim != 2 or len(num_relevant) != len(hit_matrix):
        raise MetricError(
            f"hits must be [users, k] with one relevant count per user; got {hit_matrix.shape} "
            f"and {num_relevant.shape}"
        )
    if not 1 <= k <= hit_matrix.shape[1]:
        raise MetricError(f"k must be in [1, {hit_matrix.shape[1]}] (the ranked depth), got {k}")
    keep = num_relevant > 0
    if not keep.any():
        raise MetricError("no user has a relevant item")
    return hit_matrix[keep], num_relevant[keep]
