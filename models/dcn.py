"""DCN-v2 (Wang et al., WWW 2021): explicit feature crosses plus a deep MLP."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from feature_store.schema import Schema
from models.base import Model
from models.config import DCNConfig
from models.layers import MLP, CrossNetwork


class DCN(Model):
    """x0 = [embeddings..., dense]; stacked: deep(cross(x0)); parallel: [cross(x0), deep(x0)].

    Features of any widths work: x0 is their concatenation.
    """

    def __init__(self, config: DCNConfig, schema: Schema, embeddings: nn.Module) -> None:
        super().__init__(config, schema, embeddings)
        width = sum(self.widths.values()) + len(self.dense_features)
        self.cross = CrossNetwork(width, config.cross_layers, config.low_rank)
        self.deep = MLP(width, config.deep_mlp, config.dropout)
        head_in = self.deep.out_features + (width if config.structure == "parallel" else 0)
        self.head = nn.Linear(head_in, 1)

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled(sparse)
        x0 = torch.cat([pooled[name] for name in self.sparse_features] + [dense], dim=1)
        if self.config.structure == "stacked":
            hidden = self.deep(self.cross(x0))
        else:
            hidden = torch.cat([self.cross(x0), self.deep(x0)], dim=1)
        return self.head(hidden).squeeze(1)
