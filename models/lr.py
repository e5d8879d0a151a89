"""Logistic regression on the same features as the deep models: the quality baseline."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from feature_store.schema import Schema
from models.base import Model
from models.config import LRConfig


class LogisticRegression(Model):
    """logit = b + w . dense + sum over features of the id's weight (mean over a bag's ids).

    An id's weight is the sum of its embedding row, so the model is linear in the one-hot
    (multi-hot) encoding whatever the table width; use the narrowest width the tables allow (4).
    """

    def __init__(self, config: LRConfig, schema: Schema, embeddings: nn.Module) -> None:
        super().__init__(config, schema, embeddings)
        self.dense_weights = nn.Linear(len(self.dense_features), 1)

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        pooled = self.embeddings(sparse).values()
        return pooled.sum(dim=1) + self.dense_weights(dense).squeeze(1)
