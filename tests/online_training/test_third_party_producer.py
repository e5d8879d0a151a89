"""A producer embtab did not write: confluent-kafka (librdkafka) sends per-event JSON
impressions and clicks, keyed by request id with Kafka's default (murmur2) partitioner, to the
embedded broker. The joiner joins them through the data set's artifact, the trainer trains, a
delta lands in Redis, and `/score` with raw ids serves what the trained model says. Bad events
are dead-lettered and the good ones around them go through."""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid

import httpx
import numpy as np
import pyarrow as pa
import pytest
import torch
from confluent_kafka import Producer

from bench.serving import Service
from models.batches import batch_from_columns
from models.build import build_model, plan_model
from models.config import run_config_from_dict
from online_training.joiner import Joiner
from online_training.joiner_config import JoinerConfig
from online_training.sync import SyncConfig
from online_training.trainer import Trainer
from online_training.trainer_config import TrainerConfig
from online_training.trainer_state import StartingPoint
from serving.reader import ParamReader
from tests.online_training.example_stream import publisher_for, unique_model_name
from tests.online_training.raw_events import click, encoded, impression

NEW_USER = "user-never-seen-offline"
EVENTS = 600


def _model(dataset):
    """DCN over the raw data set: users in a collisionless table (raw ids admitted on sight)."""
    run = run_config_from_dict(
        {
            "dataset": dataset.name,
            "model": {"name": "dcn", "deep_mlp": [16], "cross_layers": 1},
            "tables": {
                "method": "full",
                "dim": 4,
                "overrides": {"user": {"method": "collisionless", "capacity": 1000}},
            },
            "train": {"dense_lr": 0.05, "seed": 0},
        }
    )
    torch.manual_seed(0)
    return build_model(plan_model(run, dataset.schema, dataset.preprocessor()))


def _scores(model, preprocessor, schema, user: str, items: list[str]) -> np.ndarray:
    """What `model` says of raw values, encoded by the artifact as the stream encodes them."""
    count = len(items)
    raw = {
        "user": pa.array([user] * count),
        "item": pa.array(items),
        "campaign": pa.array(["c3"] * count),
        "tags": pa.array([["a", "c"]] * count, pa.list_(pa.string())),
        "price": pa.array([19.5] * count),
    }
    columns = {name: preprocessor.encode(name, values) for name, values in raw.items()}
    batch = batch_from_columns(columns, schema, with_labels=False)
    model.eval()
    with torch.no_grad():
        return torch.sigmoid(model(batch.sparse, batch.dense)).numpy()


def _produce(bootstrap: str, topics) -> None:
    producer = Producer(
        {"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "linger.ms": 5}
    )
    start = time.time() - 60
    for index in range(EVENTS):
        request = f"req-{uuid.uuid4().hex[:6]}-{index}"
        user = NEW_USER if index % 2 == 0 else f"u{index % 50}"
        shown = impression(request, start + index * 0.05, user, f"sku-{index % 5}")
        producer.produce(topics.feature_log, encoded(shown), key=request)
        if user == NEW_USER:  # the new user clicks everything
            clicked = click(request, start + index * 0.05 + 0.5)
            producer.produce(topics.actions, encoded(clicked), key=request)
        if index == EVENTS // 2:
            producer.produce(topics.feature_log, b'{"req": "broken', key=b"broken")
            producer.produce(topics.feature_log, json.dumps({"req": "x"}).encode(), key=b"x")
            producer.produce(topics.actions, encoded({"req": "y", "ts": "later"}), key=b"y")
    assert producer.flush(30) == 0


@pytest.mark.slow
def test_third_party_json_is_joined_trained_and_served(kafka, topics, raw_dataset, redis_service):
    model = _model(raw_dataset)
    before = copy.deepcopy(model)
    preprocessor = raw_dataset.preprocessor()
    name = unique_model_name("json")
    trainer = Trainer(
        kafka,
        topics,
        StartingPoint(model),
        publisher_for(redis_service.redis_url, name),
        TrainerConfig(
            group_id=f"trainer-{uuid.uuid4().hex[:8]}",
            min_batch_rows=64,
            max_batch_wait_s=0.5,
            idle_timeout_s=10.0,
            auc_window=100,
            sync=SyncConfig(interval_s=1.0, dense_every=1),
        ),
    )
    joiner = Joiner(
        kafka,
        topics,
        JoinerConfig(
            group_id=f"joiner-{uuid.uuid4().hex[:8]}",
            window_s=2.0,
            allowed_lateness_s=1.0,
            idle_after_s=1.0,
            idle_timeout_s=6.0,
            feature_log_format="json",
            actions_format="json",
        ),
        preprocessor=preprocessor,
    )
    training = threading.Thread(target=trainer.run, daemon=True)
    joining = threading.Thread(target=joiner.run, daemon=True)
    training.start()
    joining.start()
    _produce(kafka.bootstrap_servers, topics)
    joining.join(timeout=120)
    training.join(timeout=120)
    assert not joining.is_alive() and not training.is_alive()

    joined = joiner.report
    assert joined.examples == EVENTS
    assert joined.positives == EVENTS // 2
    assert joined.dlq == {"malformed-json": 1, "missing-field": 1, "bad-time": 1}
    trained = trainer.report
    assert trained.examples == EVENTS and trained.deltas >= 1
    reader = ParamReader(trainer.sync.publisher.nodes, name)
    assert reader.live_version() == trained.version
    assert reader.head(trained.version).delta == trained.delta

    items = [f"sku-{i}" for i in range(5)]
    expected = _scores(trainer.model, preprocessor, raw_dataset.schema, NEW_USER, items)
    untrained = _scores(before, preprocessor, raw_dataset.schema, NEW_USER, items)
    assert np.abs(expected - untrained).max() > 1e-3, "training moved the new user's scores"
    body = {
        "user_id": NEW_USER,
        "candidates": [
            {"item_id": item, "features": {"campaign": "c3", "tags": ["a", "c"], "price": 19.5}}
            for item in items
        ],
    }
    service = Service(redis_service.redis_url, cache_mb=0, model=name)
    try:
        service.wait_ready()
        with httpx.Client(base_url=f"http://127.0.0.1:{service.port}", timeout=30) as client:
            response = client.post("/score", content=json.dumps(body))
    finally:
        service.stop()
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["scores"], expected, rtol=0, atol=1e-5)
