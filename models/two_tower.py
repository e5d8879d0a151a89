"""Two-tower retriever and matrix factorisation, trained with BPR, sampled or full softmax."""

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


def corrected_logits(
    scores: torch.Tensor,
    positive_ids: torch.Tensor,
    negative_ids: torch.Tensor,
    log_expected: torch.Tensor,
) -> torch.Tensor:
    """Sampled-softmax logits [P, N]: row i is positive i, its target is column i.

    Negatives are drawn in proportion to popularity (in-batch) or uniformly, not from the full
    softmax, so each column's logit loses the log of its item's expected count among the
    negatives (`log_expected`, logQ correction, Yi et al. 2019). A column holding row i's own
    item other than column i is an accidental hit, not a negative: it is masked.
    """
    rows = torch.arange(len(positive_ids), device=scores.device)
    accidental = positive_ids.unsqueeze(1) == negative_ids.unsqueeze(0)
    accidental[rows, rows] = False
    return (scores - log_expected.unsqueeze(0)).masked_fill(accidental, float("-inf"))


class TwoTower(Model):
    """score(user, item) = <user tower, item tower> (cosine / temperature for a softmax loss
    with `normalize`).

    Training uses the positive examples of a batch only; the negatives are the other positives'
    items and, with `uniform_negatives`, items drawn uniformly from the catalogue (with
    `full_softmax`, every catalogue item). The logQ correction needs each item's share of the
    positives: a running count per item id (hashed into at most LOG_Q_BUCKETS counters) over
    every batch trained on.
    """

    task = "retrieval"
    LOG_Q_BUCKETS = 1 << 20

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
        by_id = (
            "full_softmax scores" if config.loss == "full_softmax" else "uniform_negatives draws"
        )
        if (config.uniform_negatives or config.loss == "full_softmax") and item != [item_id]:
            raise ModelConfigError(
                f"{config.name}: {by_id} catalogue items by id alone, so the item tower must be "
                f"the item id {item_id!r} only; it has {item}. Set item_features to the item id, "
                "or use uniform_negatives 0 and a loss other than full_softmax"
            )
        width = config.tower_mlp[-1] if config.tower_mlp else self.widths[item[0]]
        if config.item_bias and width < 2:
            raise ModelConfigError(
                f"{config.name}: item_bias takes the last of the towers' {width} output "
                "coordinate(s) for the bias and needs at least 2; widen the tables or tower_mlp"
            )
        self.catalogue_size = schema.feature(item_id).cardinality if item_id else 0
        buckets = min(self.catalogue_size, self.LOG_Q_BUCKETS) or 1
        self.register_buffer(
            "positive_counts", torch.zeros(buckets, dtype=torch.float64), persistent=False
        )
        self.normalize = config.normalize and config.loss != "bpr"

    def user_vectors(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        return self._finish(self.user_tower(self.pooled(sparse), dense), "user")

    def item_vectors(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        return self._finish(self.item_tower(self.pooled(sparse), dense), "item")

    def _finish(self, vectors: torch.Tensor, side: str) -> torch.Tensor:
        """Normalised factors (softmax with `normalize`), then the bias coordinate if any."""
        if not self.config.item_bias:
            return F.normalize(vectors, dim=1) if self.normalize else vectors
        factors, bias = vectors[:, :-1], vectors[:, -1:]
        if self.normalize:
            factors = F.normalize(factors, dim=1)
        return torch.cat([factors, bias if side == "item" else torch.ones_like(bias)], dim=1)

    def _scale(self, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.config.temperature if self.normalize else scores

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled(sparse)
        users = self._finish(self.user_tower(pooled, dense), "user")
        items = self._finish(self.item_tower(pooled, dense), "item")
        return self._scale((users * items).sum(dim=1))

    def uniform_items(self, count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, item vectors) of `count` items drawn uniformly from the catalogue."""
        ids = torch.randint(0, self.catalogue_size, (count,), device=device)
        return ids, self.items_by_id(ids)

    def items_by_id(self, ids: torch.Tensor) -> torch.Tensor:
        """The item vectors of `ids` (an item tower of the item id alone)."""
        count = len(ids)
        device = ids.device
        lengths = torch.cat(
            [
                torch.full((count,), int(name == self.item_id_feature), dtype=torch.int32)
                for name in self.embeddings.feature_names
            ]
        )
        sparse = KeyedJaggedTensor.from_lengths_sync(
            keys=self.embeddings.feature_names, values=ids, lengths=lengths.to(device)
        )
        dense = torch.zeros(count, len(self.dense_features), device=device)
        return self.item_vectors(sparse, dense)

    def log_expected_counts(self, negative_ids: torch.Tensor, in_batch: int) -> torch.Tensor:
        """log E[count of each negative's item among `in_batch` positives + the uniform draws]."""
        shares = self.positive_counts / self.positive_counts.sum()
        in_batch_share = shares[negative_ids % len(shares)].to(torch.float32)
        uniform = self.config.uniform_negatives / max(self.catalogue_size, 1)
        return torch.log(in_batch * in_batch_share + uniform)

    def training_loss(self, batch: Batch) -> torch.Tensor:
        positive = batch.labels > 0.5
        pooled = self.pooled(batch.sparse)
        loss = self._ranking_loss(batch, pooled, positive)
        if not self.config.embedding_l2 or not positive.any():
            return loss
        rows = [pooled[name][positive] for name in self.user_tower.sparse + self.item_tower.sparse]
        squared = torch.stack([row.pow(2).sum(dim=1).mean() for row in rows]).sum()
        return loss + self.config.embedding_l2 * squared

    def _ranking_loss(
        self, batch: Batch, pooled: dict[str, torch.Tensor], positive: torch.Tensor
    ) -> torch.Tensor:
        """The configured loss (BPR, sampled or full softmax) of the batch's positives."""
        users = self._finish(self.user_tower(pooled, batch.dense), "user")[positive]
        items = self._finish(self.item_tower(pooled, batch.dense), "item")[positive]
        if len(items) < 2:
            return (users.sum() + items.sum()) * 0.0
        if self.item_id_feature is None:  # no ids: every positive is its own item
            item_ids = torch.arange(len(items), device=items.device)
        else:
            item_ids = batch.sparse[self.item_id_feature].values()[positive]
            with torch.no_grad():
                buckets = item_ids % len(self.positive_counts)
                self.positive_counts.index_add_(
                    0, buckets, torch.ones_like(buckets, dtype=torch.float64)
                )
        if self.config.loss == "full_softmax":
            catalogue = self.items_by_id(torch.arange(self.catalogue_size, device=items.device))
            return F.cross_entropy(self._scale(users @ catalogue.T), item_ids)
        negative_ids, negatives = item_ids, items
        if self.config.uniform_negatives:
            drawn_ids, drawn = self.uniform_items(self.config.uniform_negatives, items.device)
            negative_ids = torch.cat([item_ids, drawn_ids])
            negatives = torch.cat([items, drawn])
        if self.config.loss == "bpr":
            pick = torch.randint(0, len(negatives), (len(items),), device=items.device)
            valid = negative_ids[pick] != item_ids
            positive_scores = (users * items).sum(dim=1)
            negative_scores = (users * negatives[pick]).sum(dim=1)
            margins = (positive_scores - negative_scores)[valid]
            return F.softplus(-margins).mean() if len(margins) else margins.sum()
        if self.item_id_feature is None:  # each item once: a constant, no correction
            log_expected = torch.zeros(len(items), device=items.device)
        else:
            log_expected = self.log_expected_counts(negative_ids, len(items))
        scores = self._scale(users @ negatives.T)
        logits = corrected_logits(scores, item_ids, negative_ids, log_expected)
        targets = torch.arange(len(items), device=items.device)
        return F.cross_entropy(logits, targets)
