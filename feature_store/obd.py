"""Open Bandit Dataset sample (ZOZOTOWN fashion-ad clicks) from the `obp` wheel, prepared by its
bundled spec (`feature_store/specs/obd.yaml`) like any user's data.

Both logging policies (uniform random and Bernoulli Thompson sampling) of the "all" campaign are
merged in time order. Clicks are rare (well under 1%), which makes it the imbalance test case.
The reader is what this module adds: the source CSVs are wide (one user-item affinity column per
item) and do not say which policy logged them, so each policy's events are written once as
Parquet with a `policy` column and the affinity of the event's own item.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from feature_store.spec import DatasetSpec, load_spec
from feature_store.wheels import OBP, cache_dir, open_member

SPEC_PATH = Path(__file__).parent / "specs" / "obd.yaml"
POLICIES = ("random", "bts")
COLUMNS = ("timestamp", "item_id", "position", "click", *(f"user_feature_{i}" for i in range(4)))


def read_policy(policy: str) -> pa.Table:
    """One policy's events: the raw columns (times as text), its name and the event's affinity."""
    raw = open_member(OBP, f"obp/dataset/obd/{policy}/all/all.csv")
    table = pacsv.read_csv(
        io.BytesIO(raw),
        convert_options=pacsv.ConvertOptions(column_types={"timestamp": pa.string()}),
    )
    items = table.column("item_id").to_numpy()
    affinity = np.stack(
        [
            table.column(f"user-item_affinity_{item}").to_numpy()
            for item in range(int(items.max()) + 1)
        ],
        axis=1,
    )[np.arange(table.num_rows), items]
    columns = {name: table.column(name) for name in COLUMNS}
    columns["policy"] = pa.array([policy] * table.num_rows)
    columns["affinity"] = pa.array(affinity.astype(np.float32))
    return pa.table(columns)


def raw_dir() -> Path:
    """A directory holding one Parquet file per logging policy, written from the wheel once."""
    directory = cache_dir() / "raw" / "obd"
    if all((directory / f"{policy}.parquet").exists() for policy in POLICIES):
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    for policy in POLICIES:
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".parquet", delete=False) as handle:
            pq.write_table(read_policy(policy), handle.name)
        Path(handle.name).rename(directory / f"{policy}.parquet")
    return directory


def spec() -> DatasetSpec:
    """The bundled spec, reading the files written from the wheel."""
    bundled = load_spec(SPEC_PATH)
    return DatasetSpec(**{**bundled.__dict__, "base_dir": str(raw_dir())})
