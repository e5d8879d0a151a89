"""DIN (Zhou et al., KDD 2018): the candidate item attends over the user's behaviour sequence."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from feature_store.schema import FeatureSpec, Schema
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
        sequence = behaviour_sequence(config, schema)
        self.sequence_feature = sequence.name
        self.target_feature = sequence.shares_ids_with
        self.max_length = sequence.max_length
        if self.target_feature not in self.widths:
            raise ModelConfigError(
                f"{config.name}: the candidate feature {self.target_feature!r} (whose ids "
                f"{sequence.name!r} shares) must be among the model's features"
            )
        dim = self.equal_widths([self.sequence_feature, self.target_feature])
        self.attention = TargetAttention(self.attention_width(), config.attention_mlp)
        self.other_features = [name for name in self.sparse_features if name != sequence.name]
        width = sum(self.widths[name] for name in self.other_features) + dim
        self.mlp = MLP(width + len(self.dense_features), config.mlp, config.dropout, out_features=1)

    def attention_width(self) -> int:
        """The width of the rows the attention compares: DIN's are the item's own embeddings."""
        return self.widths[self.target_feature]

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled(sparse)
        behaviours: JaggedTensor = self.embeddings.sequence(sparse)[self.sequence_feature]
        keys = behaviours.to_padded_dense(desired_length=self.max_length)
        positions = torch.arange(self.max_length, device=keys.device)
        mask = (positions.unsqueeze(0) < behaviours.lengths().unsqueeze(1)).to(keys.dtype)
        interest = self.attention(pooled[self.target_feature], keys, mask)
        inputs = [pooled[name] for name in self.other_features] + [interest, dense]
        return self.mlp(torch.cat(inputs, dim=1)).squeeze(1)


def behaviour_sequence(config: DINConfig, schema: Schema) -> FeatureSpec:
    """The sequence feature the candidate attends over: `config.sequence_feature`, or the
    schema's only one."""
    sequences = list(schema.sequence)
    accepted = ", ".join(s.name for s in sequences) or "none"
    if config.sequence_feature is None:
        if len(sequences) != 1:
            raise ModelConfigError(
                f"{config.name} needs sequence_feature when the features hold {len(sequences)} "
                f"sequence features; accepted: {accepted}"
            )
        return sequences[0]
    matching = [s for s in sequences if s.name == config.sequence_feature]
    if not matching:
        raise ModelConfigError(
            f"{config.name}: {config.sequence_feature!r} is not a sequence feature of the model; "
            f"accepted: {accepted}"
        )
    return matching[0]
