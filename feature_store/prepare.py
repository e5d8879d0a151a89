"""One preparation path: a data-set spec over raw files -> Parquet splits + schema + artifact.

The files are streamed as record batches (pyarrow's CSV reader or Parquet row groups), so memory
is bounded by the batch, the vocabularies and the time buckets held, not by the row count:

1. scan: parse label and event time of every row, keep the event times (of Parquet files
   only those columns are read; CSV/TSV text is parsed whole, once, and what it parsed is kept
   in a temporary Arrow stream that the next passes read);
2. fit: read every column, checking every value a later pass relies on (all errors are raised
   by here, before anything is written), and count vocabulary values and dense statistics over
   the fit rows (`fit_on`);
3. encode: apply the fitted `Preprocessor` batch by batch into time buckets, and hand each
   bucket on as soon as the reading has passed its last row (a nearly time-ordered source holds
   about one bucket; any other is spilled to temporary Parquet files, read back in order);
4. order: sort each bucket by (time, user, item, source row), build sequence and count features
   with their per-user state carried across buckets, and write the splits (on a background
   thread, overlapping the encoding of the next bucket).

String ids are read dictionary-encoded (Parquet's own dictionaries, or the CSV reader's), so
each batch's distinct values are counted, hashed and looked up once, not once per row.

Reading and checking the files is `raw_source`'s job, the last pass `ordering`'s; this module
runs the passes and holds the fit and the buckets.

Everything is written into a temporary directory renamed into place at the end
(`offline.install_prepared`), so a failed run leaves the previous prepared copy untouched.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from feature_store.artifact import (
    Preprocessor,
    Vocabulary,
    dense_steps,
    feature_seed,
    splitmix64,
)
from feature_store.offline import Dataset, install_prepared, prepared_root
from feature_store.ordering import time_split_sizes, write_ordered_splits
from feature_store.raw_source import BATCH_ROWS, PrepareError, RawReader, resolve_files
from feature_store.spec import DatasetSpec, FeatureDef

BUCKET_ROWS = 1_000_000

Progress = Callable[[str, int], None]


def prepare_spec(
    spec: DatasetSpec,
    progress: Progress = lambda stage, rows: None,
    *,
    batch_rows: int = BATCH_ROWS,
    bucket_rows: int = BUCKET_ROWS,
) -> Dataset:
    """Prepare the spec'd data set under its name (replacing an older copy only when complete)."""
    files = resolve_files(spec.source, spec.base_dir, "source.paths")
    reader = RawReader(spec, files, batch_rows)
    reader.check_columns()
    root = prepared_root(spec.name)
    root.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=root.parent))
    try:
        reader.stash_text_in(scratch / "parsed")
        time_keys, fit_mask, rows = _scan(reader, progress)
        preprocessor, distinct, listed = _fit(spec, reader, fit_mask, progress)
        buckets = _Buckets(scratch / "buckets", time_keys, bucket_rows, batch_rows)
        del time_keys
        tables = _encode(spec, reader, preprocessor, listed, buckets, progress)
        info = write_ordered_splits(spec, preprocessor, tables, listed, rows, scratch)
        shutil.rmtree(scratch / "buckets", ignore_errors=True)
        shutil.rmtree(scratch / "parsed", ignore_errors=True)
        preprocessor.save(scratch / "artifact")
        info.update(distinct)
        return install_prepared(spec.name, scratch, preprocessor.schema(), info)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


# -- pass 1: scan --------------------------------------------------------------------------


def _scan(reader: RawReader, progress: Progress) -> tuple[np.ndarray, np.ndarray | None, int]:
    """All event times (as sort keys), the fit rows (None: all rows), and the row count.

    Only the label and time columns (and join keys) are read: the fit pass that follows reads
    and checks every other column, still before anything is written."""
    keys: list[np.ndarray] = []
    for batch in reader.batches(columns=[]):
        keys.append(batch.time_key)
        progress("scan", len(batch.time_key))
    time_keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    rows = len(time_keys)
    if rows == 0:
        raise PrepareError("the source files hold no rows")
    spec = reader.spec
    if spec.fit_on == "all":
        return time_keys, None, rows
    split_of = _random_split(spec, 0, rows) if spec.split.by == "random" else None
    if split_of is not None:
        return time_keys, split_of == 0, rows
    train_rows = time_split_sizes(spec, rows)[0]
    ordered = np.sort(time_keys, kind="stable")
    boundary = ordered[train_rows] if train_rows < rows else ordered[-1] + 1
    return time_keys, time_keys < boundary, rows


def _random_split(spec: DatasetSpec, first_row: int, count: int) -> np.ndarray:
    """0/1/2 (train/valid/test) per source row: a seeded hash of the row's index."""
    rows = np.arange(first_row, first_row + count, dtype=np.uint64)
    mixed = splitmix64(rows ^ np.uint64(spec.split.seed & 0xFFFFFFFFFFFFFFFF))
    uniform = (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.where(
        uniform < spec.split.test, 2, np.where(uniform < spec.split.test + spec.split.valid, 1, 0)
    ).astype(np.int8)


# -- pass 2: fit ---------------------------------------------------------------------------


class _Counter:
    """Value counts of one column, merged as batches arrive (memory ~ distinct values).

    A dictionary-encoded batch is counted by its indices (no value is hashed per row); the
    batches' counts are merged by value every `MERGE_EVERY` batches."""

    MERGE_EVERY = 16

    def __init__(self) -> None:
        self.parts: list[pa.Table] = []

    def add(self, column: pa.Array) -> None:
        """Count the non-null values of `column` (plain, or dictionary-encoded)."""
        if pa.types.is_dictionary(column.type):
            indices = np.asarray(column.indices.drop_null(), dtype=np.int64)
            counts = np.bincount(indices, minlength=len(column.dictionary))
            present = np.flatnonzero(counts)
            values, counts = column.dictionary.take(pa.array(present)), counts[present]
        else:
            counted = pc.value_counts(column.drop_null())
            values, counts = counted.field("values"), counted.field("counts")
        self.parts.append(pa.table({"value": values, "count": pa.array(counts, pa.int64())}))
        if len(self.parts) > self.MERGE_EVERY:
            self.merged()

    def merged(self) -> pa.Table:
        if not self.parts:
            return pa.table({"value": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
        table = pa.concat_tables(self.parts)
        merged = (
            table.group_by("value").aggregate([("count", "sum")]).rename_columns(["value", "count"])
        )
        self.parts = [merged]
        return merged


class _Moments:
    """Count, sum and sum of squares of a stream of numbers, the same whatever the batches.

    The values are summed in fixed chunks of `CHUNK` consecutive values (a batch's remainder
    waits for the next batch), and the chunk sums are added with `math.fsum` (correctly
    rounded, so their order does not matter): the statistics, and so the artifact's content
    hash, do not depend on `batch_rows`."""

    CHUNK = 4096

    def __init__(self) -> None:
        self.pending = np.zeros(0, dtype=np.float64)
        self.sums: list[float] = []
        self.squares: list[float] = []
        self.count = 0

    def add(self, numbers: np.ndarray) -> None:
        numbers = np.concatenate([self.pending, numbers])
        full = len(numbers) - len(numbers) % self.CHUNK
        for start in range(0, full, self.CHUNK):
            self._sum(numbers[start : start + self.CHUNK])
        self.pending = numbers[full:]

    def _sum(self, chunk: np.ndarray) -> None:
        self.sums.append(float(chunk.sum()))
        self.squares.append(float(np.square(chunk).sum()))
        self.count += len(chunk)

    def mean_std(self) -> tuple[float, float]:
        """(mean, standard deviation); (0, 1) without values, std 1 for a constant."""
        self._sum(self.pending)
        self.pending = np.zeros(0, dtype=np.float64)
        if not self.count:
            return 0.0, 1.0
        mean = math.fsum(self.sums) / self.count
        variance = math.fsum(self.squares) / self.count - mean * mean
        return mean, math.sqrt(variance) if variance > 0 else 1.0


def _fit(
    spec: DatasetSpec, reader: RawReader, fit_mask: np.ndarray | None, progress: Progress
) -> tuple[Preprocessor, dict[str, int], set[str]]:
    """The fitted preprocessor, how many distinct users and items all rows hold (the `users`
    and `items` of info.json), and the categorical features some row of which becomes an empty
    bag (stored as list<int64>, every other one as int64)."""
    roles = {f"{role}s": column for role, column in spec.roles.items() if role in ("user", "item")}
    # Index ids need no vocabulary: they are counted only to report distinct users and items.
    counters = {
        f.name: _Counter()
        for f in spec.features
        if f.has_ids and (f.ids != "index" or f.name in roles.values())
    }
    # A categorical feature whose values can be dropped (no OOV id) is a list column; whether
    # any is dropped is known once its vocabulary is, from every row's distinct values.
    droppable = [
        f.name
        for f in spec.features
        if f.kind == "categorical" and f.ids == "vocabulary" and not f.oov
    ]
    # With fit_on all the vocabulary counters see every row; else these get their own.
    everyone = (
        {} if fit_mask is None else {name: _Counter() for name in {*roles.values(), *droppable}}
    )
    with_nulls: set[str] = set()
    moments = {
        f.name: _Moments()
        for f in spec.features
        if f.kind == "dense" and "standardise" in f.transform
    }
    max_lengths: dict[str, int] = {}
    for batch in reader.batches():
        rows = len(batch.label)
        # A time-ordered source's batches are mostly all fit rows or none: no filter then.
        fitting = None if fit_mask is None else fit_mask[batch.first_row : batch.first_row + rows]
        mask = None if fitting is None or fitting.all() else pa.array(fitting)
        fits = fitting is None or fitting.any()
        for feature in spec.features:
            if feature.kind == "categorical" and batch.columns[feature.name].null_count:
                with_nulls.add(feature.name)
            if feature.kind == "multi_valued":
                lengths = pc.list_value_length(batch.columns[feature.name]).fill_null(0)
                max_lengths[feature.name] = max(
                    max_lengths.get(feature.name, 0), int(pc.max(lengths).as_py() or 0)
                )
            if feature.name in everyone:
                everyone[feature.name].add(batch.columns[feature.name])
            if fits and feature.name in counters:
                values = batch.columns[feature.name]
                if mask is not None:
                    values = values.filter(mask)
                if feature.kind == "multi_valued":
                    values = pc.list_flatten(values)
                counters[feature.name].add(values)
            if fits and feature.name in moments:
                values = batch.columns[feature.name]
                if mask is not None:
                    values = values.filter(mask)
                numbers = dense_steps(feature, values, None)
                moments[feature.name].add(numbers[~np.isnan(numbers)])
        progress("fit", rows)
    vocabularies: dict[str, Vocabulary] = {}
    cardinalities: dict[str, int] = {}
    for feature in spec.features:
        if not feature.has_ids:
            continue
        if feature.ids == "index":
            cardinalities[feature.name] = feature.cardinality + int(feature.oov)
            continue
        counts = counters[feature.name].merged()
        if feature.hashed:
            cardinalities[feature.name] = feature.cardinality or max(1, counts.num_rows)
            continue
        kept = counts.filter(pc.greater_equal(counts.column("count"), feature.min_count))
        values = pc.sort_indices(kept, sort_keys=[("value", "ascending")])
        vocabulary = Vocabulary(
            kept.column("value")
            .take(values)
            .combine_chunks()
            .cast(pa.string() if feature.type == "string" else pa.int64()),
            oov=feature.oov,
            seed=feature_seed(feature.name),
        )
        vocabularies[feature.name] = vocabulary
        cardinalities[feature.name] = max(1, vocabulary.size)
    dense_stats = {name: moment.mean_std() for name, moment in moments.items()}
    for feature in spec.features:
        if feature.kind == "sequence":
            max_lengths[feature.name] = feature.max_length
        elif feature.kind == "multi_valued" and feature.max_length:
            max_lengths[feature.name] = min(feature.max_length, max_lengths.get(feature.name, 1))
        elif feature.kind == "multi_valued":
            max_lengths[feature.name] = max(1, max_lengths.get(feature.name, 1))
    distinct = {
        key: (everyone.get(column) or counters[column]).merged().num_rows
        for key, column in roles.items()
    }
    listed = {
        f.name
        for f in spec.features
        if f.kind == "categorical" and (f.ids == "hash" or not f.oov) and f.name in with_nulls
    }
    listed.update(
        name
        for name in droppable
        if (everyone.get(name) or counters[name]).merged().num_rows > len(vocabularies[name].values)
    )
    preprocessor = Preprocessor(spec, vocabularies, dense_stats, cardinalities, max_lengths)
    return preprocessor, distinct, listed


# -- pass 3: encode into time buckets ------------------------------------------------------


def _bucket_boundaries(time_keys: np.ndarray, bucket_rows: int) -> np.ndarray:
    count = -(-len(time_keys) // bucket_rows)
    if count <= 1:
        return np.zeros(0, dtype=np.int64)
    ordered = np.sort(time_keys)
    cuts = ordered[(np.arange(1, count) * len(ordered)) // count]
    return np.unique(cuts)


class _Buckets:
    """Encoded rows grouped by time range, handed on in time order as each range completes.

    Where the source is nearly in time order (a bucket's rows are all read while at most
    `HELD_BUCKETS` buckets' worth of rows are held), buckets stay in memory and each is handed
    on as soon as the reading has passed its last row; otherwise every bucket is spilled to a
    temporary Parquet file and they are read back one by one at the end."""

    HELD_BUCKETS = 2

    def __init__(self, directory: Path, time_keys: np.ndarray, bucket_rows: int, batch_rows: int):
        self.boundaries = _bucket_boundaries(time_keys, bucket_rows)
        self.count = len(self.boundaries) + 1
        bucket_of = np.searchsorted(self.boundaries, time_keys, side="right")
        sizes = np.bincount(bucket_of, minlength=self.count)
        last_row = np.full(self.count, -1, dtype=np.int64)
        np.maximum.at(last_row, bucket_of, np.arange(len(time_keys)))
        del bucket_of
        # Buckets are handed on in order: bucket b once every row of buckets 0..b is read.
        self.ready_after = np.maximum.accumulate(last_row)
        rows_before = np.r_[0, np.cumsum(sizes)[:-1]]
        held = int((self.ready_after + 1 - rows_before).max()) + batch_rows
        self.in_memory = self.count == 1 or held <= self.HELD_BUCKETS * bucket_rows
        self.directory = directory
        self.memory: dict[int, list[pa.Table]] = {}
        self.writers: dict[int, pq.ParquetWriter] = {}
        self.next_bucket = 0
        if not self.in_memory:
            directory.mkdir(parents=True)

    def add(self, time_key: np.ndarray, table: pa.Table, rows_read: int) -> Iterator[pa.Table]:
        """File a batch's rows; yields the buckets completed once `rows_read` rows are read."""
        bucket_of = np.searchsorted(self.boundaries, time_key, side="right")
        first, last = int(bucket_of.min()), int(bucket_of.max())
        for bucket in range(first, last + 1):
            part = table if first == last else table.filter(pa.array(bucket_of == bucket))
            if part.num_rows == 0:
                continue
            if self.in_memory:
                self.memory.setdefault(bucket, []).append(part)
                continue
            writer = self.writers.get(bucket)
            if writer is None:
                writer = pq.ParquetWriter(self.directory / f"{bucket}.parquet", part.schema)
                self.writers[bucket] = writer
            writer.write_table(part)
        if self.in_memory:
            while self.next_bucket < self.count and self.ready_after[self.next_bucket] < rows_read:
                yield from self._hand_on(self.next_bucket)
                self.next_bucket += 1

    def rest(self) -> Iterator[pa.Table]:
        """The buckets not yet handed on, in time order (all of them when spilled)."""
        for writer in self.writers.values():
            writer.close()
        for bucket in range(self.next_bucket, self.count):
            yield from self._hand_on(bucket)
        self.next_bucket = self.count

    def _hand_on(self, bucket: int) -> Iterator[pa.Table]:
        if self.in_memory:
            tables = self.memory.pop(bucket, [])
            if tables:
                yield pa.concat_tables(tables)
            return
        path = self.directory / f"{bucket}.parquet"
        if path.exists():
            table = pq.read_table(path)
            path.unlink()
            yield table


def _encode(
    spec: DatasetSpec,
    reader: RawReader,
    preprocessor: Preprocessor,
    listed: set[str],
    buckets: _Buckets,
    progress: Progress,
) -> Iterator[pa.Table]:
    """Encode every batch into its time bucket; yields the buckets in time order."""
    for batch in reader.batches():
        rows = len(batch.label)
        columns: dict[str, pa.Array] = {}
        for feature in spec.features:
            if feature.kind in ("sequence", "count"):
                continue
            column = batch.columns[feature.name]
            columns[feature.name] = _encoded(preprocessor, feature, column, feature.name in listed)
        columns["__time_key"] = pa.array(batch.time_key)
        columns["timestamp"] = pa.array(batch.timestamp)
        columns["label"] = pa.array(batch.label)
        columns["__row"] = pa.array(np.arange(batch.first_row, batch.first_row + rows))
        if spec.split.by == "random":
            columns["__split"] = pa.array(_random_split(spec, batch.first_row, rows))
        yield from buckets.add(batch.time_key, pa.table(columns), batch.first_row + rows)
        progress("encode", rows)
    yield from buckets.rest()


def _encoded(
    preprocessor: Preprocessor, feature: FeatureDef, column: pa.Array, listed: bool
) -> pa.Array:
    """`Preprocessor.encode` of one batch's column; a categorical column as list<int64> when
    `listed`. A dictionary-encoded column is encoded once per distinct value (and null)."""
    if feature.kind != "categorical":
        return preprocessor.encode(feature.name, column)
    if pa.types.is_dictionary(column.type):
        dictionary = column.dictionary
        ids, keep = preprocessor.encode_ids(
            feature, pa.concat_arrays([dictionary, pa.nulls(1, dictionary.type)]), distinct=True
        )
        indices = column.indices
        if indices.null_count:
            indices = indices.fill_null(len(dictionary))
        index = np.asarray(indices, dtype=np.int64)
        ids, keep = ids[index], keep[index]
    else:
        ids, keep = preprocessor.encode_ids(feature, column)
    if listed:
        offsets = np.r_[0, np.cumsum(keep)].astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids[keep], pa.int64()))
    if not keep.all():
        raise RuntimeError(
            f"feature {feature.name!r} dropped an id though fitting found that none would be"
        )
    return pa.array(ids, pa.int64())
