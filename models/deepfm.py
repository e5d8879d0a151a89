"""DeepFM (Guo et al., IJCAI 2017): a factorisation machine and a deep MLP on shared embeddings."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from feature_store.schema import Schema
from models.base import Model
from models.config import DeepFMConfig
from models.layers import MLP, fm_interaction


class DeepFM(Model):
    """logit = first-order + FM second-order + deep.

    The first-order term is linear in the concatenated embeddings and dense features (so each
    id contributes a learned scalar, whatever table compresses it). The FM pairs the embedding
    fields only: dense features enter the first-order and deep parts (as a projected FM field
    they dominated the interactions and cost 0.015 validation AUC on MovieLens-1M).
    """

    def __init__(self, config: DeepFMConfig, schema: Schema, embeddings: nn.Module) -> None:
        super().__init__(config, schema, embeddings)
        self.equal_widths(self.sparse_features)
        width = sum(self.widths.values()) + len(self.dense_features)
        self.first_order = nn.Linear(width, 1)
        self.deep = MLP(width, config.deep_mlp, config.dropout, out_features=1)

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled(sparse)
        fields = [pooled[name] for name in self.sparse_features]
        flat = torch.cat([*fields, dense], dim=1)
        second_order = fm_interaction(torch.stack(fields, dim=1))
        return (self.first_order(flat) + self.deep(flat)).squeeze(1) + second_order
