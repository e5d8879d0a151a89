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

Everything is written into a temporary directory renamed into place at the end
(`offline.install_prepared`), so a failed run leaves the previous prepared copy untouched.
"""

from __future__ import annotations

import csv
import glob
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from feature_store.artifact import (
    Preprocessor,
    Vocabulary,
    dense_steps,
    feature_seed,
    splitmix64,
    string_hash64,
)
from feature_store.offline import SPLITS, Dataset, install_prepared, prepared_root
from feature_store.spec import DatasetSpec, FeatureDef, JoinSpec, SourceSpec
from feature_store.wheels import DataError

BATCH_ROWS = 524288
BUCKET_ROWS = 1_000_000
ROW_GROUP_ROWS = 65_536
DICTIONARY_IDS = 1 << 15
_TIME_SCALE = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}

Progress = Callable[[str, int], None]


class PrepareError(DataError):
    """Raw data that does not fit the spec; names the file, the rows, the column and what is
    accepted. Raised before anything is written."""


@dataclass(frozen=True)
class _RawBatch:
    """One batch of source rows in canonical raw form (after joins, lists split, label, time)."""

    columns: dict[str, pa.Array]  # feature name -> raw values (lists for multi_valued)
    time_key: np.ndarray  # int64 in the source's unit (ns for ISO-8601): sorts exactly
    timestamp: np.ndarray  # the prepared event time in seconds (int64 for unit s)
    label: np.ndarray  # int8
    first_row: int  # global index of the batch's first source row


def prepare_spec(
    spec: DatasetSpec,
    progress: Progress = lambda stage, rows: None,
    *,
    batch_rows: int = BATCH_ROWS,
    bucket_rows: int = BUCKET_ROWS,
) -> Dataset:
    """Prepare the spec'd data set under its name (replacing an older copy only when complete)."""
    files = resolve_files(spec.source, spec.base_dir, "source.paths")
    reader = _Reader(spec, files, batch_rows)
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
        info = _order_and_write(spec, preprocessor, tables, listed, rows, scratch)
        shutil.rmtree(scratch / "buckets", ignore_errors=True)
        shutil.rmtree(scratch / "parsed", ignore_errors=True)
        preprocessor.save(scratch / "artifact")
        info.update(distinct)
        return install_prepared(spec.name, scratch, preprocessor.schema(), info)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def resolve_files(source: SourceSpec, base_dir: str, where: str) -> list[Path]:
    """The source's files in a stable order; a pattern that matches nothing is an error."""
    base = Path(base_dir)
    files: list[Path] = []
    for pattern in source.paths:
        full = pattern if Path(pattern).is_absolute() else str(base / pattern)
        matched = sorted(Path(p) for p in glob.glob(full, recursive=True) if Path(p).is_file())
        if not matched:
            raise PrepareError(f"{where}: {pattern!r} matched no file (looked in {base})")
        files.extend(p for p in matched if p not in files)
    return files


# -- reading -------------------------------------------------------------------------------


class _Reader:
    """Streams a spec's source files as `_RawBatch`es; checks columns and values as it goes."""

    def __init__(self, spec: DatasetSpec, files: list[Path], batch_rows: int) -> None:
        self.spec = spec
        self.files = files
        self.batch_rows = batch_rows
        self.joins = [_SideTable(spec, join) for join in spec.joins]
        joined = {column for join in spec.joins for column in join.columns}
        self.types: dict[str, pa.DataType] = {}
        for feature in spec.features:
            if feature.kind in ("sequence", "count") or feature.column in joined:
                continue
            self.types[feature.column] = _source_type(feature, spec.source)
        for join in spec.joins:
            key = _feature_by_column(spec, join.key)
            self.types.setdefault(join.key, _source_type(key, spec.source) if key else pa.string())
        self.types[spec.label.column] = pa.float64()
        # String ids are read dictionary-encoded: each batch's distinct values are then decoded,
        # counted and looked up once, and its rows carry int32 indices into them.
        join_keys = {join.key for join in spec.joins}
        self.dictionary_columns = frozenset(
            feature.column
            for feature in spec.features
            if feature.kind == "categorical"
            and feature.type == "string"
            and feature.column in self.types
            and feature.column not in join_keys
        )
        unit = spec.time.unit
        self.types[spec.time.column] = pa.string() if unit == "iso8601" else pa.float64()
        self.stash: Path | None = None

    def stash_text_in(self, directory: Path) -> None:
        """Parse CSV/TSV text once: the first pass writes every column it parsed, per file, to an
        Arrow stream in `directory` and later passes read that instead of parsing again."""
        if self.spec.source.format != "parquet":
            directory.mkdir(parents=True)
            self.stash = directory

    def check_columns(self) -> None:
        for path in self.files:
            names = _column_names(self.spec.source, path)
            missing = [column for column in self.types if column not in names]
            if missing:
                raise PrepareError(
                    f"{path}: no column {missing[0]!r}, which the spec names; the file has "
                    f"columns: {', '.join(names)}"
                )

    def batches(self, columns: list[str] | None = None) -> Iterator[_RawBatch]:
        """Raw batches of every file in order; `columns` limits the feature columns read."""
        wanted = {
            column: data_type
            for column, data_type in self.types.items()
            if columns is None
            or column in (self.spec.label.column, self.spec.time.column)
            or column in columns
            or any(join.key == column for join in self.spec.joins)
        }
        first_row = 0
        for index, path in enumerate(self.files):
            file_rows = 0
            for table in self._tables(index, path, wanted):
                yield self._canonical(path, table, file_rows, first_row, columns)
                file_rows += table.num_rows
                first_row += table.num_rows
            if file_rows == 0:
                raise PrepareError(f"{path} has no rows; every source file needs at least one")

    def _tables(self, index: int, path: Path, wanted: dict[str, pa.DataType]) -> Iterator[pa.Table]:
        if self.stash is None:
            yield from _read_file(
                self.spec.source, path, wanted, self.batch_rows, self.dictionary_columns
            )
            return
        stashed = self.stash / f"{index}.arrow"
        if stashed.exists():
            with pa.OSFile(str(stashed)) as handle:
                for batch in pa.ipc.open_stream(handle):
                    yield pa.Table.from_batches([batch]).select(list(wanted))
            return
        parsed = _read_file(
            self.spec.source, path, self.types, self.batch_rows, self.dictionary_columns
        )
        partial_path = stashed.with_suffix(".partial")
        with pa.OSFile(str(partial_path), "wb") as handle:
            writer = None
            for table in parsed:
                if writer is None:
                    writer = pa.ipc.new_stream(handle, table.schema)
                writer.write_table(table)
                yield table.select(list(wanted))
            if writer is not None:
                writer.close()
        partial_path.rename(stashed)

    def _canonical(
        self,
        path: Path,
        table: pa.Table,
        file_row: int,
        first_row: int,
        columns: list[str] | None,
    ) -> _RawBatch:
        spec = self.spec
        for join in self.joins:
            table = join.join(table)
        raw: dict[str, pa.Array] = {}
        for feature in spec.features:
            if feature.kind in ("sequence", "count"):
                continue
            if columns is not None and feature.column not in columns:
                continue
            column = table.column(feature.column).combine_chunks()
            if feature.kind == "multi_valued":
                column = _as_list(feature, column, path, file_row)
            raw[feature.name] = column
        label = _label(spec, table.column(spec.label.column).combine_chunks(), path, file_row)
        time_key, timestamp = _time(
            spec, table.column(spec.time.column).combine_chunks(), path, file_row
        )
        return _RawBatch(raw, time_key, timestamp, label, first_row)


class _SideTable:
    """A join's side file, held in memory (users, items: small next to the events)."""

    def __init__(self, spec: DatasetSpec, join: JoinSpec) -> None:
        self.join_spec = join
        key_feature = _feature_by_column(spec, join.key)
        key_type = _source_type(key_feature, join.source) if key_feature else pa.string()
        types = {join.key: key_type}
        for column in join.columns:
            feature = _feature_by_column(spec, column)
            types[column] = _source_type(feature, join.source) if feature else pa.string()
        files = resolve_files(join.source, spec.base_dir, f"joins[key={join.key}].paths")
        for path in files:
            names = _column_names(join.source, path)
            missing = [column for column in types if column not in names]
            if missing:
                raise PrepareError(
                    f"{path}: no column {missing[0]!r}, which joins[key={join.key}] names; the "
                    f"file has columns: {', '.join(names)}"
                )
        tables = [t for path in files for t in _read_file(join.source, path, types, BATCH_ROWS)]
        side = pa.concat_tables(tables).combine_chunks()
        keys = side.column(join.key)
        if pc.count_distinct(keys).as_py() != len(keys):
            raise PrepareError(
                f"joins[key={join.key}]: the key column {join.key!r} repeats values in "
                f"{', '.join(map(str, files))}; a side file holds one row per key"
            )
        self.keys = keys.combine_chunks()
        self.side = side

    def join(self, table: pa.Table) -> pa.Table:
        position = pc.index_in(table.column(self.join_spec.key), value_set=self.keys)
        for column in self.join_spec.columns:
            table = table.append_column(column, pc.take(self.side.column(column), position))
        return table


def _feature_by_column(spec: DatasetSpec, column: str) -> FeatureDef | None:
    for feature in spec.features:
        if feature.column == column and feature.kind not in ("sequence", "count"):
            return feature
    return None


def _source_type(feature: FeatureDef, source: SourceSpec) -> pa.DataType:
    if feature.kind == "dense":
        return pa.float64()
    scalar = pa.string() if feature.type == "string" else pa.int64()
    if feature.kind == "multi_valued" and (source.format == "parquet"):
        return pa.list_(scalar)
    if feature.kind == "multi_valued":
        return pa.string()
    return scalar


def _column_names(source: SourceSpec, path: Path) -> list[str]:
    if source.format == "parquet":
        try:
            return pq.read_schema(path).names
        except pa.ArrowInvalid as error:
            raise PrepareError(f"{path} is not a Parquet file: {error}") from error
    if source.column_names:
        return list(source.column_names)
    with path.open(newline="", encoding="utf-8", errors="replace") as handle:
        quoting = csv.QUOTE_MINIMAL if source.quote_char else csv.QUOTE_NONE
        header = next(
            csv.reader(
                handle,
                delimiter=source.field_delimiter,
                quotechar=source.quote_char or '"',
                quoting=quoting,
            ),
            None,
        )
    if header is None:
        raise PrepareError(f"{path} is empty: no header line")
    return header


def _read_file(
    source: SourceSpec,
    path: Path,
    types: dict[str, pa.DataType],
    batch_rows: int,
    dictionary: frozenset[str] = frozenset(),
) -> Iterator[pa.Table]:
    """Tables of at most about `batch_rows` rows with exactly `types`' columns and types; the
    `dictionary` columns of text come dictionary-encoded (dictionary<int32, string>)."""
    if source.format == "parquet":
        stored = pq.read_schema(path)
        as_dictionary = [
            name
            for name in dictionary
            if name in types
            and (
                pa.types.is_string(stored.field(name).type)
                or pa.types.is_large_string(stored.field(name).type)
            )
        ]
        parquet = pq.ParquetFile(path, read_dictionary=as_dictionary)
        row = 0
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=list(types)):
            table = pa.Table.from_batches([batch])
            yield _cast(table, types, path, row, dictionary)
            row += batch.num_rows
        return
    read_options = pacsv.ReadOptions(
        column_names=list(source.column_names) or None,
        skip_rows=1 if source.header and source.column_names else 0,
        block_size=max(1 << 20, batch_rows * 64),
    )
    parse_options = pacsv.ParseOptions(
        delimiter=source.field_delimiter, quote_char=source.quote_char or False
    )
    column_types = {
        name: pa.dictionary(pa.int32(), pa.string()) if name in dictionary else data_type
        for name, data_type in types.items()
    }
    convert_options = pacsv.ConvertOptions(
        column_types=column_types,
        include_columns=list(types),
        null_values=list(source.null_values),
        strings_can_be_null=True,
    )
    try:
        reader = pacsv.open_csv(
            path,
            read_options=read_options,
            parse_options=parse_options,
            convert_options=convert_options,
        )
        for batch in reader:
            yield pa.Table.from_batches([batch])
    except pa.ArrowInvalid as error:
        if "Empty CSV file" in str(error):
            raise PrepareError(f"{path} is empty: no header line") from None
        if "conversion error" in str(error):
            # pyarrow names neither the row nor the column: read the file again as text and
            # find the first value that does not convert.
            as_text = {name: pa.string() for name in types}
            row = 0
            for table in _read_file(source, path, as_text, batch_rows):
                _cast(table, types, path, row)
                row += table.num_rows
        raise PrepareError(f"{path}: {error}; {_accepted(types)}") from None


def _accepted(types: dict[str, pa.DataType]) -> str:
    return "accepted: " + ", ".join(f"{column} as {_type_name(t)}" for column, t in types.items())


def _type_name(data_type: pa.DataType) -> str:
    if pa.types.is_floating(data_type):
        return "a number"
    if pa.types.is_integer(data_type):
        return "an integer"
    if pa.types.is_list(data_type):
        return f"a list of {_type_name(data_type.value_type)}s"
    return "text"


def _cast(
    table: pa.Table,
    types: dict[str, pa.DataType],
    path: Path,
    row: int,
    dictionary: frozenset[str] = frozenset(),
) -> pa.Table:
    columns = []
    for name, data_type in types.items():
        column = table.column(name)
        if _is_text_dictionary(column.type) and name in dictionary:
            columns.append(column)
            continue
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        delimited = pa.types.is_list(data_type) and pa.types.is_string(column.type)
        if column.type != data_type and not delimited:
            try:
                column = column.cast(data_type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
                bad = _first_failure(
                    column.combine_chunks(), partial(pa.Array.cast, target_type=data_type)
                )
                raise PrepareError(
                    f"{path}: row {row + bad + 1}, column {name!r}: {column[bad].as_py()!r} "
                    f"({column.type}) does not convert; accepted: {_type_name(data_type)}"
                ) from error
        columns.append(column)
    return pa.table(columns, names=list(types))


def _is_text_dictionary(data_type: pa.DataType) -> bool:
    return (
        pa.types.is_dictionary(data_type)
        and pa.types.is_string(data_type.value_type)
        and data_type.index_type == pa.int32()
    )


def _first_failure(values: pa.Array, convert: Callable[[pa.Array], object]) -> int:
    """The index of the first value `convert` refuses, by bisection (`values` holds one)."""
    low, high = 0, len(values)
    while high - low > 1:
        middle = (low + high) // 2
        try:
            convert(values.slice(low, middle - low))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            high = middle
        else:
            low = middle
    return low


def _as_list(feature: FeatureDef, column: pa.Array, path: Path, file_row: int) -> pa.Array:
    """A multi-valued column as list<scalar>: a list column, or a delimited string split."""
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return column
    if feature.separator is None:
        raise PrepareError(
            f"{path}: column {feature.column!r} is text; a multi_valued feature over text needs "
            "`separator` (e.g. '|')"
        )
    lists = pc.split_pattern(column.fill_null(""), feature.separator)
    flat = pc.list_flatten(lists)
    lengths = np.asarray(pc.list_value_length(lists), dtype=np.int64)
    keep = np.asarray(pc.not_equal(flat, ""), dtype=bool)
    kept = np.bincount(np.repeat(np.arange(len(lengths)), lengths)[keep], minlength=len(lengths))
    values = flat.filter(pa.array(keep))
    if feature.type == "int":
        try:
            values = values.cast(pa.int64())
        except pa.ArrowInvalid as error:
            raise PrepareError(
                f"{path}: rows {file_row + 1}-{file_row + len(column)}, column "
                f"{feature.column!r}: {error}; accepted: integers separated by "
                f"{feature.separator!r}"
            ) from None
    offsets = np.r_[0, np.cumsum(kept)].astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _refuse_nulls(column: pa.Array, path: Path, file_row: int, what: str, needs: str) -> None:
    """Every event needs a label and a time: the first empty one is an error naming its row."""
    nulls = np.asarray(column.is_null(), dtype=bool)
    if nulls.any():
        row = file_row + int(np.argmax(nulls)) + 1
        raise PrepareError(f"{path}: row {row}: the {what} is empty; every event needs {needs}")


def _label(spec: DatasetSpec, column: pa.Array, path: Path, file_row: int) -> np.ndarray:
    _refuse_nulls(column, path, file_row, f"label column {spec.label.column!r}", "a label")
    values = np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)
    rule = spec.label
    if rule.op is None:
        bad = (values != 0) & (values != 1)
        if bad.any():
            row = file_row + int(np.argmax(bad)) + 1
            raise PrepareError(
                f"{path}: row {row}: label {values[bad][0].item()!r} in column {rule.column!r}; "
                "accepted: 0 or 1 (or a rule: label.op and label.value)"
            )
        return values.astype(np.int8)
    compare = {
        ">=": np.greater_equal,
        ">": np.greater,
        "<=": np.less_equal,
        "<": np.less,
        "==": np.equal,
        "!=": np.not_equal,
    }[rule.op]
    return compare(values, rule.value).astype(np.int8)


def _time(
    spec: DatasetSpec, column: pa.Array, path: Path, file_row: int
) -> tuple[np.ndarray, np.ndarray]:
    """(sort key, prepared seconds) of an event-time column."""
    _refuse_nulls(column, path, file_row, f"event-time column {spec.time.column!r}", "a time")
    unit = spec.time.unit
    if unit == "iso8601":
        try:
            key = _iso8601_ns(column)
        except pa.ArrowInvalid:
            bad = _first_failure(column, _iso8601_ns)
            raise PrepareError(
                f"{path}: row {file_row + bad + 1}: {column[bad].as_py()!r} in column "
                f"{spec.time.column!r} is not an ISO-8601 time; accepted: e.g. "
                "2024-05-01T12:30:00, 2024-05-01 12:30:00.250 or 2024-05-01T12:30:00+02:00 "
                "(without an offset, UTC)"
            ) from None
        return key, key / 1e9
    numbers = np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)
    scale = _TIME_SCALE[unit]
    key = np.round(numbers).astype(np.int64) if unit != "s" else numbers.astype(np.int64)
    return key, (key if unit == "s" else numbers / scale)


def _iso8601_ns(column: pa.Array) -> np.ndarray:
    """ISO-8601 text -> int64 ns since the epoch, UTC; times with a zone offset (Z, +02:00)
    are converted to UTC, times without one are taken as UTC."""
    zoned = np.asarray(
        pc.match_substring_regex(column, r"(?:Z|[+-]\d{2}:?\d{2})$").fill_null(False), dtype=bool
    )
    key = np.empty(len(column), dtype=np.int64)
    for mask, target in ((~zoned, pa.timestamp("ns")), (zoned, pa.timestamp("ns", tz="UTC"))):
        if mask.any():
            parsed = pc.cast(column.filter(pa.array(mask)), target)
            key[mask] = np.asarray(parsed.cast(pa.int64()), dtype=np.int64)
    return key


# -- pass 1: scan --------------------------------------------------------------------------


def _scan(reader: _Reader, progress: Progress) -> tuple[np.ndarray, np.ndarray | None, int]:
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
    train_rows = _split_sizes(spec, rows)[0]
    ordered = np.sort(time_keys, kind="stable")
    boundary = ordered[train_rows] if train_rows < rows else ordered[-1] + 1
    return time_keys, time_keys < boundary, rows


def _split_sizes(spec: DatasetSpec, rows: int) -> tuple[int, int, int]:
    """(train, valid, test) row counts of a time split, as `offline.time_split` makes them."""
    test = int(round(rows * spec.split.test))
    valid = int(round(rows * spec.split.valid))
    return rows - test - valid, valid, test


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

    Counts are merged by a 64-bit key: the value itself for integers, `string_hash64` for
    text (computed once per batch's distinct values); two distinct strings that share a key
    are refused, not merged."""

    MERGE_EVERY = 16

    def __init__(self) -> None:
        self.keys: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []
        self.values: list[pa.Array] = []

    def add(self, column: pa.Array) -> None:
        """Count the non-null values of `column` (plain, or dictionary-encoded)."""
        if pa.types.is_dictionary(column.type):
            indices = np.asarray(column.indices.drop_null(), dtype=np.int64)
            counts = np.bincount(indices, minlength=len(column.dictionary))
            present = np.flatnonzero(counts)
            values = column.dictionary.take(pa.array(present))
            counts = counts[present]
        else:
            counted = pc.value_counts(column.drop_null())
            values = counted.field("values")
            counts = np.asarray(counted.field("counts"), dtype=np.int64)
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            values = values.cast(pa.string())
            keys = string_hash64(values, 0)
        else:
            values = values.cast(pa.int64())
            keys = np.asarray(values, dtype=np.int64)
        self.keys.append(keys)
        self.counts.append(counts.astype(np.int64))
        self.values.append(values)
        if len(self.keys) > self.MERGE_EVERY:
            self._merge()

    def _merge(self) -> None:
        keys = np.concatenate(self.keys)
        counts = np.concatenate(self.counts)
        values = pa.concat_arrays(self.values)
        order = np.argsort(keys)
        sorted_keys = keys[order]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_keys)) + 1] if len(keys) else order
        merged = values.take(pa.array(order[starts]))
        if pa.types.is_string(values.type) and len(starts) < len(keys):
            group_of = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(keys)]))
            same = pc.equal(values.take(pa.array(order)), merged.take(pa.array(group_of)))
            if not pc.all(same).as_py():
                raise PrepareError(
                    "two distinct values of one column share a 64-bit hash; rename one of "
                    "them (text ids are counted by their hash)"
                )
        self.keys = [sorted_keys[starts]]
        self.counts = [np.add.reduceat(counts[order], starts) if len(keys) else counts]
        self.values = [merged]

    def merged(self) -> pa.Table:
        if not self.keys:
            return pa.table({"value": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
        if len(self.keys) > 1:
            self._merge()
        return pa.table({"value": self.values[0], "count": self.counts[0]})


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
    spec: DatasetSpec, reader: _Reader, fit_mask: np.ndarray | None, progress: Progress
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
        mask = (
            None
            if fit_mask is None
            else pa.array(fit_mask[batch.first_row : batch.first_row + rows])
        )
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
            if feature.name in counters:
                values = batch.columns[feature.name]
                if mask is not None:
                    values = values.filter(mask)
                if feature.kind == "multi_valued":
                    values = pc.list_flatten(values)
                counters[feature.name].add(values)
            if feature.name in moments:
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
    reader: _Reader,
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
            feature, pa.concat_arrays([dictionary, pa.nulls(1, dictionary.type)])
        )
        index = np.asarray(column.indices.fill_null(len(dictionary)), dtype=np.int64)
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


# -- pass 4: order, sequences, splits ------------------------------------------------------


class _PerKeyState:
    """Per key (a user, an item): how many events it had and its last values, across buckets."""

    def __init__(self, history: int) -> None:
        self.history = history
        self.keys = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)
        self.last = np.zeros((0, history), dtype=np.int64)  # newest last, right-aligned
        self.lengths = np.zeros(0, dtype=np.int64)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(counts, last values, lengths) of `keys` (zeros for keys never seen)."""
        position = np.searchsorted(self.keys, keys)
        position = np.minimum(position, max(len(self.keys) - 1, 0))
        found = (self.keys[position] == keys) if len(self.keys) else np.zeros(len(keys), bool)
        counts = np.where(found, self.counts[position] if len(self.keys) else 0, 0)
        last = np.zeros((len(keys), self.history), dtype=np.int64)
        lengths = np.zeros(len(keys), dtype=np.int64)
        if len(self.keys):
            last[found] = self.last[position[found]]
            lengths[found] = self.lengths[position[found]]
        return counts, last, lengths

    def update(
        self, keys: np.ndarray, counts: np.ndarray, last: np.ndarray, lengths: np.ndarray
    ) -> None:
        merged = np.concatenate([self.keys, keys])
        order = np.argsort(merged, kind="stable")
        merged = merged[order]
        # A key present in both keeps the new entry (the later one in stable order).
        keep = np.r_[merged[1:] != merged[:-1], True]
        self.keys = merged[keep]
        self.counts = np.concatenate([self.counts, counts])[order][keep]
        self.last = np.concatenate([self.last, last])[order][keep]
        self.lengths = np.concatenate([self.lengths, lengths])[order][keep]


def _scalar_ids(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(ids, present) of a categorical column (int64, or list<int64> with empty bags)."""
    if pa.types.is_list(column.type):
        lengths = np.asarray(pc.list_value_length(column).fill_null(0), dtype=np.int64)
        flat = np.asarray(pc.list_flatten(column), dtype=np.int64)
        ids = np.zeros(len(lengths), dtype=np.int64)
        present = lengths > 0
        ids[present] = flat[np.r_[0, np.cumsum(lengths)][:-1][present]]
        return ids, present
    return np.asarray(column, dtype=np.int64), np.ones(len(column), dtype=bool)


def _order_and_write(
    spec: DatasetSpec,
    preprocessor: Preprocessor,
    tables: Iterator[pa.Table],
    listed: set[str],
    rows: int,
    scratch: Path,
) -> dict:
    user = spec.roles.get("user")
    item = spec.roles.get("item")
    derived = [f for f in spec.features if f.kind in ("sequence", "count")]
    states = {f.name: _PerKeyState(f.max_length if f.kind == "sequence" else 0) for f in derived}
    sizes = _split_sizes(spec, rows) if spec.split.by == "time" else None
    writer = _SplitWriter(scratch, _dictionary_columns(preprocessor))
    stats = {split: {"rows": 0, "positives": 0} for split in SPLITS}
    written = 0
    output_order = [f.name for f in spec.features] + ["label", "timestamp"]
    for table in tables:
        sort_keys = [("__time_key", "ascending")]
        for role_column in (user, item):
            if role_column is not None and role_column not in listed:
                sort_keys.append((role_column, "ascending"))
        sort_keys.append(("__row", "ascending"))
        # int64 indices: Arrow's take is about twice as fast with them as with uint64 ones.
        order = np.asarray(pc.sort_indices(table, sort_keys=sort_keys)).view(np.int64)
        if not np.array_equal(order, np.arange(table.num_rows)):
            table = table.take(pa.array(order))
        for feature in derived:
            table = table.append_column(
                feature.name, _derived(feature, table, user, states[feature.name], preprocessor)
            )
        if sizes is not None:
            position = np.arange(written, written + table.num_rows)
            split_of = np.where(
                position < sizes[0], 0, np.where(position < sizes[0] + sizes[1], 1, 2)
            )
        else:
            split_of = np.asarray(table.column("__split"), dtype=np.int8)
        written += table.num_rows
        out = table.select(output_order)
        for index, split in enumerate(SPLITS):
            if sizes is not None:
                # A time split's rows of one split are contiguous: a slice, not a copy.
                start, stop = np.searchsorted(split_of, [index, index + 1])
                part = out.slice(start, stop - start)
            else:
                part = out.filter(pa.array(split_of == index))
            if part.num_rows == 0:
                continue
            writer.write(split, part)
            stats[split]["rows"] += part.num_rows
            stats[split]["positives"] += int(np.count_nonzero(np.asarray(part.column("label"))))
        del table, out, part  # this bucket is freed once written, before the next is read
    writer.close()
    empty = [split for split in SPLITS if stats[split]["rows"] == 0]
    if empty:
        raise PrepareError(
            f"split {empty[0]!r} would be empty ({rows} rows with split fractions valid "
            f"{spec.split.valid}, test {spec.split.test}); every split needs at least one row"
        )
    return {
        "splits": stats,
        "rows": rows,
        "positives": sum(s["positives"] for s in stats.values()),
    }


def _dictionary_columns(preprocessor: Preprocessor) -> list[str]:
    """The output columns (Parquet leaf paths) worth dictionary-encoding: ids of at most
    `DICTIONARY_IDS` distinct values, and the label. Larger id columns are written plain:
    trying a dictionary on them costs time and saves little."""
    columns = ["label"]
    for feature in preprocessor.schema().features:
        if feature.kind == "dense" or feature.cardinality > DICTIONARY_IDS:
            continue
        listed = feature.kind == "sequence" or feature.max_length > 1
        columns.append(f"{feature.name}.list.element" if listed else feature.name)
    return columns


class _SplitWriter:
    """Writes the splits' Parquet files on a background thread (Parquet encoding releases the
    GIL), so that writing one bucket overlaps encoding the next; at most `PENDING` parts wait."""

    PENDING = 2

    def __init__(self, directory: Path, dictionary: list[str]) -> None:
        self.directory = directory
        self.dictionary = dictionary
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: list[Future] = []

    def write(self, split: str, part: pa.Table) -> None:
        self.pending.append(self.pool.submit(self._write, split, part))
        while len(self.pending) > self.PENDING:
            self.pending.pop(0).result()

    def _write(self, split: str, part: pa.Table) -> None:
        writer = self.writers.get(split)
        if writer is None:
            # Columns named but absent (a categorical stored as a list) are ignored by Parquet.
            writer = pq.ParquetWriter(
                self.directory / f"{split}.parquet", part.schema, use_dictionary=self.dictionary
            )
            self.writers[split] = writer
        writer.write_table(part, row_group_size=ROW_GROUP_ROWS)

    def close(self) -> None:
        try:
            for future in self.pending:
                future.result()
        finally:
            self.pool.shutdown()
            for writer in self.writers.values():
                writer.close()


def _derived(
    feature: FeatureDef,
    table: pa.Table,
    user: str | None,
    state: _PerKeyState,
    preprocessor: Preprocessor,
) -> pa.Array:
    """A sequence (the user's previous values of `of`) or a count (earlier events of `of`)."""
    if feature.kind == "count":
        keys, present = _scalar_ids(table.column(feature.of))
        keys = np.where(present, keys, np.iinfo(np.int64).min)
        counts = _prior_counts(keys, state)
        return pa.array(preprocessor.dense_values(feature, pa.array(counts.astype(np.float64))))
    users, _ = _scalar_ids(table.column(user))
    values, present = _scalar_ids(table.column(feature.of))
    return _history(users, values, present, state)


def _prior_counts(keys: np.ndarray, state: _PerKeyState) -> np.ndarray:
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_keys)) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    carried, _, _ = state.lookup(sorted_keys)
    within = np.arange(len(order)) - group_start
    counts = np.empty(len(keys), dtype=np.int64)
    counts[order] = carried + within
    ends = np.r_[starts[1:], len(order)] - 1
    group_keys = sorted_keys[starts]
    state.update(
        group_keys,
        counts[order][ends] + 1,
        np.zeros((len(starts), 0), np.int64),
        np.zeros(len(starts), np.int64),
    )
    return counts


def _history(
    users: np.ndarray, values: np.ndarray, present: np.ndarray, state: _PerKeyState
) -> pa.ListArray:
    """For each event (in time order), the user's previous `history` values, oldest first.

    Per user the timeline is its carried values (from earlier buckets) then this bucket's
    present values; event i sees the `history` newest timeline values before its own."""
    length = state.history
    count = len(users)
    order = np.lexsort((np.arange(count), users))
    users_sorted, values_sorted, present_sorted = users[order], values[order], present[order]
    starts = np.r_[0, np.flatnonzero(np.diff(users_sorted)) + 1] if count else np.zeros(0, int)
    sizes = np.diff(np.r_[starts, count])
    group_of = np.repeat(np.arange(len(starts)), sizes)
    _, carried, carried_lengths = state.lookup(users_sorted[starts])
    own_counts = np.bincount(group_of[present_sorted], minlength=len(starts))
    totals = carried_lengths + own_counts
    timeline_start = np.r_[0, np.cumsum(totals)][:-1]
    timeline = np.zeros(int(totals.sum()), dtype=np.int64)
    carried_mask = np.arange(length)[None, :] >= (length - carried_lengths)[:, None]
    timeline[_ranges(timeline_start, carried_lengths)] = carried[carried_mask]
    timeline[_ranges(timeline_start + carried_lengths, own_counts)] = values_sorted[present_sorted]
    # How many own present values precede each event within its group.
    present_before = np.cumsum(present_sorted) - present_sorted
    seen = carried_lengths[group_of] + present_before - present_before[starts][group_of]
    first = np.maximum(seen - length, 0)
    begin_sorted = timeline_start[group_of] + first
    lengths_sorted = seen - first
    begin = np.empty(count, dtype=np.int64)
    lengths = np.empty(count, dtype=np.int64)
    begin[order], lengths[order] = begin_sorted, lengths_sorted
    flat = timeline[_ranges(begin, lengths)]
    kept = np.minimum(totals, length)
    ends = timeline_start + totals
    index = ends[:, None] - length + np.arange(length)[None, :]
    tail_mask = np.arange(length)[None, :] >= (length - kept)[:, None]
    new_last = np.where(
        tail_mask, timeline[np.clip(index, 0, max(len(timeline) - 1, 0))] if len(timeline) else 0, 0
    )
    state.update(users_sorted[starts], np.zeros(len(starts), np.int64), new_last, kept)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int64()))


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of range(start, start + length) for each pair."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.r_[0, np.cumsum(lengths)][:-1]
    return np.repeat(np.asarray(starts, dtype=np.int64) - offsets, lengths) + np.arange(total)
