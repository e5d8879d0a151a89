"""From a RunConfig and a schema to a model: plan (pure, checks everything), then build.

`plan_model` resolves the features, tables and sparse optimizer into a `ModelSpec`, which is all
a checkpoint needs to rebuild the model; `build_model` allocates the EmbeddingCollection and the
dense body. GraphHash tables also need their mappings, built from training interactions by
`graphhash_mappings` (a checkpoint carries them instead).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from embedding_tables.collection import EmbeddingCollection
from embedding_tables.config import TableConfig
from embedding_tables.graphhash import build_graphhash
from embedding_tables.optimizer import SparseOptimizerConfig
from feature_store.artifact import Preprocessor
from feature_store.offline import Dataset
from feature_store.schema import Schema
from models.base import Model
from models.config import DEFAULT_DIM, ModelConfig, RunConfig, TrainConfig, TwoTowerConfig
from models.dare import DARE, attention_tables
from models.dcn import DCN
from models.deepfm import DeepFM
from models.din import DIN
from models.dlrm import DLRM
from models.errors import ModelConfigError
from models.lr import LogisticRegression
from models.tables import build_tables, select_features
from models.two_tower import TwoTower, tower_features

MODEL_CLASSES: dict[str, type[Model]] = {
    "lr": LogisticRegression,
    "dlrm": DLRM,
    "dcn": DCN,
    "deepfm": DeepFM,
    "din": DIN,
    "dare": DARE,
    "two_tower": TwoTower,
    "mf": TwoTower,
}
# The narrowest row the table-batched kernels take: logistic regression sums it to one weight.
MODEL_DIMS = {"lr": 4}
# Tables a model adds to those of its features (DARE: the attention table of the item ids).
MODEL_TABLES = {"dare": attention_tables}


@dataclass(frozen=True)
class ModelSpec:
    """Everything that defines a model's structure: what a checkpoint manifest records."""

    model: ModelConfig
    schema: Schema
    tables: tuple[TableConfig, ...]
    feature_to_table: dict[str, str]
    sparse_optimizer: SparseOptimizerConfig | None = field(default=None)
    # How raw values become this model's input (None: the model takes prepared ids only).
    preprocessing: Preprocessor | None = field(default=None, compare=False)

    @property
    def graphhash_tables(self) -> list[TableConfig]:
        """The tables that take an id -> rows mapping (GraphHash's clusters)."""
        return [table for table in self.tables if table.method.takes_mapping]


def sparse_optimizer_config(train: TrainConfig) -> SparseOptimizerConfig:
    return SparseOptimizerConfig(
        kind=train.sparse_optimizer, lr=train.sparse_lr, eps=train.sparse_eps
    )


def plan_model(
    run: RunConfig, schema: Schema, preprocessing: Preprocessor | None = None
) -> ModelSpec:
    """Resolve features and tables and check them against the model, before any data is read.

    `preprocessing` is the data set's artifact: the model carries it into its checkpoints and
    published versions, so serving applies the transform training saw."""
    features = list(run.features)
    if isinstance(run.model, TwoTowerConfig):
        user, item = tower_features(run.model, select_features(schema, features))
        features = list(dict.fromkeys(user + item))
    model_schema = select_features(schema, features)
    dim = run.tables.dim or MODEL_DIMS.get(run.model.name, DEFAULT_DIM)
    tables, feature_to_table = build_tables(model_schema, run.tables, dim)
    if run.model.name in MODEL_TABLES:
        tables, feature_to_table = MODEL_TABLES[run.model.name](
            run.model, model_schema, tables, feature_to_table
        )
    return ModelSpec(
        model=run.model,
        schema=model_schema,
        tables=tuple(tables),
        feature_to_table=feature_to_table,
        sparse_optimizer=sparse_optimizer_config(run.train),
        preprocessing=preprocessing,
    )


def build_model(
    spec: ModelSpec,
    mappings: Mapping[str, nn.Module] | None = None,
    device: torch.device | str | None = None,
) -> Model:
    """Allocate the tables and the dense body; `mappings` are the GraphHash tables' maps."""
    missing = [t.name for t in spec.graphhash_tables if t.name not in (mappings or {})]
    if missing:
        raise ModelConfigError(
            f"graphhash table(s) {missing} need mappings; build them with graphhash_mappings "
            "(training) or load the model from a checkpoint"
        )
    embeddings = EmbeddingCollection(
        list(spec.tables),
        spec.feature_to_table,
        optimizer=spec.sparse_optimizer,
        device=device,
        mappings=mappings,
    )
    model = MODEL_CLASSES[spec.model.name](spec.model, spec.schema, embeddings)
    model.spec = spec
    return model.to(embeddings.device)


def graphhash_mappings(spec: ModelSpec, dataset: Dataset, seed: int = 0) -> dict[str, nn.Module]:
    """Cluster the training split's user-item graph into the GraphHash tables' mappings."""
    tables = spec.graphhash_tables
    if not tables:
        return {}
    sides = {side: spec.schema.id_columns.get(side) for side in ("user", "item")}
    by_feature = {table.name: table for table in tables}
    stray = sorted(set(by_feature) - set(sides.values()))
    if stray or None in sides.values():
        raise ModelConfigError(
            f"graphhash clusters the user-item graph and applies to the user and item id tables "
            f"only ({', '.join(filter(None, sides.values())) or 'this schema names none'}); "
            f"got graphhash table(s) {stray or sorted(by_feature)}"
        )
    columns = dataset.read("train", columns=[sides["user"], sides["item"]])
    users = columns.column(sides["user"]).to_numpy()
    items = columns.column(sides["item"]).to_numpy()
    user_table = by_feature.get(sides["user"])
    item_table = by_feature.get(sides["item"])
    cardinality = {spec.name: spec.cardinality for spec in spec.schema.categorical}
    budget = (
        user_table.budget_rows() if user_table else cardinality[sides["user"]],
        item_table.budget_rows() if item_table else cardinality[sides["item"]],
    )
    variant = (user_table or item_table).method.graphhash_variant
    built = build_graphhash(
        np.asarray(users, dtype=np.int64),
        np.asarray(items, dtype=np.int64),
        budget,
        seed,
        variant=variant,
        user_feature=sides["user"],
        item_feature=sides["item"],
        user_cardinality=cardinality[sides["user"]],
        item_cardinality=cardinality[sides["item"]],
    )
    result = {}
    if user_table:
        result[user_table.name] = built.user
    if item_table:
        result[item_table.name] = built.item
    return result
