"""Redis stopped (SIGSTOP: its port open, nothing answered) for 20 s while `/score` is under
load and the streaming trainer pushes deltas.

The service must answer every request throughout, degraded (cache and default rows) while Redis
is away and not after; the trainer's sync must retry until Redis is back; then everything must
recover without a restart: the service on the trainer's last delta, scoring like a service
started afresh, Redis holding exactly the trainer's model, every example applied.
"""

from __future__ import annotations

import threading
import time
import uuid

from embtab.services import start_redis
from models.checkpoint import save_checkpoint
from online_training.sync import SyncConfig
from online_training.trainer import Trainer
from online_training.trainer_config import TrainerConfig, TrainerHooks
from online_training.trainer_state import StartingPoint
from serving.published_model import publish_checkpoint
from serving.reader import ParamReader
from tests.faults.stack import (
    SLICE_S,
    Load,
    assert_serves_what_redis_holds,
    score_bodies,
    served,
    wait_for,
)
from tests.online_training.conftest import PARTITIONS
from tests.online_training.example_stream import (
    example_rows,
    publisher_for,
    send_examples,
    small_model,
    unique_model_name,
)
from tests.online_training.test_sync import assert_redis_holds

PAUSE_S = 20.0
EXAMPLES, PIECES = 4000, 8


def _feed(kafka, topic: str, movielens, gap_s: float) -> threading.Thread:
    """Examples in PIECES pieces `gap_s` apart, then the end markers: the stream flows before,
    during and after the fault."""

    def run() -> None:
        size = EXAMPLES // PIECES
        for piece in range(PIECES):
            rows = example_rows(movielens, size, start=piece * size)
            send_examples(kafka, topic, rows, PARTITIONS, batch_rows=50, end=piece == PIECES - 1)
            time.sleep(gap_s)

    thread = threading.Thread(target=run, name="feed", daemon=True)
    thread.start()
    return thread


def test_redis_stopped_for_20_s_under_load_degrades_then_recovers_without_restart(
    kafka, topics, movielens, tmp_path
):
    server = start_redis()
    try:
        url = f"redis://127.0.0.1:{server.port}/0"
        name = unique_model_name("redis-down")
        checkpoint = save_checkpoint(tmp_path / "offline.safetensors", small_model(movielens))
        publish_checkpoint(publisher_for(url, name), str(checkpoint))
        applied: set[int] = set()
        trainer = Trainer(
            kafka,
            topics,
            StartingPoint.from_checkpoint(checkpoint),
            publisher_for(url, name),
            TrainerConfig(
                group_id=f"trainer-{uuid.uuid4().hex[:8]}",
                batch_size=200,
                max_poll_records=2,
                sync=SyncConfig(interval_s=1.0, dense_every=3),
            ),
            TrainerHooks(
                on_applied=lambda batch: applied.update(batch.rows.column("request_id").to_pylist())
            ),
        )
        bodies = score_bodies(movielens)
        with served(url, name) as (service, client), Load(service.port, bodies) as load:
            training = threading.Thread(target=trainer.run, name="trainer", daemon=True)
            training.start()
            feed = _feed(kafka, topics.examples, movielens, gap_s=(PAUSE_S + 10) / PIECES)
            wait_for(lambda: client.get("/version").json()["delta"] >= 1, 60, "a first delta")

            server.pause()
            paused_at = time.monotonic()
            try:
                took = wait_for(
                    lambda: client.get("/healthz").json()["status"] == "degraded",
                    5,
                    "the service to see Redis down",
                )
                failures_before = trainer.sync.failures
                time.sleep(max(0.0, PAUSE_S - (time.monotonic() - paused_at)))
            finally:
                server.resume()
            resumed_at = time.monotonic()
            recovered = wait_for(
                lambda: client.get("/healthz").json()["status"] == "ok", 10, "recovery"
            )
            feed.join(timeout=60)
            training.join(timeout=120)
            assert not training.is_alive(), "the trainer did not finish after Redis came back"
            assert_serves_what_redis_holds(client, url, name, bodies)
            after = time.monotonic()

        print(
            f"Redis down {resumed_at - paused_at:.1f} s: degraded after {took:.2f} s, healthy "
            f"{recovered:.2f} s after it came back; sync failures {trainer.sync.failures}; "
            f"load: {load.describe()}"
        )
        # Never an error, never a request left waiting on Redis; degraded only while it was away.
        load.assert_answered_throughout(max_ms=2000)
        during = load.between(paused_at + took + 1.0, resumed_at - 2 * SLICE_S)
        assert during and all(piece.degraded == piece.answered for piece in during), [
            (round(piece.started - resumed_at, 2), piece.answered, piece.degraded)
            for piece in during
        ]
        assert not any(piece.degraded for piece in load.between(resumed_at + recovered + 1, after))
        # The sync kept trying while Redis was away, and got everything out once it was back.
        assert trainer.sync.failures > failures_before
        assert not trainer.report.final_sync_failed
        assert applied == set(range(EXAMPLES)), "every example applied at least once"
        reader = ParamReader(trainer.sync.publisher.nodes, name)
        assert reader.live_version() == trainer.report.version
        assert reader.head(trainer.report.version).delta == trainer.report.delta
        assert_redis_holds(reader, trainer.model)
    finally:
        server.stop()
