"""The collisionless table and a GraphHash mapping behind EmbeddingCollection, end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embedding_tables import EmbeddingCollection, SparseOptimizerConfig, TableConfig
from embedding_tables.collisionless import DEFAULT_ROW
from embedding_tables.graphhash import build_graphhash
from embedding_tables.methods import Collisionless, GraphHash


def test_train_checkpoint_and_serve_through_the_collection(
    tmp_path: Path, lookup_backend: str
) -> None:
    users = np.repeat(np.arange(50), 4)
    items = (users * 7 + np.tile(np.arange(4), 50)) % 30
    mapping = build_graphhash(users, items, budget_rows=20, variant="double").user
    tables = [
        TableConfig("user_id", 50, 8, GraphHash(graphhash_variant="double"), budget=20),
        TableConfig("item_id", 100, 8, Collisionless(min_count=2, capacity=10)),
    ]
    features = {"user_id": "user_id", "item_id": "item_id"}

    def build() -> EmbeddingCollection:
        return EmbeddingCollection(
            tables, features, optimizer=SparseOptimizerConfig(lr=0.1), mappings={"user_id": mapping}
        )

    collection = build()
    assert collection.backend == lookup_backend
    batch = KeyedJaggedTensor.from_lengths_sync(
        ["user_id", "item_id"],
        torch.tensor([1, 2, 3, 5, 5, 6, 7]),
        torch.tensor([1, 1, 1, 2, 1, 1]),
    )
    for _ in range(2):
        collection(batch).values().sum().backward()
    touched = collection.take_touched_rows()["item_id"]
    item_table = collection.self_managed["item_id"]
    assert DEFAULT_ROW in touched.tolist()  # the shared default row trained on ids 6 and 7
    assert sorted(item_table.ids_of_rows(touched[touched != DEFAULT_ROW]).tolist()) == [5, 6, 7]

    path = tmp_path / "model.safetensors"
    save_file({key: value.contiguous() for key, value in collection.state_dict().items()}, path)
    restored = build()
    restored.load_state_dict(load_file(path))
    collection.eval()
    restored.eval()
    assert torch.equal(collection(batch).values(), restored(batch).values())
