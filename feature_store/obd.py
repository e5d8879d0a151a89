"""Open Bandit Dataset sample (ZOZOTOWN fashion-ad clicks) from the `obp` wheel.

Both logging policies (uniform random and Bernoulli Thompson sampling) of the "all" campaign are
merged in time order. Clicks are rare (well under 1%), which makes it the imbalance test case.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from feature_store.offline import PreparedTables, time_split
from feature_store.schema import FeatureSpec, Schema
from feature_store.wheels import OBP, open_member

POLICIES = ("random", "bts")
USER_FEATURES = tuple(f"user_feature_{index}" for index in range(4))


def encode(values: pa.Array) -> tuple[np.ndarray, int]:
    """Dense codes 0..n-1 in sorted order of the distinct values (deterministic), and n."""
    vocabulary = pc.unique(values).sort()
    return pc.index_in(values, value_set=vocabulary).to_numpy().astype(np.int64), len(vocabulary)


def read_policy(policy: str) -> pa.Table:
    raw = open_member(OBP, f"obp/dataset/obd/{policy}/all/all.csv")
    table = pacsv.read_csv(io.BytesIO(raw))
    return table.append_column("policy", pa.array([policy] * table.num_rows))


def build(name: str, progress: Callable[[str], None]) -> PreparedTables:
    progress("reading both logging policies")
    table = pa.concat_tables([read_policy(policy) for policy in POLICIES])
    # pyarrow parses the column as timestamp[ns, UTC]; keep whole seconds.
    timestamps = pc.cast(table.column("timestamp"), pa.int64()).to_numpy() // 1_000_000_000
    order = np.argsort(timestamps, kind="stable")
    table = table.take(pa.array(order))
    timestamps = timestamps[order]

    progress("encoding features")
    item_ids = table.column("item_id").to_numpy().astype(np.int64)
    n_items = int(item_ids.max()) + 1
    affinity = np.stack(
        [
            table.column(f"user-item_affinity_{item}").to_numpy().astype(np.float32)
            for item in range(n_items)
        ],
        axis=1,
    )
    columns: dict[str, pa.Array] = {
        "item_id": pa.array(item_ids),
        "position": pa.array(table.column("position").to_numpy().astype(np.int64) - 1),
    }
    cardinalities = {"item_id": n_items, "position": 3}
    for feature in (*USER_FEATURES, "policy"):
        codes, size = encode(table.column(feature))
        columns[feature] = pa.array(codes)
        cardinalities[feature] = size
    columns["affinity"] = pa.array(affinity[np.arange(len(item_ids)), item_ids])
    columns["label"] = pa.array(table.column("click").to_numpy().astype(np.int8))
    columns["timestamp"] = pa.array(timestamps)
    prepared = pa.table(columns)

    features = tuple(
        FeatureSpec(feature, "categorical", cardinalities[feature])
        for feature in ("item_id", "position", *USER_FEATURES, "policy")
    ) + (FeatureSpec("affinity", "dense"),)
    schema = Schema(
        dataset=name,
        features=features,
        id_columns={"user": "user_feature_0", "item": "item_id"},
    )
    return PreparedTables(
        schema=schema, splits=time_split(prepared), extra_info={"source": OBP.requirement}
    )
