"""DARE (Feng et al. 2024, "Long-Sequence Recommendation Models Need Decoupled Embeddings").

DIN's attention and its representation read the same item embeddings, so the gradients of
"which behaviours matter" and of "what they say" fight over one vector. DARE gives the item
a second, narrower embedding used only for the attention weights. Here that embedding is a
table of its own (`<table>_attention`), planned like the model's others (same method and
budget as the item table), so it is compressed, checkpointed and published with them. The
candidate and its history read it as two more collection features, named torchrec's way for
a feature that reads a second table: `<feature>@<table>`. The model adds their ids to the KJT
itself, so its input is the schema's KJT like every model's.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from embedding_tables.checked import check_kjt
from embedding_tables.config import TableConfig
from embedding_tables.planning import TBE_DIM_MULTIPLE
from feature_store.schema import Schema
from models.config import DAREConfig
from models.din import DIN, behaviour_sequence
from models.errors import ModelConfigError

ATTENTION_SUFFIX = "_attention"
# The attention rows are this much narrower than the item's when attention_dim is None
# (rounded up to the row widths the table-batched kernels take).
DEFAULT_ATTENTION_SHRINK = 4


def attention_table_name(table: str) -> str:
    return f"{table}{ATTENTION_SUFFIX}"


def attention_feature(feature: str, table: str) -> str:
    """The collection feature through which `feature`'s ids read the attention table."""
    return f"{feature}@{attention_table_name(table)}"


def default_attention_dim(item_dim: int) -> int:
    """A quarter of the item table's width, rounded up to a multiple of 4."""
    quarter = -(-item_dim // DEFAULT_ATTENTION_SHRINK)
    return -(-quarter // TBE_DIM_MULTIPLE) * TBE_DIM_MULTIPLE


def attention_tables(
    config: DAREConfig,
    schema: Schema,
    tables: list[TableConfig],
    feature_to_table: dict[str, str],
) -> tuple[list[TableConfig], dict[str, str]]:
    """The model's tables plus the attention table of the candidate's ids, and the features
    of the candidate and its history that read it."""
    sequence = behaviour_sequence(config, schema)
    target = sequence.shares_ids_with
    if target not in feature_to_table:
        raise ModelConfigError(
            f"dare: the candidate feature {target!r} (whose ids {sequence.name!r} shares) must "
            "be among the model's features"
        )
    source = next(table for table in tables if table.name == feature_to_table[target])
    if source.method.shares_one_table or source.method.takes_mapping:
        raise ModelConfigError(
            f"dare: the item table {source.name!r} uses method {source.method.name!r}, whose "
            "table an attention table cannot copy (one table shared by every feature, or a "
            "mapping built from the interaction graph); accepted: a method with a table per "
            "feature and no mapping (full, hash, qr, collisionless)"
        )
    name = attention_table_name(source.name)
    if name in {table.name for table in tables}:
        raise ModelConfigError(f"dare: the model already has a table named {name!r}")
    dim = config.attention_dim or default_attention_dim(source.dim)
    attention = dataclasses.replace(source, name=name, dim=dim)
    routes = {
        **feature_to_table,
        attention_feature(target, source.name): name,
        attention_feature(sequence.name, source.name): name,
    }
    return [*tables, attention], routes


class DARE(DIN):
    """DIN whose attention weights compare the attention table's rows of the candidate and its
    behaviours; the weights pool the behaviours' item-table rows into the user's interest."""

    def __init__(self, config: DAREConfig, schema: Schema, embeddings: nn.Module) -> None:
        sequence = behaviour_sequence(config, schema)
        table = embeddings.feature_to_table[sequence.shares_ids_with]
        self.target_attention = attention_feature(sequence.shares_ids_with, table)
        self.sequence_attention = attention_feature(sequence.name, table)
        missing = [
            name
            for name in (self.target_attention, self.sequence_attention)
            if name not in embeddings.feature_to_table
        ]
        if missing:
            raise ModelConfigError(
                f"dare: the collection has no attention feature(s) {missing}; plan the model "
                "with models.build.plan_model, which adds its attention table"
            )
        super().__init__(config, schema, embeddings)

    def feature_columns(self) -> dict[str, str]:
        return {
            **super().feature_columns(),
            self.target_attention: self.target_feature,
            self.sequence_attention: self.sequence_feature,
        }

    def attention_width(self) -> int:
        widths = {
            name: self.embeddings.output_dim(name)
            for name in (self.target_attention, self.sequence_attention)
        }
        if len(set(widths.values())) != 1:
            raise ModelConfigError(f"dare: the attention features' widths differ: {widths}")
        return widths[self.target_attention]

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        features = self.with_attention_features(sparse)
        pooled = self.pooled(features)
        rows = self.embeddings.sequence(features)
        behaviours: JaggedTensor = rows[self.sequence_feature]
        values = behaviours.to_padded_dense(desired_length=self.max_length)
        keys = rows[self.sequence_attention].to_padded_dense(desired_length=self.max_length)
        positions = torch.arange(self.max_length, device=values.device)
        mask = (positions.unsqueeze(0) < behaviours.lengths().unsqueeze(1)).to(values.dtype)
        weights = self.attention.weights(pooled[self.target_attention], keys, mask)
        interest = torch.bmm(weights.unsqueeze(1), values).squeeze(1)
        inputs = [pooled[name] for name in self.other_features] + [interest, dense]
        return self.mlp(torch.cat(inputs, dim=1)).squeeze(1)

    def with_attention_features(self, sparse: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The schema's KJT plus the candidate's and the history's ids again, under the names
        of the features that read the attention table."""
        target = sparse[self.target_feature]
        history = sparse[self.sequence_feature]
        weights = sparse.weights_or_none()
        if weights is not None:
            ones = weights.new_ones(target.values().numel() + history.values().numel())
            weights = torch.cat([weights, ones])
        return check_kjt(
            KeyedJaggedTensor(
                keys=[*sparse.keys(), self.target_attention, self.sequence_attention],
                values=torch.cat([sparse.values(), target.values(), history.values()]),
                lengths=torch.cat([sparse.lengths(), target.lengths(), history.lengths()]),
                weights=weights,
                stride=sparse.stride(),
            )
        )
