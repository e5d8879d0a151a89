"""No training/serving skew: raw rows scored in process (checkpoint + artifact) and through a
running `embtab serve` (raw values over HTTP) agree within 1e-6.

The data set is generated raw files, CSV with string ids or Parquet with 64-bit integer ids:
user ids (hashed, a collisionless table), item ids (a vocabulary with min_count 2 and an OOV id,
a full table), a hashed campaign id (a hash table), a tag list (delimited text in CSV, a list
column in Parquet), a dense price, the user's previous items and a count. The scored rows come
from the raw files and include ids never seen in training.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from bench.serving import Service
from feature_store.datasets import prepare_from_spec
from models.batches import batch_from_columns
from models.checkpoint import load_checkpoint
from models.config import run_config_from_dict
from models.train import train
from serving.published_model import publish_checkpoint
from serving.publisher import ParamPublisher
from serving.redis_nodes import RedisConfig, RedisNodes
from tests.serving.serving_helpers import unique_name

ROWS = 6000
SCORED = 1000
HISTORY = 5

SPEC = """
name: skew-clicks
source: {format: FORMAT, paths: ["clicks-*.FORMAT"]}
label: {column: clicked}
time: {column: ts, unit: ms}
roles: {user: user, item: item}
features:
  - {name: user, kind: categorical, type: ID_TYPE, ids: hash}
  - {name: item, kind: categorical, type: ID_TYPE, min_count: 2}
  - {name: campaign, kind: categorical, ids: hash}
  - {name: tags, kind: multi_valued, separator: "|"}
  - {name: price, kind: dense, transform: [log1p, standardise]}
  - {name: hist_item, kind: sequence, of: item, max_length: 5}
  - {name: user_events, kind: count, of: user, transform: [log1p]}
split: {by: time, valid: 0.1, test: 0.1}
"""


def raw_id(kind: str, number: int, id_type: str) -> str | int:
    """A user or item id as the source files hold it: text, or a 64-bit integer."""
    if id_type == "string":
        return f"{kind}-{number}"
    return (10**15 if kind == "user" else 10**12) + number * 1_000_003


def write_raw_files(directory: Path, file_format: str, id_type: str) -> pa.Table:
    rng = np.random.default_rng(7)
    user_numbers, item_numbers = rng.zipf(1.4, ROWS) % 400, rng.zipf(1.3, ROWS) % 900
    users = [raw_id("user", int(u), id_type) for u in user_numbers]
    items = [raw_id("sku", int(i), id_type) for i in item_numbers]
    campaigns = np.array([f"c{c}" for c in rng.integers(0, 30, ROWS)])
    tags = [list(rng.choice(list("abcdef"), rng.integers(0, 3), replace=False)) for _ in users]
    price = np.round(rng.lognormal(3, 1, ROWS), 2)
    affinity = (user_numbers + item_numbers) % 3 == 0
    clicked = (rng.random(ROWS) < np.where(affinity, 0.6, 0.15)).astype(np.int64)
    times = 1_700_000_000_000 + np.sort(rng.integers(0, 10**9, ROWS))
    table = pa.table(
        {
            "user": users,
            "item": items,
            "campaign": campaigns,
            "tags": pa.array(tags, pa.list_(pa.string())),
            "price": price,
            "clicked": clicked,
            "ts": times,
        }
    )
    half = ROWS // 2
    for index, part in enumerate((table.slice(0, half), table.slice(half))):
        path = directory / f"clicks-{index}.{file_format}"
        if file_format == "csv":
            joined = pa.array(["|".join(t) for t in part.column("tags").to_pylist()])
            pacsv.write_csv(part.set_column(3, "tags", joined), path)
        else:
            pq.write_table(part, path)
    spec = SPEC.replace("FORMAT", file_format).replace("ID_TYPE", id_type)
    (directory / "spec.yaml").write_text(spec)
    return table


def scored_rows(table: pa.Table, id_type: str) -> list[dict]:
    """The last SCORED raw rows, each with its user's previous items and event count (raw), plus
    ids never seen: new users, items and campaigns."""
    rows = table.to_pylist()
    seen: dict[object, list[object]] = {}
    out = []
    for position, row in enumerate(rows):
        past = seen.setdefault(row["user"], [])
        if position >= len(rows) - SCORED:
            out.append({**row, "hist_item": past[-HISTORY:], "user_events": len(past)})
        past.append(row["item"])
    for index in range(0, SCORED, 10):
        new_user, new_item = (
            raw_id("user", 10**6 + index, id_type),
            raw_id("sku", 10**6 + index, id_type),
        )
        out[index] = {**out[index], "user": new_user, "item": new_item}
        out[index + 1] = {**out[index + 1], "campaign": f"new-campaign-{index}"}
    return out


def in_process_scores(checkpoint, rows: list[dict], id_type: str) -> np.ndarray:
    """What the trained model says of the raw rows: the artifact encodes them, as in training."""
    preprocessing = checkpoint.model.spec.preprocessing
    id_arrow = pa.string() if id_type == "string" else pa.int64()
    raw = {
        "user": pa.array([r["user"] for r in rows], id_arrow),
        "item": pa.array([r["item"] for r in rows], id_arrow),
        "campaign": pa.array([r["campaign"] for r in rows]),
        "tags": pa.array([r["tags"] for r in rows], pa.list_(pa.string())),
        "price": pa.array([r["price"] for r in rows], pa.float64()),
        "hist_item": pa.array([r["hist_item"] for r in rows], pa.list_(id_arrow)),
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
                    "tags": row["tags"],
                    "price": row["price"],
                },
            }
        ],
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("file_format", "id_type"), [("csv", "string"), ("parquet", "int")], ids=["csv", "parquet"]
)
def test_raw_rows_score_the_same_in_process_and_served(
    tmp_path, monkeypatch, redis_service, file_format, id_type
):
    monkeypatch.setenv("EMBTAB_DATA", str(tmp_path / "cache"))
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    table = write_raw_files(raw_dir, file_format, id_type)
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
    methods = {table.name: table.method.name for table in checkpoint.model.spec.tables}
    assert methods == {
        "user": "collisionless",
        "item": "full",
        "campaign": "hash",
        "tags": "full",
    }

    rows = scored_rows(table, id_type)
    expected = in_process_scores(checkpoint, rows, id_type)

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
            wrong_type["candidates"] = [{"item_id": rows[0]["item"], "features": {"price": "no"}}]
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
