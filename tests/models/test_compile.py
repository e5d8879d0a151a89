"""torch.compile of a model's forward: same scores as eager, on checked and unchecked batches."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models.batches import batch_from_columns
from tests.models.test_models_train import METHODS, make_model


@pytest.mark.parametrize("method", ["hash", "qr"])
def test_compiled_forward_scores_like_eager(tiny_dataset, method: str) -> None:
    model, _ = make_model(tiny_dataset, "dcn", METHODS[method])
    model.eval()
    batch = batch_from_columns(tiny_dataset.read("train").slice(0, 64), tiny_dataset.schema)
    plain = KeyedJaggedTensor(
        keys=batch.sparse.keys(),
        values=batch.sparse.values(),
        lengths=batch.sparse.lengths(),
        stride=batch.sparse.stride(),
    )
    # aot_eager: dynamo and AOTAutograd capture the forward as for inductor (which passes too,
    # but its code generation adds a minute on a small machine).
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        expected = model(batch.sparse, batch.dense)
        torch.testing.assert_close(compiled(batch.sparse, batch.dense), expected)
        torch.testing.assert_close(compiled(plain, batch.dense), expected)
