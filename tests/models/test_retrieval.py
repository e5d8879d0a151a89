"""Retrievers: the softmax losses against a plain computation, candidates, masking, learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.batches import batch_from_columns
from models.build import build_model, plan_model
from models.config import RunConfig, TablesConfig, TrainConfig, model_config_from_dict
from models.errors import ModelConfigError
from models.retrieval import RetrievalEvaluator
from models.train import dense_optimizer, train_step
from models.two_tower import corrected_logits


def retriever(dataset, name: str, **options):
    run = RunConfig(
        model=model_config_from_dict({"name": name, **options}),
        tables=TablesConfig(method="full"),
        train=TrainConfig(dense_lr=0.01, sparse_lr=0.1),
    )
    torch.manual_seed(0)
    return build_model(plan_model(run, dataset.schema)), run


def test_log_q_correction_subtracts_exactly_log_q_and_masks_accidental_hits():
    torch.manual_seed(0)
    scores = torch.randn(4, 6)
    positive_ids = torch.tensor([3, 5, 3, 7])
    negative_ids = torch.tensor([3, 5, 3, 7, 5, 9])
    log_q = torch.log(torch.tensor([0.1, 0.2, 0.1, 0.05, 0.2, 0.001]))
    corrected = corrected_logits(scores, positive_ids, negative_ids, log_q)
    plain = corrected_logits(scores, positive_ids, negative_ids, torch.zeros(6))
    for i in range(4):
        for j in range(6):
            accidental = j != i and int(negative_ids[j]) == int(positive_ids[i])
            if accidental:
                assert corrected[i, j] == float("-inf") and plain[i, j] == float("-inf")
            else:
                assert corrected[i, j] == pytest.approx(float(scores[i, j] - log_q[j]), abs=1e-6)
                assert plain[i, j] == pytest.approx(float(scores[i, j]), abs=1e-6)
    assert [int(i) for i in torch.isinf(corrected).sum(dim=1)] == [1, 1, 1, 0]


def test_sampled_softmax_loss_matches_a_plain_computation(tiny_dataset):
    model, _ = retriever(tiny_dataset, "mf", loss="sampled_softmax", temperature=0.2)
    batch = batch_from_columns(tiny_dataset.read("train").slice(0, 256), model.schema)
    positive = (batch.labels > 0.5).numpy()
    with torch.no_grad():
        users = model.user_vectors(batch.sparse, batch.dense).double().numpy()[positive]
        items = model.item_vectors(batch.sparse, batch.dense).double().numpy()[positive]
        loss = float(model.training_loss(batch))
    ids = batch.sparse["item_id"].values().numpy()[positive]
    # A fresh model has counted this batch only: the expected count of an item among the
    # in-batch negatives is its count in the batch.
    count = {item: int((ids == item).sum()) for item in set(ids.tolist())}
    total = 0.0
    for i in range(len(ids)):
        logits = [
            float(users[i] @ items[j]) / 0.2 - math.log(count[ids[j]])
            for j in range(len(ids))
            if j == i or ids[j] != ids[i]
        ]
        own = float(users[i] @ items[i]) / 0.2 - math.log(count[ids[i]])
        total += np.logaddexp.reduce(logits) - own
    assert loss == pytest.approx(total / len(ids), rel=1e-4)


def test_uniform_negatives_and_item_bias_refuse_towers_they_cannot_use(tiny_dataset):
    with pytest.raises(ModelConfigError, match="item tower must be the item id"):
        retriever(
            tiny_dataset,
            "two_tower",
            item_features=["item_id", "genres"],
            tower_mlp=[16],
            uniform_negatives=8,
        )
    with pytest.raises(ModelConfigError, match="uniform_negatives must be >= 0"):
        retriever(tiny_dataset, "mf", uniform_negatives=-1)
    with pytest.raises(ModelConfigError, match="item_bias .* needs at least 2"):
        retriever(tiny_dataset, "two_tower", tower_mlp=[1], item_bias=True)


@pytest.mark.parametrize("loss", ["bpr", "sampled_softmax", "full_softmax"])
def test_item_bias_is_the_last_item_coordinate_scored_for_every_user(tiny_dataset, loss):
    model, _ = retriever(tiny_dataset, "mf", loss=loss, item_bias=True)
    plain, _ = retriever(tiny_dataset, "mf", loss=loss)
    batch = batch_from_columns(tiny_dataset.read("train").slice(0, 64), model.schema)
    with torch.no_grad():
        users = model.user_vectors(batch.sparse, batch.dense)
        items = model.item_vectors(batch.sparse, batch.dense)
        raw_items = plain.item_tower(plain.pooled(batch.sparse), batch.dense)
        scores = model(batch.sparse, batch.dense)
    assert torch.equal(users[:, -1], torch.ones(64))
    assert torch.equal(items[:, -1], raw_items[:, -1])  # same seed, same rows: the raw bias
    factors = (users[:, :-1] * items[:, :-1]).sum(dim=1)
    scale = 1 / model.config.temperature if loss != "bpr" else 1.0
    assert torch.allclose(scores, (factors + items[:, -1]) * scale, atol=1e-5)
    if loss != "bpr":
        assert torch.allclose(users[:, :-1].norm(dim=1), torch.ones(64), atol=1e-5)


def test_items_seen_before_the_split_are_never_ranked(tiny_dataset):
    model, _ = retriever(tiny_dataset, "mf")
    evaluator = RetrievalEvaluator(tiny_dataset, model.schema, "test", (5, 40))
    assert len(evaluator.excluded_rows) > 0
    scores = torch.rand(evaluator.num_queries, len(evaluator.catalogue_items))
    seen_first = scores.clone()
    seen_first[evaluator.excluded_rows, evaluator.excluded_columns] += 10.0
    assert evaluator.rank(seen_first) == evaluator.rank(scores)
    # A plain reference: rank the unseen items of each query, recall@5 over its relevant ones.
    recalls = []
    for row in range(evaluator.num_queries):
        seen = set(evaluator.excluded_columns[evaluator.excluded_rows == row].tolist())
        order = [c for c in torch.argsort(scores[row], descending=True).tolist() if c not in seen]
        top = set(evaluator.catalogue_items[order[:5]].tolist())
        relevant = set(evaluator.relevant_items[evaluator.relevant_rows == row].tolist())
        recalls.append(len(top & relevant) / len(relevant))
    assert evaluator.rank(scores)["recall@5"] == pytest.approx(np.mean(recalls))


@pytest.mark.parametrize(
    "options",
    [
        {"loss": "sampled_softmax"},
        {"loss": "bpr", "uniform_negatives": 32},
        {"loss": "full_softmax", "normalize": False},
    ],
    ids=["sampled_softmax", "bpr_uniform", "full_softmax_raw"],
)
def test_training_raises_recall_over_the_untrained_model(tiny_dataset, options):
    model, run = retriever(tiny_dataset, "mf", **options)
    evaluator = RetrievalEvaluator(tiny_dataset, model.schema, "train", (10,))
    untrained = evaluator(model)["recall@10"]
    train = tiny_dataset.read("train")
    optimizer = dense_optimizer(model, run.train)
    for epoch in range(6):
        for start in range(0, train.num_rows, 512):
            batch = batch_from_columns(train.slice(start, 512), model.schema)
            train_step(model, batch, optimizer, epoch)
    assert evaluator(model)["recall@10"] > untrained + 0.1


def test_candidates_are_the_items_known_before_the_split(tiny_dataset):
    model, _ = retriever(tiny_dataset, "mf")
    schema = model.schema
    evaluator = RetrievalEvaluator(tiny_dataset, schema, "test", (10,))
    known = np.unique(
        np.concatenate(
            [tiny_dataset.read(name).column("item_id").to_numpy() for name in ("train", "valid")]
        )
    )
    assert np.array_equal(evaluator.catalogue_items, known)
    on_train = RetrievalEvaluator(tiny_dataset, schema, "train", (10,))
    assert np.array_equal(
        on_train.catalogue_items, np.unique(tiny_dataset.read("train").column("item_id"))
    )


def test_full_softmax_is_cross_entropy_over_every_catalogue_item(tiny_dataset):
    model, _ = retriever(tiny_dataset, "mf", loss="full_softmax", normalize=False)
    batch = batch_from_columns(tiny_dataset.read("train").slice(0, 256), model.schema)
    positive = (batch.labels > 0.5).numpy()
    with torch.no_grad():
        users = model.user_vectors(batch.sparse, batch.dense).double().numpy()[positive]
        table = model.items_by_id(torch.arange(model.catalogue_size)).double().numpy()
        loss = float(model.training_loss(batch))
    ids = batch.sparse["item_id"].values().numpy()[positive]
    logits = users @ table.T  # raw dot products: no normalisation, no temperature
    expected = np.mean(np.logaddexp.reduce(logits, axis=1) - logits[np.arange(len(ids)), ids])
    assert loss == pytest.approx(expected, rel=1e-4)


def test_full_softmax_needs_an_item_tower_of_the_item_id(tiny_dataset):
    with pytest.raises(ModelConfigError, match="full_softmax scores catalogue items by id"):
        retriever(
            tiny_dataset,
            "two_tower",
            item_features=["item_id", "genres"],
            loss="full_softmax",
        )


def test_embedding_l2_adds_the_squared_norms_of_the_looked_up_rows(tiny_dataset):
    plain, _ = retriever(tiny_dataset, "mf", loss="full_softmax", normalize=False)
    model, _ = retriever(
        tiny_dataset, "mf", loss="full_softmax", normalize=False, embedding_l2=0.01
    )
    batch = batch_from_columns(tiny_dataset.read("train").slice(0, 256), model.schema)
    positive = batch.labels > 0.5
    with torch.no_grad():
        pooled = model.pooled(batch.sparse)  # one id per row: the rows themselves
        squared = sum(float(pooled[name][positive].pow(2).sum(dim=1).mean()) for name in pooled)
        difference = float(model.training_loss(batch)) - float(plain.training_loss(batch))
    assert difference == pytest.approx(0.01 * squared, rel=1e-4)


def test_embedding_l2_must_not_be_negative(tiny_dataset):
    with pytest.raises(ModelConfigError, match="embedding_l2 must be >= 0"):
        retriever(tiny_dataset, "mf", embedding_l2=-0.1)
