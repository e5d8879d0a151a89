"""Two-tower retriever and matrix factorisation, trained with BPR or sampled softmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from feature_store.schema import Schema
from models.base import Model
from models.batches import Batch
from models.config import TwoTowerConfig
from models.errors import ModelConfigError
from models.layers import MLP


def tower_features(config: TwoTowerConfig, schema: Schema) -> tuple[list[str], list[str]]:
    """The user and item features of a two-tower config (defaults: the schema's id columns)."""
    towers = []
    for side, chosen in (("user", config.user_features), ("item", config.item_features)):
        if chosen:
            towers.append(list(chosen))
        elif side in schema.id_columns:
            towers.append([schema.id_columns[side]])
        else:
            raise ModelConfigError(
                f"{config.name}: the schema of {schema.dataset!r} names no {side} id column; "
                f"set {side}_features to some of: {', '.join(f.name for f in schema.features)}"
            )
    names = {spec.name for spec in schema.features}
    unknown = sorted(set(towers[0] + towers[1]) - names)
    if unknown:
        raise ModelConfigError(
            f"{config.name}: unknown tower feature(s) {unknown}; "
            f"accepted: {', '.join(sorted(names))}"
        )
    return towers[0], towers[1]


class Tower(nn.Module):
    """One side: the concatenated features through an MLP, or the sum of the embeddings (MF)."""

    def __init__(self, sparse: list[str], dense: list[int], widths: dict[str, int], mlp: tuple):
        super().__init__()
        self.sparse = sparse
        self.register_buffer("dense_index", torch.tensor(dense, dtype=torch.long), persistent=False)
        width = sum(widths[name] for name in sparse) + len(dense)
        self.mlp = MLP(width, mlp[:-1], out_features=mlp[-1]) if mlp else None

    def forward(self, pooled: dict[str, torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        if self.mlp is None:
            return torch.stack([pooled[name] for name in self.sparse], dim=0).sum(dim=0)
        inputs = [pooled[name] for name in self.sparse] + [dense[:, self.dense_index]]
        return self.mlp(torch.cat(inputs, dim=1))


class TwoTower(Model):
    """score(user, item) = <user tower, item tower> (cosine / temperature for sampled softmax).

    Training uses the positive examples of a batch only; the other positives' items are the
    negatives, so no item catalogue is needed to train. BPR pairs each positive with one
    shuffled in-batch item; sampled softmax scores every user against every item of the batch,
    with logQ correction. An item that is the user's own positive is never its negative.
    """

    task = "retrieval"

    def __init__(self, config: TwoTowerConfig, schema: Schema, embeddings: nn.Module) -> None:
        super().__init__(config, schema, embeddings)
        user, item = tower_features(config, schema)
        towers = []
        for features in (user, item):
            sparse = [name for name in features if name in self.widths]
            dense = [self.dense_features.index(name) for name in features if name not in sparse]
            if not config.tower_mlp:
                if dense:
                    raise ModelConfigError(
                        f"{config.name}: a tower without an MLP sums embeddings and cannot take "
                        f"dense features {[self.dense_features[i] for i in dense]}; set tower_mlp "
                        "or drop them from the tower"
                    )
                self.equal_widths(user + item)
            towers.append(Tower(sparse, dense, self.widths, config.tower_mlp))
        self.user_tower, self.item_tower = towers
        item_id = schema.id_columns.get("item")
        self.item_id_feature = item_id if item_id in item else None
        self.normalize = config.loss == "sampled_softmax"

    def user_vectors(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        return self._finish(self.user_tower(self.pooled(sparse), dense))

    def item_vectors(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        return self._finish(self.item_tower(self.pooled(sparse), dense))

    def _finish(self, vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize(vectors, dim=1) if self.normalize else vectors

    def _scale(self, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.config.temperature if self.normalize else scores

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled(sparse)
        users = self._finish(self.user_tower(pooled, dense))
        items = self._finish(self.item_tower(pooled, dense))
        return self._scale((users * items).sum(dim=1))

    def training_loss(self, batch: Batch) -> torch.Tensor:
        positive = batch.labels > 0.5
        pooled = self.pooled(batch.sparse)
        users = self._finish(self.user_tower(pooled, batch.dense))[positive]
        items = self._finish(self.item_tower(pooled, batch.dense))[positive]
        if self.item_id_feature is not None:
            item_ids = batch.sparse[self.item_id_feature].values()[positive]
        else:
            item_ids = torch.arange(len(items), device=items.device)
        if len(items) < 2:
            return (users.sum() + items.sum()) * 0.0
        if self.config.loss == "bpr":
            shuffled = torch.randperm(len(items), device=items.device)
            valid = item_ids[shuffled] != item_ids
            positive_scores = (users * items).sum(dim=1)
            negative_scores = (users * items[shuffled]).sum(dim=1)
            margins = (positive_scores - negative_scores)[valid]
            return F.softplus(-margins).mean() if len(margins) else margins.sum()
        scores = self._scale(users @ items.T)
        # In-batch negatives are drawn in proportion to popularity; subtracting log of each
        # item's share of the batch removes that bias (logQ correction, Yi et al. 2019).
        _, inverse, counts = torch.unique(item_ids, return_inverse=True, return_counts=True)
        scores = scores - torch.log(counts[inverse].to(scores.dtype) / len(item_ids))
        same_item = item_ids.unsqueeze(0) == item_ids.unsqueeze(1)
        own = torch.eye(len(items), dtype=torch.bool, device=items.device)
        scores = scores.masked_fill(same_item & ~own, float("-inf"))
        targets = torch.arange(len(items), device=items.device)
        return F.cross_entropy(scores, targets)
