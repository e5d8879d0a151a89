"""Faults of the streaming trainer with the real broker and Redis: killed (-9) mid-stream and
restarted; the broker frozen for 10 s under producer, joiner and trainer.

Both must end with every example applied at least once (counted by request id: copies are
allowed) and Redis holding one consistent version: the live version's rows and dense
parameters are exactly the trainer's final state.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from models.checkpoint import load_checkpoint, read_manifest, save_checkpoint
from online_training.joiner import Joiner, JoinerConfig
from online_training.producer import ProducerConfig, ReplayProducer
from online_training.sync import SyncConfig
from online_training.trainer import StartingPoint, Trainer, TrainerConfig, TrainerHooks
from serving.param_store import ParamReader
from serving.published_model import publish_checkpoint
from tests.online_training.conftest import PARTITIONS, event_index
from tests.online_training.example_stream import (
    example_rows,
    publisher_for,
    send_examples,
    small_model,
    unique_model_name,
)
from tests.online_training.test_sync import assert_redis_holds
from tests.online_training.test_trainer import _committed

REPO = Path(__file__).resolve().parents[2]

# A trainer in its own process, so that it can be killed. It resumes from its state if there
# is one, else starts from the checkpoint; it appends the request ids it applies to a file.
TRAINER_PROCESS = """
import json, logging, os, sys
from online_training.kafka import KafkaSettings, Topics
from online_training.sync import SyncConfig
from online_training.trainer import StartingPoint, Trainer, TrainerConfig, TrainerHooks
from tests.online_training.example_stream import publisher_for
kafka, prefix, group, redis_url, name, checkpoint, state, applied_path = sys.argv[1:9]
logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
start = StartingPoint.resume(state, name) or StartingPoint.from_checkpoint(checkpoint)
applied = os.open(applied_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

def on_applied(batch):
    ids = batch.rows.column("request_id").to_pylist()
    os.write(applied, "".join(f"{i}\\n" for i in ids).encode())

config = TrainerConfig(
    group_id=group, batch_size=200, max_poll_records=2, state_path=state,
    sync=SyncConfig(interval_s=1.0, dense_every=3),
)
trainer = Trainer(
    KafkaSettings(kafka), Topics(prefix=prefix), start, publisher_for(redis_url, name), config,
    TrainerHooks(on_applied=on_applied),
)
print(json.dumps(trainer.run().to_dict()))
"""


def _applied_ids(path: Path) -> np.ndarray:
    if not path.exists():
        return np.zeros(0, dtype=np.int64)
    return np.array(path.read_text().split(), dtype=np.int64)


def test_a_killed_trainer_restarts_from_its_state_and_redis_stays_consistent(
    kafka, topics, movielens, redis_service, tmp_path
):
    name = unique_model_name()
    checkpoint = save_checkpoint(tmp_path / "offline.safetensors", small_model(movielens))
    publisher = publisher_for(redis_service.redis_url, name)
    version = publish_checkpoint(publisher, str(checkpoint)).version
    state, applied = tmp_path / "state.safetensors", tmp_path / "applied.txt"
    group = f"trainer-{uuid.uuid4().hex[:8]}"
    arguments = [kafka.bootstrap_servers, topics.prefix, group, redis_service.redis_url, name]
    command = [sys.executable, "-c", TRAINER_PROCESS, *arguments, str(checkpoint), str(state)]
    command.append(str(applied))

    sent = send_examples(
        kafka, topics.examples, example_rows(movielens, 4000), PARTITIONS, batch_rows=50, end=False
    )
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (
            state.exists()
            and read_manifest(state)["online"]["delta"] >= 1
            and len(_applied_ids(applied)) >= 1000
        ):
            assert time.monotonic() < deadline and first.poll() is None, "no delta was synced"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=10) == -signal.SIGKILL, "killed before the stream's end"
        before_restart = len(_applied_ids(applied))
        later = example_rows(movielens, 2000, start=4000)
        sent += send_examples(kafka, topics.examples, later, PARTITIONS, batch_rows=50)
        second = subprocess.run(command, cwd=REPO, capture_output=True, timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 0, second.stderr.decode()[-3000:]
    report = json.loads(second.stdout)

    ids = _applied_ids(applied)
    assert set(ids.tolist()) == set(range(6000)), "every example applied at least once"
    copies = len(ids) - 6000
    print(f"kill -9 after {before_restart} applied: {copies} examples applied twice")
    assert report["full_publishes"] == 0, "the restart continues the same version"
    reader = ParamReader(publisher.nodes, name)
    assert reader.live_version() == version == report["version"]
    assert reader.head(version).delta == report["delta"] == read_manifest(state)["online"]["delta"]
    assert_redis_holds(reader, load_checkpoint(state).model)
    assert _committed(kafka, group, topics.examples) == sent


def test_producer_joiner_and_trainer_ride_out_a_broker_frozen_for_10_seconds(
    kafka_service, kafka, topics, movielens, redis_service
):
    broker = kafka_service.kafka
    if broker is None:
        pytest.skip("the broker is not ours to freeze (EMBTAB_KAFKA is set)")
    events = 2000
    labels = movielens.read("test", ["label"]).column("label").to_numpy()[:events]
    applied: dict[int, list[int]] = {}

    def on_applied(batch) -> None:
        for request_id, label in zip(
            batch.rows.column("request_id").to_pylist(), batch.labels.tolist(), strict=True
        ):
            applied.setdefault(request_id, []).append(int(label))

    trainer = Trainer(
        kafka,
        topics,
        StartingPoint(small_model(movielens)),
        publisher_for(redis_service.redis_url, unique_model_name()),
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
    for thread in threads.values():
        thread.start()
    deadline = time.monotonic() + 30
    while not applied:
        assert time.monotonic() < deadline, "the trainer never got examples"
        time.sleep(0.05)
    assert threads["producer"].is_alive(), "the broker must freeze while the stream runs"
    broker.pause()
    try:
        time.sleep(10.0)
    finally:
        broker.resume()
    for name, thread in threads.items():
        thread.join(timeout=90)
        assert not thread.is_alive(), f"the {name} did not finish"

    assert replay.report.impressions == events
    assert sorted(event_index(request_id) for request_id in applied) == list(range(events))
    for request_id, seen in applied.items():
        assert set(seen) == {labels[event_index(request_id)]}, request_id
    copies = sum(len(seen) - 1 for seen in applied.values())
    print(
        f"frozen broker: {copies} examples applied twice, trainer rebalances "
        f"{trainer.report.rebalances}, commit failures {trainer.report.commit_failures}"
    )
    reader = ParamReader(trainer.sync.publisher.nodes, trainer.sync.publisher.model)
    assert reader.live_version() == trainer.report.version
    assert_redis_holds(reader, trainer.model)
