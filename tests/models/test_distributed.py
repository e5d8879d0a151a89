"""Distributed training on one machine: gloo ranks on CPU under torchrec's DistributedModelParallel.

The tolerance of the loss-curve comparison: one rank and two ranks run the same float32 math
on the same seeded rows and batches; what differs is the order of float32 sums (DDP's
all-reduce of dense gradients, torchrec's all-to-all of pooled rows and of their gradients, the
loss average). Over 8 steps of Adam and row-wise Adagrad that moved losses by ~1e-7 (measured);
1e-5 absolute leaves two orders of margin for it, while a real mistake (a wrong shard, a
gradient not divided by the world size, a rank training on the wrong slice) changes the
updates themselves, not their rounding.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from embedding_tables.sharding import ShardableEmbeddingCollection
from feature_store.offline import Dataset
from models.batches import BatchLoader
from models.build import plan_model
from models.checkpoint import load_checkpoint
from models.config import DCNConfig, RunConfig, TablesConfig, TrainConfig
from models.distributed import DistributedConfig, train_distributed
from models.errors import ModelConfigError
from models.rank_launch import RankFailedError, launch
from models.sharded_checkpoint import ShardedCheckpoint, export_checkpoint
from models.sharding_plan import ShardingPlanError, plan_sharding, sharded_model_shell
from models.train import evaluate

STEPS = 8
LOSS_TOLERANCE = 1e-5
# qr mult on user_id (an unpooled torchrec EmbeddingCollection), full item_id and genres (a pooled
# EmbeddingBagCollection), collisionless age (owned by rank): every sharding type torchrec offers
# on CPU, pinned so that one 2-rank run exercises them all.
SHARDING = {
    "user_id.r": "row_wise",
    "user_id.q": "column_wise",
    "item_id": "row_wise",
    "genres": "table_wise",
}
COLLISIONLESS = {"method": "collisionless", "min_count": 2, "default_row": "zeros"}


def tiny_run(max_steps: int = STEPS) -> RunConfig:
    return RunConfig(
        model=DCNConfig(),
        tables=TablesConfig(
            method="qr",
            compress_min_rows=50,
            budget=0.5,
            dim=8,
            overrides={"age": COLLISIONLESS},
        ),
        train=TrainConfig(batch_size=128, epochs=1, max_steps=max_steps, eval_rows=500),
    )


def test_two_ranks_follow_one_rank_and_reshard_to_one(tiny_dataset: Dataset, tmp_path: Path):
    run = tiny_run()
    one = train_distributed(  # 2 steps more, to compare the resumed run below with
        tiny_run(STEPS + 2),
        tiny_dataset,
        DistributedConfig(world_size=1, sharding=SHARDING, timeout_s=60),
    )
    two = train_distributed(
        run,
        tiny_dataset,
        DistributedConfig(world_size=2, sharding=SHARDING, timeout_s=60),
        checkpoint=tmp_path / "two",
    )
    assert len(one.losses) == STEPS + 2 and len(two.losses) == STEPS
    assert two.losses == pytest.approx(one.losses[:STEPS], abs=LOSS_TOLERANCE)
    assert min(two.losses[-3:]) < two.losses[0]  # it trains
    kinds = {table: plan["sharding_type"] for table, plan in two.plan.items()}
    assert kinds == {
        "user_id__r": "row_wise",
        "user_id__q": "column_wise",
        "item_id": "row_wise",
        "genres": "table_wise",
    }
    assert {shard["rank"] for shard in two.plan["item_id"]["shards"]} == {0, 1}
    assert {shard["rank"] for shard in two.plan["user_id__q"]["shards"]} == {0, 1}
    owners = tmp_path / "two" / "collisionless" / "age"
    assert sorted(path.name for path in owners.iterdir())[-1] == "owner-00001-of-00002.safetensors"

    # 2 ranks -> 1 process: the plain model (embtab's own lookups) scores as the sharded one did.
    assert ShardedCheckpoint(tmp_path / "two").world_size == 2
    plain = load_checkpoint(export_checkpoint(tmp_path / "two", tmp_path / "plain.safetensors"))
    loader = BatchLoader(tiny_dataset, "valid", plain.model.schema, 16384, rows=500)
    metrics = evaluate(plain.model, loader)
    assert metrics["logloss"] == pytest.approx(two.valid["logloss"], abs=1e-6)
    assert metrics["auc"] == pytest.approx(two.valid["auc"], abs=1e-9)

    # 2 ranks -> 1 rank under DMP, resuming at the saved step as if never interrupted.
    resumed = train_distributed(
        tiny_run(STEPS + 2),
        tiny_dataset,
        DistributedConfig(world_size=1, sharding=SHARDING, timeout_s=60),
        checkpoint=tmp_path / "two",
        resume=True,
    )
    assert resumed.start_step == STEPS and len(resumed.losses) == 2
    assert resumed.losses == pytest.approx(one.losses[STEPS:], abs=LOSS_TOLERANCE)


def test_planner_choice_or_clear_error_for_tables_it_cannot_split(tiny_dataset: Dataset):
    spec = plan_model(tiny_run(), tiny_dataset.schema)
    shell = sharded_model_shell(spec, {})
    assert isinstance(shell.embeddings, ShardableEmbeddingCollection)
    # 8 columns cannot go to 3 ranks in column shards of >= 4: the planner makes what it can.
    plan = plan_sharding(shell, 3, {"genres": "column_wise"}, spec)
    genres = plan.plan["embeddings.pooled"]["genres"]
    assert genres.sharding_type == "column_wise"
    assert len(genres.sharding_spec.shards) <= 2
    # 6 rows over 16 ranks row-wise: torchrec leaves ranks empty rather than failing.
    plan = plan_sharding(shell, 16, {"genres": "row_wise"}, spec)
    shards = plan.plan["embeddings.pooled"]["genres"].sharding_spec.shards
    assert sum(shard.shard_sizes[0] for shard in shards) == 6
    with pytest.raises(ShardingPlanError, match="unknown physical table"):
        plan_sharding(shell, 2, {"age": "row_wise"}, spec)  # collisionless: owned by hash
    with pytest.raises(ShardingPlanError, match="unknown physical table"):
        plan_sharding(shell, 2, {"user_id": "row_wise"}, spec)
    with pytest.raises(ModelConfigError, match="accepted: table_wise"):
        DistributedConfig(sharding={"age": "grid"})
    with pytest.raises(ModelConfigError, match="not divisible by 3 ranks"):
        train_distributed(tiny_run(), tiny_dataset, DistributedConfig(world_size=3))


def _die_on_rank_one(how: str, death: str) -> None:
    """Rank 1 dies after the group is up (writing the time to `death`); rank 0 then waits in a
    collective for it."""
    dist.barrier()
    if dist.get_rank() == 1:
        Path(death).write_text(str(time.time()))
        if how == "kill":
            os.kill(os.getpid(), 9)
        raise RuntimeError("rank 1 failed on purpose")
    dist.all_reduce(torch.ones(1))


@pytest.mark.parametrize(
    ("how", "why"),
    [
        ("raise", "rank 1: RuntimeError: rank 1 failed on purpose"),
        ("kill", "rank 1: killed by signal 9"),
    ],
)
def test_a_dead_rank_stops_the_others_with_a_clear_error(how: str, why: str, tmp_path: Path):
    death = tmp_path / "death"
    with pytest.raises(RankFailedError, match="the others were stopped: " + why):
        launch(_die_on_rank_one, (how, str(death)), world_size=2, timeout_s=60)
    # Stopped well inside the collectives' 60 s timeout (SETTLE_SECONDS after the death).
    assert time.time() - float(death.read_text()) < 20
