"""Redis losing its data (FLUSHALL, as a restart without persistence leaves it) under a running
service and a streaming sync, on an embedded redis-server of the test's own.

A publish after the loss takes the same version number again (the counter lived in the lost
data): a server must tell it apart by its publish id and switch; the sync must notice that its
version is gone and publish its model in full under a new identity, never push deltas into a
namespace that is not its own. While the served version's data is gone the service answers from
what it holds but says it is degraded (`/readyz` fails, `/healthz` says why, a metric, a log
line), and it recovers without a restart once a version is published again.
"""

from __future__ import annotations

import logging

import numpy as np
import redis

from embtab.services import start_redis
from models.checkpoint import manifest_of
from online_training.learner import OnlineLearner
from online_training.sync import ParamSync, SyncConfig
from serving.published_model import publish_model
from serving.reader import ParamReader
from serving.redis_nodes import RedisNodes
from serving.request import ScoreRequest
from serving.scorer import Scorer, ScorerConfig
from serving.service import serving_redis
from tests.online_training.example_stream import (
    example_rows,
    publisher_for,
    small_model,
    unique_model_name,
)
from tests.online_training.test_sync import assert_redis_holds
from tests.serving.serving_helpers import (
    ITEMS,
    publish,
    reference_scores,
    request_body,
    tiny_model,
    unique_name,
)
from tests.serving.test_app import running_service, wait_until

ITEMS_A = np.arange(0, ITEMS, 8)


def _flush(port: int) -> None:
    """Empty the test's own Redis, as a restart of a Redis without persistence does."""
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        client.flushall()
    finally:
        client.close()


def _score(scorer: Scorer, user: int, items: np.ndarray) -> np.ndarray:
    request = ScoreRequest.model_validate(request_body(user, items))
    return scorer.score([scorer.prepare(request)]).per_request[0]


def test_a_republish_under_the_same_number_after_a_flush_is_switched_to():
    server = start_redis()
    try:
        url = f"redis://127.0.0.1:{server.port}/0"
        name = unique_name("flushed")
        old, new = tiny_model("hash", seed=0), tiny_model("hash", seed=1)
        first = publish(old, name, url)
        nodes = RedisNodes(serving_redis(url))
        scorer = Scorer(ParamReader(nodes, name), ScorerConfig(name))
        assert scorer.refresh()
        np.testing.assert_allclose(_score(scorer, 7, ITEMS_A), reference_scores(old, 7, ITEMS_A))

        _flush(server.port)
        second = publish(new, name, url)
        assert second.version == first.version, "the counter lived in the lost data"
        assert second.publish_id != first.publish_id
        assert scorer.refresh(), "the same number, another publish: the server must switch"
        assert scorer.snapshot.manifest.publish_id == second.publish_id
        np.testing.assert_allclose(
            _score(scorer, 7, ITEMS_A), reference_scores(new, 7, ITEMS_A), atol=1e-6
        )
        nodes.close()
    finally:
        server.stop()


def test_the_sync_publishes_in_full_under_a_new_identity_when_its_version_is_lost(movielens):
    server = start_redis()
    try:
        url = f"redis://127.0.0.1:{server.port}/0"
        name = unique_model_name("lost")
        model = small_model(movielens)
        publisher = publisher_for(url, name)
        reader = ParamReader(publisher.nodes, name)
        sync = ParamSync(publisher, model, SyncConfig(interval_s=60, dense_every=100))
        full = sync.attach()
        learner = OnlineLearner(model)
        learner.apply(example_rows(movielens, 300))
        assert sync.sync().kind == "delta"
        nodes = RedisNodes(serving_redis(url))
        scorer = Scorer(ParamReader(nodes, name), ScorerConfig(name))
        assert scorer.refresh()

        # Lost, and the number taken again by another publish: not the sync's version.
        _flush(server.port)
        other = publish_elsewhere(small_model(movielens), url, name)
        assert other.version == full.version
        learner.apply(example_rows(movielens, 300, start=300))
        again = sync.sync()
        assert again.kind == "full" and again.publish_id not in (full.publish_id, other.publish_id)
        assert sync.point.publish_id == again.publish_id
        assert reader.live_version() == again.version
        assert_redis_holds(reader, model)
        assert scorer.refresh() and scorer.snapshot.manifest.publish_id == again.publish_id

        # Lost outright (nothing published since): the next push is a full one again.
        _flush(server.port)
        learner.apply(example_rows(movielens, 300, start=600))
        third = sync.sync()
        assert third.kind == "full" and third.publish_id != again.publish_id
        assert_redis_holds(reader, model)
        learner.apply(example_rows(movielens, 300, start=900))
        delta = sync.sync()
        assert delta.kind == "delta" and delta.version == third.version
        assert delta.publish_id == third.publish_id
        assert_redis_holds(reader, model, dense=False)
        assert scorer.refresh()
        assert scorer.snapshot.manifest.publish_id == third.publish_id
        assert scorer.snapshot.delta == delta.delta
        nodes.close()
    finally:
        server.stop()


def publish_elsewhere(model, url: str, name: str):
    """A full publish of `model` by a publisher of its own (another process, as it were)."""
    other = publisher_for(url, name)
    try:
        return publish_model(other, model, manifest_of(model))
    finally:
        other.nodes.close()


def test_lost_data_is_reported_degraded_and_recovers_when_a_version_is_published(caplog):
    server = start_redis()
    try:
        url = f"redis://127.0.0.1:{server.port}/0"
        name = unique_name("emptied")
        old, new = tiny_model("hash", seed=0), tiny_model("hash", seed=2)
        publish(old, name, url)
        with (
            caplog.at_level(logging.WARNING, "embtab.serving"),
            running_service(url, name) as client,
        ):
            assert wait_until(lambda: client.get("/readyz").status_code == 200)
            warm = client.post("/score", json=request_body(7, ITEMS_A)).json()
            assert not warm["degraded"]

            _flush(server.port)
            assert wait_until(lambda: client.get("/readyz").status_code == 503)
            health = client.get("/healthz").json()
            assert health["status"] == "degraded" and health["redis"] == "up"
            assert health["data"] == "missing" and name in health["data_error"]
            assert "data_missing_for_s" in health
            assert "embtab_data_missing 1.0" in client.get("/metrics").text
            assert "embtab_degraded 1.0" in client.get("/metrics").text
            assert any("missing from Redis" in record.getMessage() for record in caplog.records)
            # Keeps answering from what it holds: the rows it had, flagged degraded.
            held = client.post("/score", json=request_body(7, ITEMS_A))
            assert held.status_code == 200 and held.json()["degraded"]
            assert held.json()["scores"] == warm["scores"]
            cold = client.post("/score", json=request_body(7, ITEMS_A + 1))
            assert cold.status_code == 200 and cold.json()["degraded"]

            publish(new, name, url)
            assert wait_until(lambda: client.get("/readyz").status_code == 200)
            health = client.get("/healthz").json()
            assert health["status"] == "ok" and health["data"] == "ok"
            assert "embtab_data_missing 0.0" in client.get("/metrics").text
            fresh = client.post("/score", json=request_body(7, ITEMS_A)).json()
            assert not fresh["degraded"]
            np.testing.assert_allclose(
                fresh["scores"], reference_scores(new, 7, ITEMS_A), rtol=0, atol=1e-6
            )
    finally:
        server.stop()
