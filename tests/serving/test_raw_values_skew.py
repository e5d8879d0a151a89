"""No training/serving skew: raw rows scored in process (checkpoint + artifact) and through a
running `embtab serve` (raw values over HTTP) agree within 1e-6.

The data set is generated raw CSV with string user ids (hashed, a collisionless table), string
item ids (a vocabulary with min_count 2 and an OOV id, a full table), a hashed campaign id (a
hash table), a delimited tag list, a dense price, the user's previous items and a count. The
scored rows come from the raw files and include ids never seen in training.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import torch

from bench.serving import Service
from feature_store.datasets import prepare_from_spec
from models.batches import batch_from_columns
from models.checkpoint import load_checkpoint
from models.config import run_config_from_dict
from models.train import train
from serving.param_store import ParamPublisher
from serving.published_model import publish_checkpoint
from serving.redis_nodes import RedisConfig, RedisNodes
from tests.serving.serving_helpers import unique_name

ROWS = 6000
SCORED = 1000
HISTORY = 5

SPEC = """
name: skew-clicks
source: {format: csv, paths: ["clicks-*.csv"]}
label: {column: clicked}
time: {column: ts, unit: ms}
roles: {user: user, item: item}
features:
  - {name: user, kind: categorical, ids: hash}
  - {name: item, kind: categorical, min_count: 2}
  - {name: campaign, kind: categorical, ids: hash}
  - {name: tags, kind: multi_valued, separator: "|"}
  - {name: price, kind: dense, transform: [log1p, standardise]}
  - {name: hist_item, kind: sequence, of: item, max_length: 5}
  - {name: user_events, kind: count, of: user, transform: [log1p]}
split: {by: time, valid: 0.1, test: 0.1}
"""


def write_raw_files(directory: Path) -> pa.Table:
    rng = np.random.default_rng(7)
    users = np.array([f"user-{u}" for u in rng.zipf(1.4, ROWS) % 400])
    items = np.array([f"sku:{i}" for i in rng.zipf(1.3, ROWS) % 900])
    campaigns = np.array([f"c{c}" for c in rng.integers(0, 30, ROWS)])
    tags = np.array(
        ["|".join(rng.choice(list("abcdef"), rng.integers(0, 3), replace=False)) for _ in users]
    )
    price = np.round(rng.lognormal(3, 1, ROWS), 2)
    affinity = (np.char.str_len(users) + np.char.str_len(items)) % 3 == 0
    clicked = (rng.random(ROWS) < np.where(affinity, 0.6, 0.15)).astype(np.int64)
    times = 1_700_000_000_000 + np.sort(rng.integers(0, 10**9, ROWS))
    table = pa.table(
        {
            "user": users,
            "item": items,
            "campaign": campaigns,
            "tags": tags,
            "price": price,
            "clicked": clicked,
            "ts": times,
        }
    )
    half = ROWS // 2
    pacsv.write_csv(table.slice(0, half), directory / "clicks-1.csv")
    pacsv.write_csv(table.slice(half), directory / "clicks-2.csv")
    (directory / "spec.yaml").write_text(SPEC)
    return table


def scored_rows(table: pa.Table) -> list[dict]:
    """The last SCORED raw rows, each with its user's previous items and event count (raw), plus
    ids never seen: new users, items and campaigns."""
    rows = table.to_pylist()
    seen: dict[str, list[str]] = {}
    out = []
    for position, row in enumerate(rows):
        past = seen.setdefault(row["user"], [])
        if position >= len(rows) - SCORED:
            out.append({**row, "hist_item": past[-HISTORY:], "user_events": len(past)})
        past.append(row["item"])
    for index in range(0, SCORED, 10):
        out[index] = {**out[index], "user": f"new-user-{index}", "item": f"new-sku-{index}"}
        out[index + 1] = {**out[index + 1], "campaign": f"new-campaign-{index}"}
    return out


def in_process_scores(checkpoint, rows: list[dict]) -> np.ndarray:
    """What the trained model says of the raw rows: the artifact encodes them, as in training."""
    preprocessing = checkpoint.model.spec.preprocessing
    raw = {
        "user": pa.array([r["user"] for r in rows]),
        "item": pa.array([r["item"] for r in rows]),
        "campaign": pa.array([r["campaign"] for r in rows]),
        "tags": pa.array([[t for t in r["tags"].split("|") if t] for r in rows]),
        "price": pa.array([r["price"] for r in rows], pa.float64()),
        "hist_item": pa.array([r["hist_item"] for r in rows], pa.list_(pa.string())),
        "user_events": pa.array([float(r["user_events"]) for r in rows]),
    }
    columns = {name: preprocessing.encode(name, values) for name, values in raw.items()}
    batch = batch_from_columns(columns, checkpoint.schema, with_labels=False)
    with torch.no_grad():
        return torch.sigmoid(checkpoint.model(batch.sparse, batch.dense)).numpy()


def request_of(row: dict) -> dict:
    """A /score body with the row's raw values, as a client sends them."""
    return {
        "user_id": row["user"],
        "context": {"hist_item": row["hist_item"], "user_events": row["user_events"]},
        "candidates": [
            {
                "item_id": row["item"],
                "features": {
                    "campaign": row["campaign"],
                    "tags": [t for t in row["tags"].split("|") if t],
                    "price": row["price"],
                },
            }
        ],
    }


@pytest.mark.slow
def test_raw_rows_score_the_same_in_process_and_served(tmp_path, monkeypatch, redis_service):
    monkeypatch.setenv("EMBTAB_DATA", str(tmp_path / "cache"))
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    table = write_raw_files(raw_dir)
    dataset = prepare_from_spec(raw_dir / "spec.yaml")
    run = run_config_from_dict(
        {
            "dataset": dataset.name,
            "model": {"name": "dcn", "deep_mlp": [16], "cross_layers": 1},
            "tables": {
                "method": "full",
                "dim": 8,
                "overrides": {
                    "user": {"method": "collisionless", "min_count": 2, "capacity": 1000},
                    "campaign": {"method": "hash", "budget": 0.5},
                },
            },
            "train": {"epochs": 1, "batch_size": 512, "seed": 3},
        }
    )
    path = tmp_path / "model.safetensors"
    train(run, dataset, path, progress=False)
    checkpoint = load_checkpoint(path)
    methods = {table.name: table.method for table in checkpoint.model.spec.tables}
    assert methods == {
        "user": "collisionless",
        "item": "full",
        "campaign": "hash",
        "tags": "full",
    }

    rows = scored_rows(table)
    expected = in_process_scores(checkpoint, rows)

    model_name = unique_name("skew")
    nodes = RedisNodes(RedisConfig(urls=(redis_service.redis_url,)))
    publish_checkpoint(ParamPublisher(nodes, model_name), str(path))
    service = Service(redis_service.redis_url, cache_mb=0, model=model_name)
    try:
        service.wait_ready()
        with httpx.Client(base_url=f"http://127.0.0.1:{service.port}", timeout=30) as client:
            served = []
            for row in rows:
                response = client.post("/score", content=json.dumps(request_of(row)))
                assert response.status_code == 200, response.text
                served.append(response.json()["scores"][0])
            metrics = client.get("/metrics").text
            wrong_type = dict(request_of(rows[0]))
            wrong_type["candidates"] = [{"item_id": "sku:1", "features": {"price": "cheap"}}]
            refused = client.post("/score", content=json.dumps(wrong_type))
    finally:
        service.stop()
    np.testing.assert_allclose(np.asarray(served), expected, rtol=0, atol=1e-6)
    assert 'embtab_unknown_ids_total{feature="item"}' in metrics
    unknown_items = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith('embtab_unknown_ids_total{feature="item"}')
    )
    assert unknown_items >= SCORED // 10  # every new sku at least
    assert refused.status_code == 422
    assert refused.json()["field"] == "candidates[0].features.price"
