"""The streaming trainer on 2 gloo ranks of one sharded model, against the session's real broker
and Redis: each rank reads its own partitions, every example is trained once, Redis ends up
holding exactly the model the ranks saved, offsets are committed; a restart on 1 rank resumes
the 2-rank state and the committed offsets, and continues the same published version."""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from embtab.cli import main
from feature_store import datasets
from feature_store.offline import Dataset
from models.checkpoint import load_checkpoint, read_tensors
from models.config import TrainConfig
from models.distributed import DistributedConfig, train_distributed
from models.rank_launch import launch
from models.sharded_checkpoint import export_checkpoint, save_sharded
from models.sharding_plan import load_sharded_model
from online_training.kafka import KafkaSettings, Topics
from online_training.sharded_trainer import (
    ShardedLearner,
    ShardedStreamJob,
    train_stream_distributed,
)
from online_training.sync import SyncConfig
from online_training.trainer_config import TrainerConfig, TrainerConfigError
from serving.reader import ParamReader
from serving.redis_nodes import RedisConfig, RedisNodes
from tests.online_training.conftest import PARTITIONS
from tests.online_training.example_stream import (
    example_rows,
    send_examples,
    small_run_config,
    unique_model_name,
)
from tests.online_training.test_sync import assert_redis_holds
from tests.online_training.test_trainer import _committed

# As in tests/models/test_distributed.py: the same float32 math summed in another order.
LOSS_TOLERANCE = 1e-5
# age collisionless: its ids are owned by rank, trained and published by their owners.
COLLISIONLESS = {"age": {"method": "collisionless", "default_row": "zeros"}}


@pytest.fixture(scope="module")
def sharded_checkpoint(movielens: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few offline steps on 2 ranks: the sharded checkpoint the streams start from."""
    run = small_run_config(overrides=COLLISIONLESS)
    run = dataclasses.replace(
        run,
        train=dataclasses.replace(run.train, batch_size=1024, max_steps=3, eval_rows=2048),
    )
    path = tmp_path_factory.mktemp("sharded") / "offline"
    train_distributed(run, movielens, DistributedConfig(world_size=2, timeout_s=120), path)
    return path


def _job(
    kafka: KafkaSettings,
    topics: Topics,
    redis_url: str,
    tmp_path: Path,
    world_size: int,
    checkpoint: Path,
    **trainer,
) -> ShardedStreamJob:
    return ShardedStreamJob(
        kafka=kafka,
        topics=topics,
        redis=redis_url,
        redis_model=trainer.pop("redis_model"),
        trainer=TrainerConfig(
            group_id=trainer.pop("group_id"),
            batch_size=512,
            min_batch_rows=256,
            max_batch_wait_s=0.2,
            auc_window=500,
            state_path=str(tmp_path / "state"),
            train=TrainConfig(dense_lr=3e-3),
            sync=SyncConfig(interval_s=1.0, dense_every=2),
            **trainer,
        ),
        distributed=DistributedConfig(world_size=world_size, timeout_s=120),
        staging=str(tmp_path / "staging"),
        checkpoint=str(checkpoint),
    )


def _assert_redis_holds_state(redis_url: str, model: str, state: Path, tmp_path: Path) -> None:
    """The live version holds every row and the dense parameters of the state checkpoint."""
    plain = load_checkpoint(export_checkpoint(state, tmp_path / "state.safetensors")).model
    reader = ParamReader(RedisNodes(RedisConfig.parse(redis_url)), model)
    assert_redis_holds(reader, plain)


def test_two_ranks_train_their_partitions_and_one_rank_resumes_them(
    kafka, topics, movielens, redis_service, sharded_checkpoint, tmp_path
):
    redis_url = redis_service.redis_url
    names = {"redis_model": unique_model_name(), "group_id": f"sharded-{uuid.uuid4().hex[:8]}"}
    rows = example_rows(movielens, 3000)
    sent = send_examples(kafka, topics.examples, rows, PARTITIONS)

    reports = train_stream_distributed(
        _job(kafka, topics, redis_url, tmp_path, 2, sharded_checkpoint, **names)
    )

    assert [report["partitions"] for report in reports] == [[0, 2], [1, 3]]
    assert sum(report["examples"] for report in reports) == 3000, "each example trained once"
    assert all(report["dlq_messages"] == 0 and report["skipped_batches"] == 0 for report in reports)
    first = reports[0]
    assert first["full_publishes"] == 1 and first["deltas"] >= 1
    assert {(r["version"], r["delta"]) for r in reports} == {(first["version"], first["delta"])}
    assert first["last_window_auc"] is not None
    _assert_redis_holds_state(redis_url, names["redis_model"], tmp_path / "state", tmp_path)
    assert _committed(kafka, names["group_id"], topics.examples) == sent

    more = example_rows(movielens, 1000, start=3000)
    resent = send_examples(kafka, topics.examples, more, PARTITIONS)
    (resumed,) = train_stream_distributed(
        _job(kafka, topics, redis_url, tmp_path, 1, sharded_checkpoint, **names)
    )

    assert resumed["partitions"] == list(range(PARTITIONS))
    assert resumed["examples"] == 1000, "only the examples after the committed offsets"
    assert resumed["full_publishes"] == 0 and resumed["version"] == first["version"]
    assert resumed["delta"] > first["delta"]
    _assert_redis_holds_state(redis_url, names["redis_model"], tmp_path / "state", tmp_path)
    committed = _committed(kafka, names["group_id"], topics.examples)
    assert committed == {p: sent[p] + resent[p] for p in range(PARTITIONS)}


def test_more_ranks_than_partitions_is_refused_before_any_rank_starts(
    kafka, topics, redis_service, tmp_path
):
    names = {"redis_model": unique_model_name(), "group_id": f"sharded-{uuid.uuid4().hex[:8]}"}
    job = _job(kafka, topics, redis_service.redis_url, tmp_path, PARTITIONS + 1, tmp_path, **names)
    with pytest.raises(TrainerConfigError, match="accepted: ranks <= partitions"):
        train_stream_distributed(job)


def test_stream_train_nproc_runs_the_ranks_and_reports_each(
    capsys, kafka, topics, kafka_service, redis_service, movielens, sharded_checkpoint, tmp_path
):
    send_examples(kafka, topics.examples, example_rows(movielens, 800), PARTITIONS)
    name = unique_model_name()
    arguments = ["stream", "train", "--nproc", "2", "--checkpoint", str(sharded_checkpoint)]
    arguments += ["--name", name, "--state", str(tmp_path / "state"), "--sync-interval", "1"]
    arguments += ["--kafka", kafka_service.kafka_bootstrap, "--redis", redis_service.redis_url]
    arguments += ["--topic-prefix", topics.prefix, "--group", f"g-{uuid.uuid4().hex[:8]}"]
    assert main([*arguments, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 800 and result["redis_model"] == name
    assert [rank["partitions"] for rank in result["ranks"]] == [[0, 2], [1, 3]]
    reader = ParamReader(RedisNodes(RedisConfig.parse(redis_service.redis_url)), name)
    assert reader.live_version() == result["version"]
    assert reader.head(result["version"]).delta == result["delta"]
    _assert_redis_holds_state(redis_service.redis_url, name, tmp_path / "state", tmp_path)


def test_stream_train_nproc_refuses_a_fresh_model(capsys, tmp_path):
    arguments = ["stream", "train", "--nproc", "2", "--model", "dlrm", "--kafka", "x:1"]
    assert main([*arguments, "--redis", "redis://127.0.0.1:1"]) == 2
    assert "--nproc continues a sharded checkpoint" in capsys.readouterr().err


def _learn(checkpoint: str, steps: list[list[tuple[int, int]]], out: str) -> list[float]:
    """A rank's part of `steps` (per step, the [start, stop) rows of the stream each rank
    holds), then the model saved to `out`; the global losses."""
    rank = dist.get_rank()
    dmp, _ = load_sharded_model(checkpoint, sharding={})
    learner = ShardedLearner(dmp, TrainConfig(dense_lr=3e-3))
    rows = example_rows(datasets.load("movielens-1m"), 1000)
    losses = []
    for held in steps:
        start, stop = held[rank]
        losses.append(learner.apply(rows.slice(start, stop - start)).loss)
    save_sharded(out, dmp)
    return losses


def test_ranks_with_uneven_batches_take_the_step_of_one_process_on_their_union(
    sharded_checkpoint, tmp_path
):
    one = launch(
        _learn,
        (str(sharded_checkpoint), [[(0, 450)], [(450, 600)]], str(tmp_path / "one")),
        1,
        120,
    )[0]
    two = launch(
        _learn,
        (
            str(sharded_checkpoint),
            [[(0, 300), (300, 450)], [(450, 600), (600, 600)]],  # rank 1 has no rows in step 2
            str(tmp_path / "two"),
        ),
        2,
        120,
    )[0]
    assert one == pytest.approx(two, abs=LOSS_TOLERANCE)
    single = read_tensors(export_checkpoint(tmp_path / "one", tmp_path / "one.safetensors"))
    sharded = read_tensors(export_checkpoint(tmp_path / "two", tmp_path / "two.safetensors"))
    assert single.keys() == sharded.keys()
    for key, value in single.items():
        assert torch.allclose(value.float(), sharded[key].float(), atol=LOSS_TOLERANCE), key
