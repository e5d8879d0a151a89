"""A full publish killed (-9) halfway while the service scores the live version under load.

The store-level test (tests/serving/test_param_store.py) checks Redis after such a kill; this
one runs the same killed publisher against a served model: the service must answer throughout
with the old version and the same scores, and the next complete publish must go live as usual.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np

from models.checkpoint import save_checkpoint
from serving.published_model import publish_checkpoint
from serving.reader import ParamReader
from tests.faults.stack import Load, assert_serves_what_redis_holds, score_bodies, served, wait_for
from tests.online_training.example_stream import publisher_for, small_model, unique_model_name
from tests.serving.test_param_store import KILLED_PUBLISHER


def test_a_publish_killed_halfway_leaves_the_old_version_serving(
    redis_service, movielens, tmp_path
):
    url = redis_service.redis_url
    name = unique_model_name("half")
    publisher = publisher_for(url, name)
    checkpoint = save_checkpoint(tmp_path / "v1.safetensors", small_model(movielens))
    live = publish_checkpoint(publisher, str(checkpoint)).version
    reader = ParamReader(publisher.nodes, name)
    bodies = score_bodies(movielens)
    with served(url, name) as (service, client), Load(service.port, bodies) as load:
        before = [client.post("/score", content=body).json() for body in bodies[:20]]
        child = subprocess.Popen(
            [sys.executable, "-c", KILLED_PUBLISHER, url, name], stdout=subprocess.PIPE, text=True
        )
        try:
            half = int(child.stdout.readline())
            wait_for(lambda: publisher.nodes.meta.keys(f"embtab:{name}:{half}:rows:*"), 30, "rows")
            time.sleep(0.5)
        finally:
            child.kill()
            child.wait(timeout=10)
        for _ in range(10):
            assert client.get("/version").json()["version"] == live
            time.sleep(0.1)
        # The half-written version changes nothing served (scores as before, up to how a
        # micro-batch's neighbours round them).
        for body, earlier in zip(bodies[:20], before, strict=True):
            answer = client.post("/score", content=body).json()
            assert (answer["version"], answer["delta"]) == (earlier["version"], earlier["delta"])
            np.testing.assert_allclose(answer["scores"], earlier["scores"], rtol=0, atol=1e-6)
        assert reader.live_version() == live

        newer = save_checkpoint(tmp_path / "v2.safetensors", small_model(movielens))
        published = publish_checkpoint(publisher, str(newer)).version
        assert published > half > live
        wait_for(lambda: client.get("/version").json()["version"] == published, 10, "the switch")
        assert_serves_what_redis_holds(client, url, name, bodies)
    print(f"publish killed halfway (v{half}): load: {load.describe()}")
    load.assert_answered_throughout(max_ms=2000)
    assert not any(piece.degraded for piece in load.slices)
