"""Small models over a MovieLens-shaped schema, and what the serving tests do with them."""

from __future__ import annotations

import uuid

import numpy as np
import torch

from embedding_tables.graphhash import build_graphhash
from feature_store.schema import FeatureSpec, Schema
from models.base import Model
from models.batches import batch_from_columns
from models.build import build_model, plan_model
from models.checkpoint import manifest_of
from models.config import run_config_from_dict
from serving.published_model import publish_model
from serving.publisher import ParamPublisher, PublishResult
from serving.redis_nodes import RedisConfig, RedisNodes

USERS, ITEMS = 60, 400
BUDGETS = {
    "hash": 0.25,
    "unified": 0.25,
    "qr": 0.5,
    "graphhash": 0.25,
    "robe": 0.25,
    "ttrec": 0.5,
}
METHODS = ("full", "hash", "unified", "qr", "collisionless", "graphhash", "robe", "ttrec")

# Named like MovieLens-100K so the online feature store's layout applies to it.
SCHEMA = Schema(
    "movielens-100k",
    (
        FeatureSpec("user_id", "categorical", USERS),
        FeatureSpec("item_id", "categorical", ITEMS),
        FeatureSpec("age", "categorical", 7),
        FeatureSpec("gender", "categorical", 3),
        FeatureSpec("occupation", "categorical", 21),
        FeatureSpec("zip_code", "categorical", 50),
        FeatureSpec("release_year", "categorical", 20),
        FeatureSpec("genres", "categorical", 10, max_length=3),
        FeatureSpec("hist_item_id", "sequence", ITEMS, max_length=5, shares_ids_with="item_id"),
        FeatureSpec("user_activity", "dense"),
        FeatureSpec("item_popularity", "dense"),
    ),
    id_columns={"user": "user_id", "item": "item_id"},
)


def unique_name(prefix: str = "m") -> str:
    """A model name no other test uses (tests never flush a shared Redis)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def tiny_model(method: str = "hash", seed: int = 0, model: str = "dcn") -> Model:
    """A DCN (by default) over SCHEMA whose user and item tables use `method`, random weights;
    a collisionless model has every item id admitted."""
    torch.manual_seed(seed)
    options: dict = {"seed": 7}
    if method == "qr":
        options = {"combine": "mult"}
    if method == "unified":
        options = {"seed": 7, "feature_chunks": {"item_id": 2}}
    if method == "robe":
        options = {"seed": 7, "block_size": 4}
    if method == "ttrec":
        options = {"seed": 7, "rank": 4}
    run = run_config_from_dict(
        {
            "dataset": SCHEMA.dataset,
            "model": {"name": model, "deep_mlp": [16], "cross_layers": 2}
            if model == "dcn"
            else {"name": model},
            "tables": {
                "method": method,
                "budget": BUDGETS.get(method),
                "compress_min_rows": 50,
                "dim": 8,
                "options": options,
            },
        }
    )
    spec = plan_model(run, SCHEMA)
    mappings = None
    if method == "graphhash":
        rng = np.random.default_rng(seed)
        users = rng.integers(0, USERS, 3000)
        items = (users * 7 + rng.integers(0, 20, 3000)) % ITEMS
        built = build_graphhash(
            users,
            items,
            (USERS // 4, ITEMS // 4),
            seed,
            user_cardinality=USERS,
            item_cardinality=ITEMS,
        )
        mappings = {"user_id": built.user, "item_id": built.item}
    built_model = build_model(spec, mappings)
    for table in built_model.embeddings.self_managed.values():
        count = table.config.num_embeddings
        table.load_rows(torch.arange(count), torch.randn(count, table.config.dim) * 0.1)
    return built_model.eval()


def publish(
    model: Model, name: str, url: str, encoding: str = "fp32", shards: int = 3
) -> PublishResult:
    nodes = RedisNodes(RedisConfig.parse(url))
    try:
        return publish_model(
            ParamPublisher(nodes, name),
            model,
            manifest_of(model),
            encoding=encoding,
            num_shards=shards,
        )
    finally:
        nodes.close()


def candidate_features(item_ids: np.ndarray) -> list[dict]:
    """Candidates with every item-side feature given in the request."""
    return [
        {
            "item_id": int(item),
            "features": {
                "release_year": int(item % 20),
                "genres": [int(item % 10), int((item * 3) % 10)],
                "item_popularity": float(item % 7) / 2,
            },
        }
        for item in item_ids
    ]


USER_CONTEXT = {
    "age": 2,
    "gender": 1,
    "occupation": 5,
    "zip_code": 11,
    "hist_item_id": [3, 17, 42],
    "user_activity": 1.25,
}


def request_body(user_id: int, item_ids: np.ndarray, context: dict | None = None) -> dict:
    return {
        "user_id": int(user_id),
        "context": dict(USER_CONTEXT if context is None else context),
        "candidates": candidate_features(item_ids),
    }


def reference_scores(
    model: Model, user_id: int, item_ids: np.ndarray, context: dict | None = None
) -> np.ndarray:
    """The model's own scores for `request_body(user_id, item_ids, context)`, in process."""
    context = USER_CONTEXT if context is None else context
    n = len(item_ids)
    items = np.asarray(item_ids, dtype=np.int64)
    columns = {
        "user_id": np.full(n, user_id),
        "item_id": items,
        "release_year": items % 20,
        "genres": (np.stack([items % 10, (items * 3) % 10], axis=1).reshape(-1), np.full(n, 2)),
        "item_popularity": ((items % 7) / 2).astype(np.float32),
    }
    for name, value in context.items():
        if isinstance(value, list):
            columns[name] = (np.tile(np.array(value, np.int64), n), np.full(n, len(value)))
        elif isinstance(value, float):
            columns[name] = np.full(n, value, np.float32)
        else:
            columns[name] = np.full(n, value)
    batch = batch_from_columns(columns, model.schema, with_labels=False)
    with torch.no_grad():
        return torch.sigmoid(model(batch.sparse, batch.dense)).numpy()
