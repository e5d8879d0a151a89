"""DIN (Zhou et al., KDD 2018): the candidate item attends over the user's behaviour sequence."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from feature_store.schema import Schema
from models.base import Model
from models.config import DINConfig
from models.errors import ModelConfigError
from models.layers import MLP, TargetAttention


class DIN(Model):
    """The sequence's unpooled rows are weighted by their match with the candidate's embedding;
    the weighted sum (the user's interest in this candidate) replaces the sequence's pooled
    embedding in the MLP input."""

    def __init__(self, config: DINConfig, schema: Schema, embeddings: nn.Module) -> None:
        super().__init__(config, schema, embeddings)
        sequences = [spec for spec in schema.sequence]
        if config.sequence_feature is None:
            if len(sequences) != 1:
                raise ModelConfigError(
                    f"din needs sequence_feature when the features hold {len(sequences)} sequence "
                    f"features; accepted: {', '.join(s.name for s in sequences) or 'none'}"
                )
            sequence = sequences[0]
        else:
            matching = [s for s in sequences if s.name == config.sequence_feature]
            if not matching:
                raise ModelConfigError(
                    f"din: {config.sequence_feature!r} is not a sequence feature of the model; "
                    f"accepted: {', '.join(s.name for s in sequences) or 'none'}"
                )
            sequence = matching[0]
        self.sequence_feature = sequence.name
        self.target_feature = sequence.shares_ids_with
        self.max_length = sequence.max_length
        if self.target_feature not in self.widths:
            raise ModelConfigError(
                f"din: the candidate feature {self.target_feature!r} (whose ids "
                f"{sequence.name!r} shares) must be among the model's features"
            )
        dim = self.equal_widths([self.sequence_feature, self.target_feature])
        self.attention = TargetAttention(dim, config.attention_mlp)
        self.other_features = [name for name in self.sparse_features if name != sequence.name]
        width = sum(self.widths[name] for name in self.other_features) + dim
        self.mlp = MLP(width + len(self.dense_features), config.mlp, config.dropout, out_features=1)

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled(sparse)
        behaviours: JaggedTensor = self.embeddings.sequence(sparse)[self.sequence_feature]
        keys = behaviours.to_padded_dense(desired_length=self.max_length)
        positions = torch.arange(self.max_length, device=keys.device)
        mask = (positions.unsqueeze(0) < behaviours.lengths().unsqueeze(1)).to(keys.dtype)
        interest = self.attention(pooled[self.target_feature], keys, mask)
        inputs = [pooled[name] for name in self.other_features] + [interest, dense]
        return self.mlp(torch.cat(inputs, dim=1)).squeeze(1)
