"""A small data set of the user's own kind (raw string ids, a request-id column, epoch-ms
times), prepared from a spec, and its events as per-event JSON messages, as a third-party
ad server would log them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from feature_store.datasets import prepare_from_spec
from feature_store.offline import Dataset

ROWS = 3000
USERS, ITEMS = 200, 300

SPEC = """
name: NAME
source: {format: parquet, paths: ["clicks.parquet"]}
label: {column: clicked}
time: {column: ts, unit: ms}
roles: {user: user, item: item, request: req}
features:
  - {name: user, kind: categorical, ids: hash}
  - {name: item, kind: categorical, min_count: 2}
  - {name: campaign, kind: categorical, oov: false}
  - {name: tags, kind: multi_valued, separator: "|"}
  - {name: price, kind: dense, transform: [log1p, standardise]}
split: {by: time, valid: 0.1, test: 0.1}
"""


def prepare_raw_dataset(directory: Path, name: str) -> Dataset:
    """Write the raw Parquet file and spec under `directory` and prepare it as `name`."""
    rng = np.random.default_rng(11)
    users = [f"u{n}" for n in rng.integers(0, USERS, ROWS)]
    items = [f"sku-{n}" for n in rng.zipf(1.3, ROWS) % ITEMS]
    table = pa.table(
        {
            "req": [f"r{n}" for n in range(ROWS)],
            "user": users,
            "item": items,
            "campaign": [f"c{n}" for n in rng.integers(0, 20, ROWS)],
            "tags": ["|".join(rng.choice(list("abcde"), 2, replace=False)) for _ in users],
            "price": np.round(rng.lognormal(3, 1, ROWS), 2),
            "clicked": (rng.random(ROWS) < 0.3).astype(np.int64),
            "ts": 1_700_000_000_000 + np.arange(ROWS, dtype=np.int64) * 1000,
        }
    )
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, directory / "clicks.parquet")
    (directory / "spec.yaml").write_text(SPEC.replace("NAME", name))
    return prepare_from_spec(directory / "spec.yaml")


def impression(request_id: str, at_s: float, user: str = "u1", item: str = "sku-1") -> dict:
    """One impression as a producer logs it: the spec's column names, raw values, epoch ms."""
    return {
        "req": request_id,
        "ts": int(at_s * 1000),
        "user": user,
        "item": item,
        "campaign": "c3",
        "tags": "a|c",
        "price": 19.5,
    }


def click(request_id: str, at_s: float) -> dict:
    return {"req": request_id, "ts": int(at_s * 1000)}


def encoded(event: dict) -> bytes:
    return json.dumps(event).encode()
