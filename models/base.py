"""What every model shares: an EmbeddingCollection, the schema it reads, a logit per example.

A model never knows which compression its tables use: it asks the collection for pooled
embeddings (`embeddings(kjt)`), unpooled rows (`embeddings.sequence(kjt)`) and each feature's
width (`embeddings.output_dim(feature)`), and nothing else.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from feature_store.schema import Schema
from models.batches import Batch, sparse_features
from models.errors import ModelConfigError


class Model(nn.Module):
    """Base of the models: forward(kjt, dense) -> logits [B]; training_loss(batch) -> scalar.

    `task` is "ranking" (pointwise click logit, trained with binary cross-entropy) or
    "retrieval" (user-item affinity, trained with a ranking loss on positives).
    """

    task: ClassVar[str] = "ranking"

    def __init__(self, config: Any, schema: Schema, embeddings: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.schema = schema
        self.embeddings = embeddings
        self.sparse_features = [spec.name for spec in sparse_features(schema)]
        self.dense_features = [spec.name for spec in schema.dense]
        self.widths = {name: embeddings.output_dim(name) for name in self.sparse_features}

    def feature_columns(self) -> dict[str, str]:
        """The input column each collection feature reads: its own name, except for features
        a model derives from another column in its forward (DARE's attention features). Serving
        plans the rows a batch needs from it."""
        return {feature: feature for feature in self.embeddings.feature_to_table}

    def pooled(self, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Pooled embedding [B, width] of every categorical and sequence feature."""
        output: KeyedTensor = self.embeddings(sparse)
        return output.to_dict()

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def training_loss(self, batch: Batch) -> torch.Tensor:
        logits = self(batch.sparse, batch.dense)
        return F.binary_cross_entropy_with_logits(logits, batch.labels)

    def equal_widths(self, features: list[str]) -> int:
        """The one embedding width of `features`, or an error naming the widths it got."""
        widths = {name: self.widths[name] for name in features}
        if len(set(widths.values())) != 1:
            raise ModelConfigError(
                f"model {self.config.name!r} needs every feature's embedding width equal "
                f"(its interaction takes dot products); got {widths}; accepted: one dim for "
                "all tables (and the same feature_chunks for every unified feature)"
            )
        return next(iter(widths.values()))
