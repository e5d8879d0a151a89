"""A collisionless table spread over gloo ranks by id owner: the one-process table's numerics,
and checkpoints that restore onto another number of ranks (here: onto one process).

With default_row='zeros' nothing is shared between owners, so 2 ranks must follow the
one-process CollisionlessTable up to the order of float32 sums (all-to-all of rows and
gradients): 1e-6 on losses of ~1e-1.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from embedding_tables.collisionless import CollisionlessTable
from embedding_tables.config import TableConfig
from embedding_tables.errors import ConfigError
from embedding_tables.methods import Collisionless
from embedding_tables.optimizer import SparseOptimizerConfig
from embedding_tables.sharded_collisionless import (
    OwnedCollisionlessTable,
    owner_of,
    read_owned,
    save_owned,
    state_from_entries,
)
from models.rank_launch import launch

BATCH, BAG = 64, 3
CONFIG = TableConfig(
    name="item",
    num_embeddings=10**6,
    dim=8,
    method=Collisionless(min_count=2, capacity=400, default_row="zeros"),
    pooling="mean",
)
OPTIMIZER = SparseOptimizerConfig(lr=0.2)


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global batches of BATCH bags of BAG Zipf-ish ids, and a target per bag."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        ids = (rng.zipf(1.3, BATCH * BAG) % 5000).astype(np.int64)
        target = np.sin(ids.reshape(BATCH, BAG).sum(axis=1)).astype(np.float32)
        out.append((torch.from_numpy(ids), torch.from_numpy(target)))
    return out


def _losses(table: torch.nn.Module, first: int, last: int, rank: int, world: int) -> list[float]:
    """Steps [first, last) of `table` on rank's slice of each global batch: global mean losses."""
    losses = []
    per_rank = BATCH // world
    for ids, target in _batches(last)[first:]:
        local_ids = ids.view(BATCH, BAG)[rank * per_rank : (rank + 1) * per_rank].reshape(-1)
        local_target = target[rank * per_rank : (rank + 1) * per_rank]
        lengths = torch.full((per_rank,), BAG)
        if isinstance(table, OwnedCollisionlessTable):
            pooled = table.pooled(local_ids, lengths)
        else:
            pooled = table(
                local_ids, torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
            )
        loss = ((pooled.sum(dim=1) - local_target) ** 2).mean()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(float(total) / world)
        loss.backward()
    return losses


def _train_owned(steps: int, save: str) -> dict:
    """`steps` steps of the table spread over this group's ranks, saved per owner."""
    rank, world = dist.get_rank(), dist.get_world_size()
    table = OwnedCollisionlessTable(CONFIG, OPTIMIZER)
    losses = _losses(table, 0, steps, rank, world)
    admitted = torch.tensor([table.local.num_admitted])
    dist.all_reduce(admitted)
    save_owned(save, table)
    return {
        "losses": losses,
        "admitted": int(admitted),
        "owners_ok": bool((owner_of(table.entries()["ids"], world) == rank).all()),
    }


def test_two_owners_follow_one_table_and_restore_onto_it(tmp_path: Path):
    one = CollisionlessTable(CONFIG, OPTIMIZER)  # the one-process table is the reference
    reference = _losses(one, 0, 6, 0, 1)
    two = launch(_train_owned, (3, str(tmp_path / "two")), world_size=2, timeout_s=60)
    assert all(rank["owners_ok"] for rank in two)
    assert two[0]["losses"] == pytest.approx(reference[:3], abs=1e-6)
    assert 0 < two[0]["admitted"] <= CONFIG.method.capacity

    # The 2 owners' entries restored onto one process continue as if never split.
    resumed = CollisionlessTable(CONFIG, OPTIMIZER)
    resumed.load_state_dict(state_from_entries(read_owned(tmp_path / "two", CONFIG), 1, 0))
    assert _losses(resumed, 3, 6, 0, 1) == pytest.approx(reference[3:], abs=1e-6)
    assert resumed.num_admitted == one.num_admitted


def test_count_min_sketch_admission_is_refused():
    with pytest.raises(ConfigError, match="count-min-sketch admission cannot be split"):
        OwnedCollisionlessTable(
            dataclasses.replace(CONFIG, method=dataclasses.replace(CONFIG.method, admission="cms"))
        )
