"""The streaming trainer killed (-9) in the middle of sending a delta, and restarted, while the
service scores under load (moved here from tests/online_training/test_trainer_faults.py and
extended: the kill now lands inside a sync, with a service watching).

The trainer's Redis link is slow (a pause before every packet it sends), so that the kill lands
after the delta's number is reserved and part of it is sent. It must end with every example
applied at least once (by request id: copies allowed), no row of the killed delta readable and
the service never showing it (its version, delta and dense revision stay on the last committed
one), and, after the restart, Redis and the service holding exactly the trainer's final state.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from models.checkpoint import load_checkpoint, read_manifest, save_checkpoint
from serving.keys import ModelKeys
from serving.published_model import publish_checkpoint
from serving.reader import ParamReader
from tests.faults.stack import Load, assert_serves_what_redis_holds, score_bodies, served
from tests.online_training.conftest import PARTITIONS
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
# Its Redis link is slow (a pause before each packet it sends), so that a push lasts long
# enough to be killed halfway through sending.
TRAINER_PROCESS = """
import json, logging, os, sys, time
from online_training.kafka import KafkaSettings, Topics
from online_training.sync import SyncConfig
from online_training.trainer import Trainer
from online_training.trainer_config import TrainerConfig, TrainerHooks
from online_training.trainer_state import StartingPoint
from redis.connection import AbstractConnection
from serving.publisher import ParamPublisher, StoreOptions
from serving.redis_nodes import RedisConfig, RedisNodes
kafka, prefix, group, redis_url, name, checkpoint, state, applied_path = sys.argv[1:9]
logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
start = StartingPoint.resume(state, name) or StartingPoint.from_checkpoint(checkpoint)
applied = os.open(applied_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

def on_applied(batch):
    ids = batch.rows.column("request_id").to_pylist()
    os.write(applied, "".join(f"{i}\\n" for i in ids).encode())

send = AbstractConnection.send_packed_command

def slow_link(self, command, check_health=True):  # 50 ms per packet of a few KB
    for packet in [command] if isinstance(command, (bytes, str)) else command:
        time.sleep(0.05)
        send(self, [packet], check_health)

AbstractConnection.send_packed_command = slow_link
nodes = RedisNodes(RedisConfig.parse(redis_url, socket_timeout_s=0.5, retries=0))
publisher = ParamPublisher(nodes, name, StoreOptions(grace_s=5.0))
config = TrainerConfig(
    group_id=group, batch_size=200, max_poll_records=2, state_path=state,
    sync=SyncConfig(interval_s=1.0, dense_every=3),
)
trainer = Trainer(
    KafkaSettings(kafka), Topics(prefix=prefix), start, publisher, config,
    TrainerHooks(on_applied=on_applied),
)
print(json.dumps(trainer.run().to_dict()))
"""


def _applied_ids(path: Path) -> np.ndarray:
    if not path.exists():
        return np.zeros(0, dtype=np.int64)
    return np.array(path.read_text().split(), dtype=np.int64)


def _head(meta, name: str, version: int) -> tuple[int, int, int]:
    """(delta reserved, delta committed, dense revision) of a version, straight from Redis."""
    reserved, committed, dense = meta.hmget(
        ModelKeys(name).head(version), "delta_seq", "delta", "dense"
    )
    return int(reserved or 0), int(committed or 0), int(dense)


def _rows_ahead_of(reader: ParamReader, state: Path) -> int:
    """Rows in Redis that differ from the trainer's last committed state: what the killed
    delta had written in place before it died."""
    model = load_checkpoint(state).model
    manifest = reader.manifest(reader.live_version())
    ahead = 0
    for layout in manifest.tables:
        exported = list(model.embeddings.export_rows(layout.name))
        want = dict(
            zip(
                np.concatenate([ids.numpy() for ids, _ in exported]).tolist(),
                np.concatenate([rows.float().numpy() for _, rows in exported]),
                strict=True,
            )
        )
        ids, rows = reader.scan_table(manifest, layout.name)
        ahead += sum(
            not np.array_equal(row, want[i]) if i in want else True
            for i, row in zip(ids.tolist(), rows, strict=True)
        )
    return ahead


def test_a_trainer_killed_inside_a_sync_restarts_and_no_half_applied_delta_is_served(
    kafka, topics, movielens, redis_service, tmp_path
):
    url = redis_service.redis_url
    name = unique_model_name("killed")
    checkpoint = save_checkpoint(tmp_path / "offline.safetensors", small_model(movielens))
    publisher = publisher_for(url, name)
    version = publish_checkpoint(publisher, str(checkpoint)).version
    meta = publisher.nodes.meta
    state, applied = tmp_path / "state.safetensors", tmp_path / "applied.txt"
    group = f"trainer-{uuid.uuid4().hex[:8]}"
    arguments = [kafka.bootstrap_servers, topics.prefix, group, url, name]
    command = [sys.executable, "-c", TRAINER_PROCESS, *arguments, str(checkpoint), str(state)]
    command.append(str(applied))
    bodies = score_bodies(movielens)

    sent = send_examples(
        kafka, topics.examples, example_rows(movielens, 4000), PARTITIONS, batch_rows=50, end=False
    )
    with served(url, name) as (service, client), Load(service.port, bodies) as load:
        first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 90
            while True:
                assert time.monotonic() < deadline and first.poll() is None, "no sync to kill"
                reserved, committed, _ = _head(meta, name, version)
                if (
                    committed >= 1
                    and reserved > committed
                    and state.exists()
                    and len(_applied_ids(applied)) >= 1000
                ):
                    time.sleep(0.15)  # into the push: part of it sent
                    if _head(meta, name, version)[0] > _head(meta, name, version)[1]:
                        break
                time.sleep(0.002)
            first.send_signal(signal.SIGKILL)
            assert first.wait(timeout=10) == -signal.SIGKILL, "killed before the stream's end"
            reserved, committed, dense = _head(meta, name, version)
            assert reserved > committed, "the kill must land inside a sync"
            assert read_manifest(state)["online"]["delta"] == committed
            # The killed delta never goes live: the service stays on the last committed one.
            for _ in range(10):
                shown = client.get("/version").json()
                assert (shown["version"], shown["dense_revision"]) == (version, dense)
                assert shown["delta"] <= committed
                time.sleep(0.1)
            exposed = _rows_ahead_of(ParamReader(publisher.nodes, name), state)
            assert exposed == 0, f"{exposed} rows of the killed delta are readable"
            before_restart = len(_applied_ids(applied))
            later = example_rows(movielens, 2000, start=4000)
            sent += send_examples(kafka, topics.examples, later, PARTITIONS, batch_rows=50)
            second = subprocess.run(command, cwd=REPO, capture_output=True, timeout=180)
        finally:
            if first.poll() is None:
                first.kill()
        assert second.returncode == 0, second.stderr.decode()[-3000:]
        report = json.loads(second.stdout)
        assert_serves_what_redis_holds(client, url, name, bodies)
    load.assert_answered_throughout(max_ms=2000)

    ids = _applied_ids(applied)
    assert set(ids.tolist()) == set(range(6000)), "every example applied at least once"
    copies = len(ids) - 6000
    print(
        f"kill -9 inside delta {reserved} (committed {committed}) after {before_restart} "
        f"applied: {copies} examples applied twice; {exposed} rows of the killed delta were "
        f"readable in place until the restart's deltas; load: {load.describe()}"
    )
    assert report["full_publishes"] == 0, "the restart continues the same version"
    reader = ParamReader(publisher.nodes, name)
    assert reader.live_version() == version == report["version"]
    assert reader.head(version).delta == report["delta"] == read_manifest(state)["online"]["delta"]
    assert report["delta"] > reserved, "the restart's deltas come after the killed one"
    assert_redis_holds(reader, load_checkpoint(state).model)
    assert _committed(kafka, group, topics.examples) == sent
