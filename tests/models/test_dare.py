"""DARE: its attention table is planned, trained, read by the attention alone, and checkpointed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.batches import batch_from_columns
from models.build import build_model, graphhash_mappings, plan_model
from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import RunConfig, TablesConfig, TrainConfig, model_config_from_dict
from models.dare import default_attention_dim
from models.errors import ModelConfigError
from models.train import dense_optimizer, train_step
from tests.models.test_models_train import METHODS, loss_on

SMALL = {"name": "dare", "attention_mlp": [16], "mlp": [32]}
ATTENTION_TABLE = "item_id_attention"
ATTENTION_FEATURES = {"item_id@item_id_attention", "hist_item_id@item_id_attention"}


def dare_run(tables: TablesConfig, **options) -> RunConfig:
    return RunConfig(
        model=model_config_from_dict({**SMALL, **options}),
        tables=tables,
        train=TrainConfig(dense_lr=0.01, sparse_lr=0.1),
    )


def dare_model(dataset, tables: TablesConfig = METHODS["full"], dense_tables=False, **options):
    """A small DARE; `dense_tables` makes its tables plain parameters with dense gradients."""
    spec = plan_model(dare_run(tables, **options), dataset.schema)
    if dense_tables:
        spec = dataclasses.replace(spec, sparse_optimizer=None)
    torch.manual_seed(0)
    return build_model(spec, graphhash_mappings(spec, dataset))


def test_plan_adds_a_narrower_attention_table_of_the_item_ids(tiny_dataset):
    spec = plan_model(dare_run(METHODS["hash"]), tiny_dataset.schema)
    tables = {table.name: table for table in spec.tables}
    item, attention = tables["item_id"], tables[ATTENTION_TABLE]
    assert (attention.dim, attention.num_embeddings) == (item.dim // 4, item.num_embeddings)
    assert (attention.method, attention.budget) == (item.method, item.budget)
    assert {f for f, t in spec.feature_to_table.items() if t == ATTENTION_TABLE} == (
        ATTENTION_FEATURES
    )
    explicit = plan_model(dare_run(METHODS["full"], attention_dim=8), tiny_dataset.schema)
    assert {t.name: t.dim for t in explicit.tables}[ATTENTION_TABLE] == 8
    # The table-batched kernels take row widths in multiples of 4.
    assert [default_attention_dim(dim) for dim in (4, 8, 16, 20, 64)] == [4, 4, 4, 8, 16]


@pytest.mark.parametrize("method", ["full", "hash", "qr", "collisionless"])
def test_dare_learns_with_each_table_method(tiny_dataset, method):
    model = dare_model(tiny_dataset, METHODS[method])
    batch = batch_from_columns(tiny_dataset.read("train").slice(0, 256), model.schema)
    optimizer = dense_optimizer(model, dare_run(METHODS[method]).train)
    before = loss_on(model, batch)
    for step in range(10):
        train_step(model, batch, optimizer, step)
    after = loss_on(model, batch)
    assert after < before * 0.97, f"dare/{method}: loss {before:.4f} -> {after:.4f}"
    logits = model(batch.sparse, batch.dense)
    assert logits.shape == (256,) and torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["unified", "graphhash"])
def test_methods_without_a_table_to_copy_are_refused(tiny_dataset, method):
    with pytest.raises(ModelConfigError, match="accepted: a method with a table per feature"):
        plan_model(dare_run(METHODS[method]), tiny_dataset.schema)


def test_bad_attention_dim_is_refused():
    with pytest.raises(ModelConfigError, match="attention_dim must be >= 1"):
        model_config_from_dict({"name": "dare", "attention_dim": 0})


def test_the_attention_reads_only_the_attention_table(tiny_dataset):
    """The attention MLP's inputs change with the attention table's rows and not with the item
    table's; the item table's rows are what the weights pool."""
    model = dare_model(tiny_dataset, dense_tables=True).eval()
    batch = batch_from_columns(tiny_dataset.read("train").slice(0, 128), model.schema)
    seen = []
    model.attention.score.register_forward_hook(lambda module, args, out: seen.append(args[0]))

    def attention_inputs_and_scores():
        with torch.no_grad():
            scores = model(batch.sparse, batch.dense)
        return seen.pop(), scores

    inputs, scores = attention_inputs_and_scores()
    assert inputs.shape[-1] == 4 * model.embeddings.output_dim("item_id@item_id_attention")
    item, attention = (model.embeddings.tables.weight(t) for t in ("item_id", ATTENTION_TABLE))
    with torch.no_grad():
        item.mul_(2)
    moved_items, item_scores = attention_inputs_and_scores()
    assert torch.equal(moved_items, inputs) and not torch.equal(item_scores, scores)
    with torch.no_grad():
        attention.mul_(2)
    moved_attention, _ = attention_inputs_and_scores()
    assert not torch.equal(moved_attention, inputs)


def test_gradients_reach_the_attention_table_only_through_the_attention_weights(tiny_dataset):
    model = dare_model(tiny_dataset, dense_tables=True)
    batch = batch_from_columns(tiny_dataset.read("train").slice(0, 128), model.schema)
    item, attention = (model.embeddings.tables.weight(t) for t in ("item_id", ATTENTION_TABLE))

    def gradients():
        item.grad = attention.grad = None
        model.training_loss(batch).backward()
        return item.grad.abs().sum(), attention.grad.abs().sum()

    item_gradient, attention_gradient = gradients()
    assert item_gradient > 0 and attention_gradient > 0
    # Constant attention weights: nothing depends on the attention rows any more.
    output_layer = [m for m in model.attention.score.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        output_layer[-1].weight.zero_()
    item_gradient, attention_gradient = gradients()
    assert item_gradient > 0 and attention_gradient == 0


@pytest.mark.parametrize("method", ["full", "qr"])
def test_checkpoint_round_trip_keeps_the_attention_table(tiny_dataset, tmp_path, method):
    model = dare_model(tiny_dataset, METHODS[method])
    optimizer = dense_optimizer(model, dare_run(METHODS[method]).train)
    for step, start in enumerate(range(0, 1024, 256)):
        batch = batch_from_columns(tiny_dataset.read("train").slice(start, 256), model.schema)
        train_step(model, batch, optimizer, step)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "dare.safetensors", model))
    assert loaded.model.spec == model.spec
    assert ATTENTION_TABLE in [table["name"] for table in loaded.manifest["tables"]]
    test = batch_from_columns(tiny_dataset.read("test"), model.schema)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(test.sparse, test.dense), loaded.model(test.sparse, test.dense))
    for twin in (model, loaded.model):
        train_step(twin, test, None, 0)
    with torch.no_grad():
        assert torch.equal(model(test.sparse, test.dense), loaded.model(test.sparse, test.dense))
