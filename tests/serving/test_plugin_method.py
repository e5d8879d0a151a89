"""A compression method that lives only in this test, registered with one line, goes end to
end: it plans its table, trains through the fused sparse optimizer, is checked against its own
reference, survives a checkpoint, is published to Redis and served with the model's scores.

No other module knows it: this is what docs/adding-a-method.md promises."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from embedding_tables.config import TableConfig
from embedding_tables.methods import Method, register
from embedding_tables.planning import TablePlan, physical_table, rows_within_budget
from embedding_tables.reference import reference_pooled
from embedding_tables.transforms import GraphHashMappingLike, SlotRule, check_id_dtype
from models.batches import batch_from_columns
from models.checkpoint import load_checkpoint, save_checkpoint
from models.train import train_step
from serving.reader import ParamReader
from serving.redis_nodes import RedisNodes
from serving.request import ScoreRequest
from serving.scorer import Scorer, ScorerConfig
from serving.service import serving_redis
from tests.serving.serving_helpers import (
    ITEMS,
    USERS,
    publish,
    reference_scores,
    request_body,
    tiny_model,
    unique_name,
)


@register
@dataclass(frozen=True)
class Modulo(Method):
    """row = (id + offset) mod rows: hashing without the mix, plus an option of its own."""

    name = "test_modulo"

    offset: int = 0

    def plan(self, config: TableConfig, mapping_rows: int | None) -> TablePlan:
        rows = rows_within_budget(config, self.name)
        return TablePlan(config, (physical_table(config, config.name, rows, config.dim),), "single")

    def transform(
        self,
        config: TableConfig,
        feature: str,
        plan: TablePlan,
        mapping: GraphHashMappingLike | None,
    ) -> ModuloTransform:
        physical = plan.physical[0]
        return ModuloTransform(feature, (physical.name,), self.offset, physical.num_rows)

    def reference_rows(
        self, plan: TablePlan, feature: str, value: int, mapping: GraphHashMappingLike | None
    ) -> list[tuple[str, int]]:
        physical = plan.physical[0]
        return [(physical.name, (value + self.offset) % physical.num_rows)]


@dataclass(frozen=True)
class ModuloTransform:
    feature: str
    tables: tuple[str, ...]
    offset: int
    num_rows: int

    def __call__(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return [torch.remainder(check_id_dtype(ids, self.feature) + self.offset, self.num_rows)]

    def slot_rule(self, lookup: int) -> SlotRule:
        return SlotRule(self, lookup, "mapping")


def training_batch(model, rows: int = 256, seed: int = 0):
    """Random requests of SCHEMA's shape with labels from a hidden user-item rule."""

    rng = np.random.default_rng(seed)
    users = rng.integers(0, USERS, rows)
    items = rng.integers(0, ITEMS, rows)
    columns = {
        "user_id": users,
        "item_id": items,
        "age": users % 7,
        "gender": users % 3,
        "occupation": users % 21,
        "zip_code": users % 50,
        "release_year": items % 20,
        "genres": (np.stack([items % 10, (items * 3) % 10], axis=1).reshape(-1), np.full(rows, 2)),
        "hist_item_id": (np.tile(np.array([3, 17, 42]), rows), np.full(rows, 3)),
        "user_activity": np.full(rows, 1.25, np.float32),
        "item_popularity": ((items % 7) / 2).astype(np.float32),
        "label": ((users + items) % 2).astype(np.int8),
    }
    return batch_from_columns(columns, model.schema)


def test_a_method_registered_only_in_a_test_trains_checkpoints_publishes_and_serves(
    redis_service, tmp_path
) -> None:
    model = tiny_model("test_modulo")
    tables = {table.name: table for table in model.spec.tables}
    assert isinstance(tables["item_id"].method, Modulo) and tables["age"].method.name == "full"
    assert model.embeddings.memory_bytes()["item_id"] == ITEMS * 8 * 4

    batch = training_batch(model)
    weights = {name: model.embeddings.tables.weight(name).detach().clone() for name in tables}
    with torch.no_grad():
        pooled = model.embeddings(batch.sparse).to_dict()
    expected = reference_pooled(
        model.embeddings.plans, model.spec.feature_to_table, weights, batch.sparse
    )
    for feature, rows in expected.items():
        torch.testing.assert_close(pooled[feature], rows, atol=1e-6, rtol=0)

    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = [train_step(model, batch, optimizer, step) for step in range(30)]
    assert losses[-1] < losses[0] - 0.05
    assert not torch.equal(model.embeddings.tables.weight("item_id"), weights["item_id"])
    model.eval()

    path = save_checkpoint(tmp_path / "modulo.safetensors", model)
    loaded = load_checkpoint(path).model
    assert loaded.spec.tables == model.spec.tables
    items = np.arange(0, ITEMS, 5)
    np.testing.assert_array_equal(
        reference_scores(loaded, 7, items), reference_scores(model, 7, items)
    )

    name = unique_name("modulo")
    publish(loaded, name, redis_service.redis_url)
    nodes = RedisNodes(serving_redis(redis_service.redis_url))
    try:
        scorer = Scorer(ParamReader(nodes, name), ScorerConfig(name))
        assert scorer.refresh()

        request = ScoreRequest.model_validate(request_body(7, items))
        served = scorer.score([scorer.prepare(request)]).per_request[0]
    finally:
        nodes.close()
    np.testing.assert_allclose(served, reference_scores(model, 7, items), rtol=0, atol=1e-6)
