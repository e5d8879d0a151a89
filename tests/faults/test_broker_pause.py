"""The broker frozen (SIGSTOP) for 10 s under producer, joiner and trainer while the service
scores under load (moved here from tests/online_training/test_trainer_faults.py and extended
with the service). The joiner-only variant stays in tests/online_training/test_faults.py.

Serving does not depend on Kafka: it must answer every request throughout, never degraded. The
streaming loop must ride the freeze out: every event applied at least once with its data set
label (copies allowed), Redis holding one consistent version equal to the trainer's final state,
and the service on it.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from models.checkpoint import save_checkpoint
from online_training.joiner import Joiner
from online_training.joiner_config import JoinerConfig
from online_training.producer import ProducerConfig, ReplayProducer
from online_training.sync import SyncConfig
from online_training.trainer import Trainer
from online_training.trainer_config import TrainerConfig, TrainerHooks
from online_training.trainer_state import StartingPoint
from serving.published_model import publish_checkpoint
from serving.reader import ParamReader
from tests.faults.stack import Load, assert_serves_what_redis_holds, score_bodies, served, wait_for
from tests.online_training.conftest import event_index
from tests.online_training.example_stream import publisher_for, small_model, unique_model_name
from tests.online_training.test_sync import assert_redis_holds

PAUSE_S = 10.0


def test_producer_joiner_trainer_and_service_ride_out_a_broker_frozen_for_10_seconds(
    kafka_service, kafka, topics, movielens, redis_service, tmp_path
):
    broker = kafka_service.kafka
    if broker is None:
        pytest.skip("the broker is not ours to freeze (EMBTAB_KAFKA is set)")
    url = redis_service.redis_url
    name = unique_model_name("frozen")
    events = 2000
    labels = movielens.read("test", ["label"]).column("label").to_numpy()[:events]
    applied: dict[int, list[int]] = {}

    def on_applied(batch) -> None:
        for request_id, label in zip(
            batch.rows.column("request_id").to_pylist(), batch.labels.tolist(), strict=True
        ):
            applied.setdefault(request_id, []).append(int(label))

    checkpoint = save_checkpoint(tmp_path / "offline.safetensors", small_model(movielens))
    publish_checkpoint(publisher_for(url, name), str(checkpoint))
    trainer = Trainer(
        kafka,
        topics,
        StartingPoint.from_checkpoint(checkpoint),
        publisher_for(url, name),
        TrainerConfig(group_id=f"trainer-{uuid.uuid4().hex[:8]}", sync=SyncConfig(interval_s=1.0)),
        TrainerHooks(on_applied=on_applied),
    )
    joiner = Joiner(kafka, topics, JoinerConfig(group_id=f"joiner-{uuid.uuid4().hex[:8]}"))
    replay = ReplayProducer(
        movielens,
        kafka,
        topics,
        # 2,000 events span 68,230 event-seconds: about 17 s of traffic, so that it still
        # flows when the trainer (which joins its group last) has its first examples.
        ProducerConfig(limit=events, speedup=4000, label_delay_s=30, batch_rows=64),
    )
    threads = {
        "trainer": threading.Thread(target=trainer.run, daemon=True),
        "joiner": threading.Thread(target=joiner.run, daemon=True),
        "producer": threading.Thread(target=replay.run, daemon=True),
    }
    bodies = score_bodies(movielens)
    with served(url, name) as (service, client), Load(service.port, bodies) as load:
        for thread in threads.values():
            thread.start()
        wait_for(lambda: bool(applied), 30, "the trainer's first examples")
        assert threads["producer"].is_alive(), "the broker must freeze while the stream runs"
        broker.pause()
        try:
            time.sleep(PAUSE_S)
        finally:
            broker.resume()
        for thread_name, thread in threads.items():
            thread.join(timeout=90)
            assert not thread.is_alive(), f"the {thread_name} did not finish"
        assert_serves_what_redis_holds(client, url, name, bodies)
    load.assert_answered_throughout(max_ms=2000)
    assert not any(piece.degraded for piece in load.slices)

    assert replay.report.impressions == events
    assert sorted(event_index(request_id) for request_id in applied) == list(range(events))
    for request_id, seen in applied.items():
        assert set(seen) == {labels[event_index(request_id)]}, request_id
    copies = sum(len(seen) - 1 for seen in applied.values())
    print(
        f"frozen broker: {copies} examples applied twice, trainer rebalances "
        f"{trainer.report.rebalances}, commit failures {trainer.report.commit_failures}; "
        f"load: {load.describe()}"
    )
    reader = ParamReader(trainer.sync.publisher.nodes, name)
    assert reader.live_version() == trainer.report.version
    assert trainer.report.full_publishes == 0, "deltas continue the checkpoint's publish"
    assert_redis_holds(reader, trainer.model)
