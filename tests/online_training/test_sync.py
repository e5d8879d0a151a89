"""Delta sync against the session's real Redis: full publish, deltas of touched rows, evicted ids
deleted, dense parameters every M deltas, when a live version may be continued, and retries."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from models.checkpoint import load_checkpoint, save_checkpoint
from online_training import messages
from online_training.learner import OnlineLearner
from online_training.sync import ParamSync, SyncConfig, SyncError, SyncPoint
from serving.errors import RedisUnavailableError
from serving.published_model import dense_state, publish_checkpoint, table_layouts
from serving.reader import ParamReader
from tests.online_training.example_stream import (
    example_rows,
    publisher_for,
    small_model,
    unique_model_name,
)

DAY = 86_400.0


def assert_redis_holds(reader: ParamReader, model, dense: bool = True) -> None:
    """The live version's rows (every table) and, with `dense`, its dense revision equal the
    model's."""
    version = reader.live_version()
    manifest = reader.manifest(version)
    assert list(manifest.tables) == table_layouts(model)
    for layout in manifest.tables:
        exported = list(model.embeddings.export_rows(layout.name))
        want_ids = torch.cat([ids for ids, _ in exported]).numpy()
        want = torch.cat([rows for _, rows in exported]).float().numpy()
        order = np.argsort(want_ids)
        ids, got = reader.scan_table(manifest, layout.name)
        assert np.array_equal(ids, want_ids[order]), f"{layout.name}: ids differ"
        assert np.array_equal(got, want[order]), f"{layout.name}: rows differ"
    if dense:
        head = reader.head(version)
        tensors = reader.dense(version, head.dense_revision).tensors
        for name, value in dense_state(model).items():
            assert torch.equal(tensors[name], value), name


@pytest.fixture
def redis_url(redis_service) -> str:
    return redis_service.redis_url


def test_a_fresh_model_goes_out_in_full_then_as_deltas_of_touched_rows(redis_url, movielens):
    model = small_model(movielens)
    publisher = publisher_for(redis_url, unique_model_name())
    reader = ParamReader(publisher.nodes, publisher.model)
    sync = ParamSync(publisher, model, SyncConfig(interval_s=60, dense_every=2))
    full = sync.attach()
    assert full.kind == "full" and full.delta == 0
    assert sync.point == SyncPoint(full.version, 0, full.publish_id) and full.publish_id
    assert_redis_holds(reader, model)
    assert sync.sync() is None, "nothing trained, nothing to push"

    learner = OnlineLearner(model)
    learner.apply(example_rows(movielens, 500))
    first = sync.sync()
    users = len(np.unique(example_rows(movielens, 500).column("user_id").to_numpy()))
    assert first.kind == "delta" and first.delta == 1 and not first.dense
    assert users < first.rows < sum(layout.rows for layout in table_layouts(model))
    assert_redis_holds(reader, model, dense=False)
    assert reader.head(full.version).dense_revision == 0

    learner.apply(example_rows(movielens, 500, start=500))
    second = sync.sync()
    assert second.dense and second.delta == 2
    assert reader.head(full.version).dense_revision == 2
    assert_redis_holds(reader, model)
    assert reader.delta_log(full.version, 2)["user_id"].size > 0


def test_expired_collisionless_ids_are_deleted_by_event_time(redis_url, movielens):
    overrides = {"item_id": {"method": "collisionless", "ttl_seconds": DAY, "min_count": 1}}
    model = small_model(movielens, overrides=overrides)
    publisher = publisher_for(redis_url, unique_model_name())
    reader = ParamReader(publisher.nodes, publisher.model)
    sync = ParamSync(publisher, model, SyncConfig(dense_every=1))
    sync.attach()
    learner = OnlineLearner(model)
    early = example_rows(movielens, 1500)
    learner.apply(early)
    assert sync.sync().deleted == 0
    manifest = reader.manifest(sync.point.version)
    admitted, _ = reader.scan_table(manifest, "item_id")
    assert len(admitted) > 100 and manifest.table("item_id").keyed_by == "id"

    # The same stream ten days later, with half the items: the other half expires.
    late = example_rows(movielens, 1500, start=1500)
    late_times = late.column("event_time").to_numpy() + 10 * DAY
    late = messages.with_columns(late, {"event_time": late_times})
    learner.apply(late)
    record = sync.sync()
    seen_late = np.union1d(
        late.column("item_id").to_numpy(),
        pc.list_flatten(late.column("hist_item_id")).to_numpy(),
    )
    expired = np.setdiff1d(admitted, seen_late)
    assert record.deleted == len(expired) > 0
    now_ids, _ = reader.scan_table(manifest, "item_id")
    assert not np.isin(expired, now_ids).any()
    assert set(now_ids) == set(seen_late) | (set(admitted) - set(expired))
    assert_redis_holds(reader, model)


def test_deltas_continue_the_unchanged_publish_of_the_starting_checkpoint(
    redis_url, movielens, tmp_path
):
    path = save_checkpoint(tmp_path / "offline.safetensors", small_model(movielens))
    publisher = publisher_for(redis_url, unique_model_name())
    published = publish_checkpoint(publisher, str(path))

    loaded = load_checkpoint(path)
    sync = ParamSync(publisher, loaded.model)
    assert sync.attach(origin_manifest=loaded.manifest) is None
    assert sync.point == SyncPoint(published.version, 0, published.publish_id)

    other = small_model(movielens)
    again = ParamSync(publisher, other).attach(origin_manifest={"another": "model"})
    assert again.kind == "full" and again.version == published.version + 1


def test_a_resumed_state_continues_only_its_own_version(redis_url, movielens):
    model = small_model(movielens)
    publisher = publisher_for(redis_url, unique_model_name())
    first = ParamSync(publisher, model)
    full = first.attach()
    version, publish_id = full.version, full.publish_id
    OnlineLearner(model).apply(example_rows(movielens, 200))
    delta = first.sync().delta

    resumed = ParamSync(publisher, model)
    assert resumed.attach(resumed=SyncPoint(version, delta, publish_id)) is None
    assert resumed.point == SyncPoint(version, delta, publish_id)
    # The same number, another publish (Redis lost its data and the number came round again).
    other = ParamSync(publisher, model).attach(resumed=SyncPoint(version, delta, "lost-publish"))
    assert other.kind == "full" and other.version == version + 1
    stale = ParamSync(publisher, model).attach(resumed=SyncPoint(version - 1, 3, publish_id))
    assert stale.kind == "full" and stale.version == version + 2


def test_a_failed_push_is_retried_and_keeps_its_rows(redis_url, movielens, monkeypatch):
    model = small_model(movielens)
    publisher = publisher_for(redis_url, unique_model_name())
    reader = ParamReader(publisher.nodes, publisher.model)
    sync = ParamSync(publisher, model, SyncConfig(retry_initial_s=0.01, retry_max_s=0.02))
    sync.attach()
    learner = OnlineLearner(model)
    real_push = publisher.publish_delta
    failures = iter([True, True])

    def flaky(*args, **kwargs):
        if next(failures, False):
            raise RedisUnavailableError("apply a delta: Redis did not answer (test)")
        return real_push(*args, **kwargs)

    monkeypatch.setattr(publisher, "publish_delta", flaky)
    learner.apply(example_rows(movielens, 300))
    record = sync.sync()
    assert record.attempts == 3 and sync.failures == 2
    assert_redis_holds(reader, model, dense=False)

    def down(*args, **kwargs):
        raise RedisUnavailableError("apply a delta: Redis did not answer (test)")

    monkeypatch.setattr(publisher, "publish_delta", down)
    learner.apply(example_rows(movielens, 300, start=300))
    with pytest.raises(SyncError, match="before the deadline"):
        sync.sync(deadline=sync.clock() + 0.1)
    assert sync.pending
    learner.apply(example_rows(movielens, 300, start=600))
    monkeypatch.setattr(publisher, "publish_delta", real_push)
    assert sync.sync(dense=True).rows > record.rows
    assert_redis_holds(reader, model)
