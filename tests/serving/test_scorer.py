"""The scorer against real Redis: served scores equal the model's for every table method, deltas
and dense revisions and new versions are picked up, online features fill in, Redis going down
degrades to the cache and default rows and comes back by itself."""

from __future__ import annotations

import functools
import time

import numpy as np
import pytest
import torch

from embtab.services import start_redis
from feature_store.online import OnlineFeatureStore
from serving.published_model import dense_state, model_delta, publish_model_delta
from serving.publisher import ParamPublisher
from serving.reader import ParamReader
from serving.redis_nodes import RedisConfig, RedisNodes
from serving.request import ScoreRequest
from serving.scorer import Scorer, ScorerConfig
from serving.service import serving_redis
from serving.watcher import VersionWatcher
from tests.serving.serving_helpers import (
    ITEMS,
    METHODS,
    SCHEMA,
    publish,
    reference_scores,
    request_body,
    tiny_model,
    unique_name,
)

ITEMS_A = np.arange(0, ITEMS, 8)
ITEMS_B = np.arange(4, ITEMS, 8)


@functools.cache
def model_for(method: str):
    return tiny_model(method)


@pytest.fixture
def nodes(redis_service):
    connected = RedisNodes(serving_redis(redis_service.redis_url))
    yield connected
    connected.close()


def scorer_for(nodes: RedisNodes, name: str, **options) -> Scorer:
    scorer = Scorer(ParamReader(nodes, name), ScorerConfig(name, **options))
    assert scorer.refresh()
    return scorer


def score(scorer: Scorer, user: int, items: np.ndarray, context: dict | None = None):
    request = ScoreRequest.model_validate(request_body(user, items, context))
    return scorer.score([scorer.prepare(request)])


@pytest.mark.parametrize("method", METHODS)
def test_served_scores_equal_the_models_for_every_method(method, nodes, redis_service):
    model = model_for(method)
    name = unique_name(method)
    publish(model, name, redis_service.redis_url)
    scorer = scorer_for(nodes, name)
    cold = score(scorer, 7, ITEMS_A)
    warm = score(scorer, 7, ITEMS_A)
    expected = reference_scores(model, 7, ITEMS_A)
    np.testing.assert_allclose(cold.per_request[0], expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(warm.per_request[0], cold.per_request[0])
    counts = scorer.counts
    assert counts.fetched > 0 and counts.defaulted == 0
    # The second batch reads every row locally: resident in the scratch tables, or (id-keyed
    # tables, renumbered per batch) from the row cache.
    assert counts.resident + counts.cached == counts.fetched
    assert counts.cached == 0 or method == "collisionless"
    assert scorer.snapshot.cache.stats().rows == counts.fetched


@pytest.mark.parametrize("method", ["hash", "collisionless"])
@pytest.mark.parametrize("model_name", ["din", "dare"])
def test_sequence_models_serve_their_scores_including_dares_attention_table(
    model_name, method, nodes, redis_service
):
    """DARE's attention features are derived in its forward from the item columns: the row
    plan must fetch their table's rows too (a collisionless one renumbered as its source)."""
    model = tiny_model(method, model=model_name)
    name = unique_name(model_name)
    publish(model, name, redis_service.redis_url)
    scorer = scorer_for(nodes, name)
    served = score(scorer, 7, ITEMS_A)
    expected = reference_scores(model, 7, ITEMS_A)
    np.testing.assert_allclose(served.per_request[0], expected, rtol=0, atol=1e-6)
    assert scorer.counts.defaulted == 0


@pytest.mark.parametrize(
    ("encoding", "tolerance"), [("fp16", 1e-4), ("int8", 2e-3), ("int4", 1e-2)]
)
def test_compressed_encodings_stay_close_to_the_model(encoding, tolerance, nodes, redis_service):
    model = model_for("qr")
    name = unique_name(encoding)
    publish(model, name, redis_service.redis_url, encoding)
    served = score(scorer_for(nodes, name), 3, ITEMS_B).per_request[0]
    error = np.abs(served - reference_scores(model, 3, ITEMS_B)).max()
    print(f"{encoding}: max score error {error:.2e}")
    assert error <= tolerance


def test_several_requests_in_one_batch_score_as_they_would_alone(nodes, redis_service):
    model = model_for("hash")
    name = unique_name()
    publish(model, name, redis_service.redis_url)
    scorer = scorer_for(nodes, name)
    requests = [
        scorer.prepare(ScoreRequest.model_validate(request_body(user, items)))
        for user, items in ((1, ITEMS_A[:5]), (2, ITEMS_B[:9]), (59, ITEMS_A[::-1]))
    ]
    scores = scorer.score(requests)
    for (user, items), got in zip(
        ((1, ITEMS_A[:5]), (2, ITEMS_B[:9]), (59, ITEMS_A[::-1])), scores.per_request, strict=True
    ):
        np.testing.assert_allclose(got, reference_scores(model, user, items), atol=1e-6)


def changed_rows(model, table: str, rows: np.ndarray, scale: float):
    """Scale some rows of a physical table in place; returns (row ids, new rows)."""
    ids = torch.from_numpy(rows)
    current = torch.cat([values for _, values in model.embeddings.export_rows(table)])[ids]
    model.embeddings.load_rows(table, ids, current * scale)
    return ids, current * scale


def test_a_delta_invalidates_exactly_its_rows_and_shows_in_scores(nodes, redis_service):
    model = tiny_model("hash")
    name = unique_name()
    publish(model, name, redis_service.redis_url)
    scorer = scorer_for(nodes, name)
    score(scorer, 7, ITEMS_A)
    cached_before = scorer.snapshot.cache.stats().rows
    item_rows = scorer.snapshot.planner.transforms["item_id"](torch.from_numpy(ITEMS_A[:4]))[0]
    ids, rows = changed_rows(model, "item_id", np.unique(item_rows.numpy()), -3.0)
    ParamPublisher(nodes, name).publish_delta(rows={"item_id": (ids, rows)})
    assert scorer.refresh()
    stats = scorer.snapshot.cache.stats()
    assert stats.invalidations == len(ids) and stats.rows == cached_before - len(ids)
    assert scorer.snapshot.delta == 1
    np.testing.assert_allclose(
        score(scorer, 7, ITEMS_A).per_request[0], reference_scores(model, 7, ITEMS_A), atol=1e-6
    )


def test_a_dense_delta_replaces_the_dense_state_as_a_whole(nodes, redis_service):
    model = tiny_model("full")
    name = unique_name()
    publish(model, name, redis_service.redis_url)
    scorer = scorer_for(nodes, name)
    score(scorer, 9, ITEMS_B)
    before = scorer.snapshot
    with torch.no_grad():
        model.head.bias += 1.0
    ParamPublisher(nodes, name).publish_delta(dense=dense_state(model))
    assert scorer.refresh()
    after = scorer.snapshot
    assert after is not before and after.dense_revision == 1 and after.cache is before.cache
    fetched = scorer.counts.fetched
    result = score(scorer, 9, ITEMS_B)
    assert scorer.counts.fetched == fetched and scorer.counts.cached > 0, "cache not reused"
    assert (result.version, result.delta) == (1, 1)
    np.testing.assert_allclose(
        result.per_request[0], reference_scores(model, 9, ITEMS_B), atol=1e-6
    )


def test_a_new_version_is_picked_up_with_its_hot_rows_prefetched(nodes, redis_service):
    first, second = model_for("qr"), tiny_model("qr", seed=1)
    name = unique_name()
    publish(first, name, redis_service.redis_url)
    scorer = scorer_for(nodes, name)
    score(scorer, 4, ITEMS_A)
    hot = scorer.snapshot.cache.stats().rows
    assert not scorer.refresh()
    publish(second, name, redis_service.redis_url)
    assert scorer.refresh()
    assert scorer.snapshot.version == 2
    assert scorer.snapshot.cache.stats().rows == hot, "the new version was not warmed"
    fetched_before = scorer.counts.fetched
    np.testing.assert_allclose(
        score(scorer, 4, ITEMS_A).per_request[0], reference_scores(second, 4, ITEMS_A), atol=1e-6
    )
    assert scorer.counts.fetched == fetched_before, "warm rows were fetched again"


def test_online_features_fill_in_what_the_request_leaves_out(nodes, redis_service):
    model = model_for("hash")
    name = unique_name()
    publish(model, name, redis_service.redis_url)
    client = RedisNodes(RedisConfig.parse(redis_service.redis_url)).meta
    store = OnlineFeatureStore(client, SCHEMA, namespace=f"embtab:test:{name}")
    store.write_users([7], {"age": [2], "gender": [1], "occupation": [5], "zip_code": [11]})
    store.write_sequences([7], [[3, 17, 42]])
    store.write_items(
        ITEMS_A,
        {
            "release_year": ITEMS_A % 20,
            "genres": [[int(i % 10), int((i * 3) % 10)] for i in ITEMS_A],
        },
    )
    scorer = Scorer(
        ParamReader(nodes, name),
        ScorerConfig(name),
        online=lambda schema, preprocessing: OnlineFeatureStore(
            client, schema, namespace=f"embtab:test:{name}", preprocessing=preprocessing
        ),
    )
    scorer.refresh()
    body = {
        "user_id": 7,
        "context": {"user_activity": 1.25},
        "candidates": [
            {"item_id": int(i), "features": {"item_popularity": float(i % 7) / 2}} for i in ITEMS_A
        ],
    }
    got = scorer.score([scorer.prepare(ScoreRequest.model_validate(body))]).per_request[0]
    np.testing.assert_allclose(got, reference_scores(model, 7, ITEMS_A), atol=1e-6)

    # Item attributes are held locally for item_features_ttl_s; a change shows after that.
    item = int(ITEMS_A[0])
    store.write_items([item], {"release_year": [(item + 1) % 20], "genres": [[1]]})
    again = scorer.score([scorer.prepare(ScoreRequest.model_validate(body))]).per_request[0]
    np.testing.assert_array_equal(again, got)
    scorer.snapshot.item_features.ttl_s = 0.0
    changed = scorer.score([scorer.prepare(ScoreRequest.model_validate(body))]).per_request[0]
    assert changed[0] != got[0] and np.array_equal(changed[1:], got[1:])
    store.clear()
    client.close()


def test_with_redis_down_it_answers_from_cache_and_default_rows_and_recovers():
    server = start_redis()
    try:
        url = f"redis://127.0.0.1:{server.port}/0"
        model = model_for("hash")
        name = unique_name()
        publish(model, name, url)
        nodes = RedisNodes(serving_redis(url))
        scorer = scorer_for(nodes, name)
        watcher = VersionWatcher(scorer, nodes, poll_s=0.1, retry_s=0.1)
        watcher.start()
        cached = score(scorer, 7, ITEMS_A).per_request[0]
        server.pause()
        started = time.monotonic()
        down = score(scorer, 7, np.concatenate([ITEMS_A, ITEMS_B]))
        again = score(scorer, 7, ITEMS_B)
        elapsed = time.monotonic() - started
        assert down.degraded and not scorer.health.up
        assert elapsed < 1.0, f"degraded answers took {elapsed:.2f} s"
        np.testing.assert_array_equal(down.per_request[0][: len(ITEMS_A)], cached)
        assert np.isfinite(again.per_request[0]).all() and scorer.counts.defaulted > 0
        server.resume()
        deadline = time.monotonic() + 5
        while not scorer.health.up and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scorer.health.up, "did not recover after Redis came back"
        recovered = score(scorer, 7, ITEMS_B)
        assert not recovered.degraded
        np.testing.assert_allclose(
            recovered.per_request[0], reference_scores(model, 7, ITEMS_B), atol=1e-6
        )
        watcher.stop()
        nodes.close()
    finally:
        server.stop()


@pytest.mark.parametrize("method", ["hash", "collisionless"])
def test_the_sync_path_publishes_touched_rows_new_ids_and_dense(method, nodes, redis_service):
    model = tiny_model(method)
    name = unique_name("sync")
    publish(model, name, redis_service.redis_url)
    model_delta(model)  # forget what building the model touched: that is published already
    scorer = scorer_for(nodes, name)
    items = np.concatenate([ITEMS_A, [1000, 1001]]) if method == "collisionless" else ITEMS_A
    score(scorer, 7, items)

    embeddings = model.embeddings
    if method == "collisionless":
        embeddings.load_rows("item_id", torch.tensor([1000, 1001]), torch.ones(2, 8))
    rows = torch.tensor([0, 5, 9]) if method == "hash" else torch.tensor([3, 16])
    table = "item_id" if method == "hash" else "user_id"
    current = torch.cat([values for _, values in embeddings.export_rows(table)])
    embeddings.load_rows(table, rows, current[rows] * 2)
    with torch.no_grad():
        model.head.bias -= 0.5
    result = publish_model_delta(ParamPublisher(nodes, name), model)
    assert result.delta == 1 and result.dense_revision == 1
    assert result.rows_written[table] == len(rows)
    assert scorer.refresh()
    np.testing.assert_allclose(
        score(scorer, 7, items).per_request[0], reference_scores(model, 7, items), atol=1e-6
    )
    assert publish_model_delta(ParamPublisher(nodes, name), model, with_dense=False) is None
