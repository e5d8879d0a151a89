"""Every model trains on every table method: a few steps on a tiny sample lower its loss."""

from __future__ import annotations

import pytest
import torch

from models.batches import batch_from_columns
from models.build import build_model, graphhash_mappings, plan_model
from models.config import RunConfig, TablesConfig, TrainConfig, model_config_from_dict
from models.train import dense_optimizer, train_step

MODELS = ["lr", "dlrm", "dcn", "deepfm", "din", "two_tower", "mf"]
# Tables of >= 20 ids (user_id, item_id) are compressed; the tiny ones (age, genres) stay full.
METHODS = {
    "full": TablesConfig(method="full"),
    "hash": TablesConfig(method="hash", budget=0.5, compress_min_rows=20),
    "unified": TablesConfig(method="unified", budget=0.5),
    "qr": TablesConfig(method="qr", budget=0.5, compress_min_rows=20),
    "collisionless": TablesConfig(method="collisionless", compress_min_rows=20),
    "graphhash": TablesConfig(method="graphhash", budget=0.5, compress_min_rows=20),
    "robe": TablesConfig(method="robe", budget=0.5, compress_min_rows=20),
    "ttrec": TablesConfig(method="ttrec", budget=0.5, compress_min_rows=20, options={"rank": 2}),
}
# Small dense bodies keep the 45 cases fast; the defaults are for MovieLens-1M.
SMALL = {
    "lr": {},
    "dlrm": {"bottom_mlp": [16], "top_mlp": [32]},
    "dcn": {"cross_layers": 2, "deep_mlp": [32]},
    "deepfm": {"deep_mlp": [32]},
    "din": {"attention_mlp": [16], "mlp": [32]},
    "two_tower": {
        "user_features": ["user_id", "age", "hist_item_id"],
        "item_features": ["item_id", "genres"],
        "tower_mlp": [16],
    },
    "mf": {},
}


def make_model(dataset, name: str, tables: TablesConfig, **model_options):
    options = {**SMALL[name], **model_options}
    run = RunConfig(
        model=model_config_from_dict({"name": name, **options}),
        tables=tables,
        train=TrainConfig(dense_lr=0.01, sparse_lr=0.1),
    )
    spec = plan_model(run, dataset.schema)
    torch.manual_seed(0)
    return build_model(spec, graphhash_mappings(spec, dataset)), run


def loss_on(model, batch) -> float:
    torch.manual_seed(1)  # the same in-batch negatives for the retrievers
    with torch.no_grad():
        return float(model.training_loss(batch))


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", MODELS)
def test_each_model_learns_with_each_table_method(tiny_dataset, name, method):
    model, run = make_model(tiny_dataset, name, METHODS[method])
    batch = batch_from_columns(tiny_dataset.read("train").slice(0, 256), model.schema)
    optimizer = dense_optimizer(model, run.train)
    before = loss_on(model, batch)
    for step in range(10):
        train_step(model, batch, optimizer, step)
    after = loss_on(model, batch)
    assert after < before * 0.97, f"{name}/{method}: loss {before:.4f} -> {after:.4f}"
    logits = model(batch.sparse, batch.dense)
    assert logits.shape == (256,) and torch.isfinite(logits).all()


def test_models_never_see_the_tables_as_dense_parameters(tiny_dataset):
    model, _ = make_model(tiny_dataset, "dcn", METHODS["qr"])
    table_bytes = model.embeddings.memory_bytes()["total"]
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert table_bytes > 0
    assert all(not name.startswith("embeddings.") for name, _ in model.named_parameters())
    assert dense_bytes > 0


def test_dcn_parallel_and_low_rank_train(tiny_dataset):
    model, run = make_model(tiny_dataset, "dcn", METHODS["full"], structure="parallel", low_rank=4)
    batch = batch_from_columns(tiny_dataset.read("train").slice(0, 256), model.schema)
    optimizer = dense_optimizer(model, run.train)
    before = loss_on(model, batch)
    for step in range(10):
        train_step(model, batch, optimizer, step)
    assert loss_on(model, batch) < before


def test_sampled_softmax_retriever_learns(tiny_dataset):
    model, run = make_model(tiny_dataset, "two_tower", METHODS["full"], loss="sampled_softmax")
    batch = batch_from_columns(tiny_dataset.read("train").slice(0, 256), model.schema)
    optimizer = dense_optimizer(model, run.train)
    before = loss_on(model, batch)
    for step in range(10):
        train_step(model, batch, optimizer, step)
    assert loss_on(model, batch) < before
