"""DLRM (Naumov et al., 2019): bottom MLP, pairwise dot interaction, top MLP."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from feature_store.schema import Schema
from models.base import Model
from models.config import DLRMConfig
from models.layers import MLP, dot_interaction


class DLRM(Model):
    """Embeddings and the bottom MLP's output (one vector each) interact by dot products.

    The top MLP sees the dense vector and every pairwise dot product; without dense features
    the bottom MLP is absent and only the embeddings interact.
    """

    def __init__(self, config: DLRMConfig, schema: Schema, embeddings: nn.Module) -> None:
        super().__init__(config, schema, embeddings)
        dim = self.equal_widths(self.sparse_features)
        self.bottom = (
            MLP(len(self.dense_features), config.bottom_mlp, out_features=dim)
            if self.dense_features
            else None
        )
        vectors = len(self.sparse_features) + (1 if self.bottom is not None else 0)
        interactions = vectors * (vectors - 1) // 2
        top_in = interactions + (dim if self.bottom is not None else 0)
        self.top = MLP(top_in, config.top_mlp, config.dropout, out_features=1)

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled(sparse)
        vectors = [pooled[name] for name in self.sparse_features]
        parts = []
        if self.bottom is not None:
            dense_vector = self.bottom(dense)
            vectors.insert(0, dense_vector)
            parts.append(dense_vector)
        parts.append(dot_interaction(torch.stack(vectors, dim=1)))
        return self.top(torch.cat(parts, dim=1)).squeeze(1)
