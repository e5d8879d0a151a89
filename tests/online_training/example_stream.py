"""Examples written straight to an examples topic (no producer, no joiner), and a small model,
for the streaming trainer's tests."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

import numpy as np
import pyarrow as pa
from kafka import KafkaProducer

from feature_store.offline import Dataset
from models.base import Model
from models.build import build_model, plan_model
from models.config import DCNConfig, RunConfig, TablesConfig, TrainConfig
from online_training import messages
from online_training.kafka import KafkaSettings, user_partitions
from serving.publisher import ParamPublisher, StoreOptions
from serving.redis_nodes import RedisConfig, RedisNodes


def example_rows(movielens: Dataset, count: int, start: int = 0) -> pa.RecordBatch:
    """Examples of the test split's events [start, start + count): request id = event index."""
    schema = movielens.schema
    columns = [spec.name for spec in schema.features] + [schema.label, schema.time_column]
    table = movielens.read("test", columns).slice(start, count).combine_chunks()
    rows = {name: table.column(name).chunk(0) for name in columns[:-2]}
    rows["request_id"] = pa.array(np.arange(start, start + table.num_rows, dtype=np.int64))
    rows["event_time"] = pa.array(table.column(schema.time_column).to_numpy().astype(np.float64))
    rows["produced_at"] = pa.array(np.full(table.num_rows, time.time()))
    rows["label"] = pa.array(table.column(schema.label).to_numpy().astype(np.int8))
    return pa.RecordBatch.from_pydict(rows)


def send_examples(
    kafka: KafkaSettings,
    topic: str,
    rows: pa.RecordBatch,
    partitions: int,
    *,
    batch_rows: int = 256,
    end: bool = True,
) -> Counter[int]:
    """Send `rows` as example messages, partitioned by user, then (with `end`) an end marker
    per partition; returns the messages sent to each partition."""
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all")
    sent: Counter[int] = Counter()
    try:
        where = user_partitions(rows.column("user_id").to_numpy(), partitions)
        for partition in range(partitions):
            mine = rows.filter(pa.array(where == partition))
            for start in range(0, mine.num_rows, batch_rows):
                piece = mine.slice(start, batch_rows)
                watermark = float(piece.column("event_time")[0].as_py())
                batch = messages.Batch(messages.EXAMPLES, piece, watermark=watermark)
                producer.send(topic, messages.encode(batch), partition=partition)
                sent[partition] += 1
            if end:
                marker = messages.heartbeat(messages.EXAMPLES, 0.0, end_of_stream=True)
                producer.send(topic, messages.encode(marker), partition=partition)
                sent[partition] += 1
        producer.flush(timeout=30)
    finally:
        producer.close()
    return sent


def small_run_config(**tables) -> RunConfig:
    """DCN-v2 with narrow tables and layers: quick to build, train and publish."""
    return RunConfig(
        model=DCNConfig(cross_layers=1, deep_mlp=(16,)),
        tables=TablesConfig(dim=4, **tables),
        train=TrainConfig(dense_lr=3e-3),
    )


def small_model(movielens: Dataset, **tables) -> Model:
    return build_model(plan_model(small_run_config(**tables), movielens.schema))


def unique_model_name(prefix: str = "test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def publisher_for(redis_url: str, model_name: str) -> ParamPublisher:
    """A publisher with short timeouts and no client-side retries (the sync retries itself)."""
    nodes = RedisNodes(RedisConfig.parse(redis_url, socket_timeout_s=0.5, retries=0))
    return ParamPublisher(nodes, model_name, StoreOptions(grace_s=5.0))


def stops_by_itself(run: Callable[[threading.Event], object], timeout_s: float = 40) -> bool:
    """Run `run(stop)` on a thread: True if it returned within `timeout_s` on its own (it is
    then stopped either way, so a test that fails leaves no thread behind)."""
    stop = threading.Event()
    running = threading.Thread(target=run, args=(stop,), daemon=True)
    running.start()
    running.join(timeout=timeout_s)
    finished = not running.is_alive()
    stop.set()
    running.join(timeout=30)
    return finished
