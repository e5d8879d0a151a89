"""The batched index transform (the fast path) against the per-feature transforms (the spec)."""

from __future__ import annotations

import pytest
import torch

from embedding_tables.config import TableConfig
from embedding_tables.errors import IdError
from embedding_tables.methods import QR, Full, GraphHash, Unified
from embedding_tables.transforms import BatchedTransform, transform_for
from tests.embedding_tables.helpers import slots_of


class ModuloMapping:
    num_rows = 7

    def transform_all(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([ids.remainder(3), 3 + ids.remainder(4)], dim=1)


def test_batched_rows_equal_per_feature_rows() -> None:
    transforms = [
        transform_for(TableConfig("h", 10**6, 4, "hash", budget=999, seed=2), "a"),
        transform_for(TableConfig("f", 50, 4, Full(out_of_range="hash"), seed=4), "b"),
        transform_for(TableConfig("q", 1000, 4, QR(num_partitions=3, out_of_range="hash")), "c"),
        transform_for(TableConfig("u", 10**5, 4, Unified(feature_chunks={"d": 3}), budget=77), "d"),
        transform_for(
            TableConfig("g", 100, 4, GraphHash(graphhash_variant="double")), "e", ModuloMapping()
        ),
        transform_for(
            TableConfig("q2", 30, 8, QR(combine="concat", out_of_range="hash"), seed=9), "f"
        ),
    ]
    generator = torch.Generator().manual_seed(0)
    ids = {
        t.feature: torch.randint(-2000, 2000, (int(n),), generator=generator)
        for t, n in zip(transforms, torch.randint(0, 9, (len(transforms),)), strict=True)
    }
    slots = slots_of(transforms)
    batched = BatchedTransform(slots)
    rows = batched([ids[t.feature] for t, _ in slots])
    expected = torch.cat([t(ids[t.feature])[j] for t, j in slots])
    assert torch.equal(rows, expected)


@pytest.mark.parametrize("method", ["full", "qr"])
def test_batched_range_error_names_feature_and_value(method: str) -> None:
    good = transform_for(TableConfig("ok", 100, 4, "hash"), "fine")
    bad = transform_for(TableConfig("t", 10, 4, method), "strict")
    slots = slots_of([good, bad])
    ids = {"fine": torch.tensor([5, -1]), "strict": torch.tensor([3, 12])}
    with pytest.raises(IdError, match=r"'strict'.*id 12 "):
        BatchedTransform(slots)([ids[t.feature] for t, _ in slots])
