"""Offline data sets: each prepared once into Parquet splits plus a schema, then read by trainers.

Layout under `<cache>/prepared/<name>/`: `train.parquet`, `valid.parquet`, `test.parquet`,
`schema.json`, `info.json` (row counts, positive rate, cardinalities) and, for a data set
prepared from a spec, `artifact/` (the preprocessing artifact: how raw values become these
columns). Preparation writes into a temporary dir and renames it into place, so a
half-prepared data set is never read.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from feature_store.artifact import Preprocessor
from feature_store.schema import Schema
from feature_store.wheels import DataError, cache_dir

SPLITS = ("train", "valid", "test")
# 2: prepared from a spec, with the preprocessing artifact; copies of format 1 (the builders
# before the spec) are prepared again when they are opened.
FORMAT_VERSION = 2


class UnknownDatasetError(DataError, KeyError):
    """A data set name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class PreparedTables:
    """What a data set builder returns: its schema and the three time-ordered splits.

    A split is a whole table or a stream of record batches (for data too large for memory).
    """

    schema: Schema
    splits: dict[str, pa.Table | Iterable[pa.RecordBatch]]
    extra_info: dict


@dataclass(frozen=True)
class Dataset:
    """A prepared data set on disk."""

    name: str
    root: Path
    schema: Schema
    info: dict

    @property
    def artifact_dir(self) -> Path | None:
        """The preprocessing artifact's directory, None for a data set prepared without one."""
        path = self.root / "artifact"
        return path if path.is_dir() else None

    def preprocessor(self) -> Preprocessor | None:
        """The fitted preprocessing artifact (None for a data set prepared without one)."""
        directory = self.artifact_dir
        return None if directory is None else Preprocessor.load(directory)

    def path(self, split: str) -> Path:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
        return self.root / f"{split}.parquet"

    def read(self, split: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(split), columns=columns)

    def iter_batches(
        self, split: str, batch_size: int, columns: list[str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Record batches in file (time) order, `batch_size` rows each (the last may be short)."""
        parquet = pq.ParquetFile(self.path(split))
        yield from parquet.iter_batches(batch_size=batch_size, columns=columns)


def prepared_root(name: str) -> Path:
    return cache_dir() / "prepared" / name


def write_prepared(name: str, tables: PreparedTables) -> Dataset:
    """Write splits, schema and info atomically (temp dir, then rename over the old one)."""
    root = prepared_root(name)
    root.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root.parent))
    try:
        info = {
            "format_version": FORMAT_VERSION,
            "dataset": name,
            "rows": 0,
            "splits": {},
            "features": {},
            **tables.extra_info,
        }
        positives = 0
        for split in SPLITS:
            rows, split_positives = _write_split(
                tables.splits[split], scratch / f"{split}.parquet", tables.schema.label
            )
            info["splits"][split] = {"rows": rows, "positives": split_positives}
            info["rows"] += rows
            positives += split_positives
        info["positive_rate"] = positives / max(1, info["rows"])
        for spec in tables.schema.features:
            info["features"][spec.name] = {
                "kind": spec.kind,
                "cardinality": spec.cardinality,
                "max_length": spec.max_length,
            }
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return install_prepared(name, scratch, tables.schema, info)


def install_prepared(name: str, scratch: Path, schema: Schema, info: dict) -> Dataset:
    """Complete a prepared copy written in `scratch` (splits there already): add schema and
    info, then rename it over the old copy, so readers see the old or the new one whole."""
    root = prepared_root(name)
    try:
        info = {"format_version": FORMAT_VERSION, "dataset": name, **info}
        info.setdefault("positive_rate", info.get("positives", 0) / max(1, info["rows"]))
        info.setdefault(
            "features",
            {
                spec.name: {
                    "kind": spec.kind,
                    "cardinality": spec.cardinality,
                    "max_length": spec.max_length,
                }
                for spec in schema.features
            },
        )
        (scratch / "schema.json").write_text(schema.to_json())
        (scratch / "info.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        if root.exists():
            old = root.with_name(f".{name}-old-{scratch.name}")
            root.rename(old)
            scratch.rename(root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            scratch.rename(root)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return open_prepared(name)


def _write_split(
    split: pa.Table | Iterable[pa.RecordBatch], path: Path, label: str
) -> tuple[int, int]:
    """Write one split to Parquet; returns (rows, positives)."""
    batches = split.to_batches(max_chunksize=65536) if isinstance(split, pa.Table) else split
    rows = positives = 0
    writer = None
    try:
        for batch in batches:
            if writer is None:
                writer = pq.ParquetWriter(path, batch.schema)
            writer.write_batch(batch, row_group_size=65536)
            rows += batch.num_rows
            positives += int(np.count_nonzero(batch.column(label).to_numpy()))
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise DataError(f"split {path.stem!r} is empty; every split needs at least one row")
    return rows, positives


def open_prepared(name: str) -> Dataset:
    root = prepared_root(name)
    try:
        schema = Schema.from_json((root / "schema.json").read_text())
        info = json.loads((root / "info.json").read_text())
    except FileNotFoundError as error:
        raise DataError(
            f"data set {name!r} is not prepared; run `embtab data prepare {name}`"
        ) from error
    if info.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"data set {name!r} was prepared by another format version "
            f"({info.get('format_version')}, this is {FORMAT_VERSION}); prepare it again"
        )
    return Dataset(name=name, root=root, schema=schema, info=info)


def time_split(table: pa.Table, valid_fraction: float = 0.1, test_fraction: float = 0.1) -> dict:
    """Split a time-sorted table: last `test_fraction` is test, the slice before it valid."""
    rows = table.num_rows
    test_start = rows - int(round(rows * test_fraction))
    valid_start = test_start - int(round(rows * valid_fraction))
    return {
        "train": table.slice(0, valid_start),
        "valid": table.slice(valid_start, test_start - valid_start),
        "test": table.slice(test_start),
    }
