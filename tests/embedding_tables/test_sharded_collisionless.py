"""A collisionless table spread over gloo ranks by id owner: one rank's numerics, and
checkpoints that restore onto another number of ranks.

With default_row='zeros' nothing is shared between owners, so 2 ranks must follow 1 rank up to
the order of float32 sums (all-to-all of rows and gradients): 1e-6 on losses of ~1e-1.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from embedding_tables.config import TableConfig
from embedding_tables.errors import ConfigError
from embedding_tables.optimizer import SparseOptimizerConfig
from embedding_tables.sharded_collisionless import (
    OwnedCollisionlessTable,
    load_owned,
    owner_of,
    save_owned,
)
from models.distributed import launch

BATCH, BAG = 64, 3
CONFIG = TableConfig(
    name="item",
    num_embeddings=10**6,
    dim=8,
    method="collisionless",
    min_count=2,
    capacity=400,
    default_row="zeros",
    pooling="mean",
)


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global batches of BATCH bags of BAG Zipf-ish ids, and a target per bag."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        ids = (rng.zipf(1.3, BATCH * BAG) % 5000).astype(np.int64)
        target = np.sin(ids.reshape(BATCH, BAG).sum(axis=1)).astype(np.float32)
        out.append((torch.from_numpy(ids), torch.from_numpy(target)))
    return out


def _train(first: int, last: int, restore: str | None, save: str | None) -> dict:
    """Steps [first, last) on this rank's slice of each global batch; global mean losses."""
    rank, world = dist.get_rank(), dist.get_world_size()
    table = OwnedCollisionlessTable(CONFIG, SparseOptimizerConfig(lr=0.2))
    if restore:
        load_owned(restore, table)
    losses = []
    per_rank = BATCH // world
    for ids, target in _batches(last)[first:]:
        local_ids = ids.view(BATCH, BAG)[rank * per_rank : (rank + 1) * per_rank].reshape(-1)
        local_target = target[rank * per_rank : (rank + 1) * per_rank]
        pooled = table.pooled(local_ids, torch.full((per_rank,), BAG))
        loss = ((pooled.sum(dim=1) - local_target) ** 2).mean()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / world)
        loss.backward()
    admitted = torch.tensor([table.local.num_admitted])
    dist.all_reduce(admitted)
    if save:
        save_owned(save, table)
    owned = table.entries()["ids"]
    return {
        "losses": losses,
        "admitted": int(admitted),
        "owners_ok": bool((owner_of(owned, world) == rank).all()),
    }


def test_two_owners_follow_one_and_restore_onto_one(tmp_path: Path):
    one = launch(_train, (0, 6, None, None), world_size=1, timeout_s=60)[0]
    two = launch(_train, (0, 3, None, str(tmp_path / "two")), world_size=2, timeout_s=60)
    assert all(rank["owners_ok"] for rank in two)
    assert two[0]["losses"] == pytest.approx(one["losses"][:3], abs=1e-6)
    assert 0 < two[0]["admitted"] <= CONFIG.capacity
    resumed = launch(_train, (3, 6, str(tmp_path / "two"), None), world_size=1, timeout_s=60)[0]
    assert resumed["losses"] == pytest.approx(one["losses"][3:], abs=1e-6)
    assert resumed["admitted"] == one["admitted"]


def test_count_min_sketch_admission_is_refused():
    with pytest.raises(ConfigError, match="count-min-sketch admission cannot be split"):
        OwnedCollisionlessTable(dataclasses.replace(CONFIG, admission="cms"))
