"""Reading a spec's raw files: Parquet row groups or CSV/TSV text as record batches in canonical
form (joins applied, lists split, label and event time parsed), every value checked as it is
read, so that bad input is a `PrepareError` naming the file, the row, the column and what is
accepted.

String ids of categorical features are read dictionary-encoded (Parquet's own dictionaries, or
the CSV reader's), so the passes that follow handle each batch's distinct values once.
"""

from __future__ import annotations

import csv
import glob
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from feature_store.spec import DatasetSpec, FeatureDef, JoinSpec, SourceSpec
from feature_store.wheels import DataError

BATCH_ROWS = 524288
# CSV/TSV text is parsed in small blocks (about twice as fast as in 32 MB ones on 2 cores), whose
# batches are put together into tables of about `batch_rows` rows (dictionaries unified).
CSV_BLOCK_BYTES = 1 << 21
_TIME_SCALE = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


class PrepareError(DataError):
    """Raw data that does not fit the spec; names the file, the rows, the column and what is
    accepted. Raised before anything is written."""


@dataclass(frozen=True)
class RawBatch:
    """One batch of source rows in canonical raw form (after joins, lists split, label, time)."""

    columns: dict[str, pa.Array]  # feature name -> raw values (lists for multi_valued)
    time_key: np.ndarray  # int64 in the source's unit (ns for ISO-8601): sorts exactly
    timestamp: np.ndarray  # the prepared event time in seconds (int64 for unit s)
    label: np.ndarray  # int8
    first_row: int  # global index of the batch's first source row


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


class RawReader:
    """Streams a spec's source files as `RawBatch`es; checks columns and values as it goes."""

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

    def batches(self, columns: list[str] | None = None) -> Iterator[RawBatch]:
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
    ) -> RawBatch:
        spec = self.spec
        for join in self.joins:
            table = join.join(table)
        raw: dict[str, pa.Array] = {}
        for feature in spec.features:
            if feature.kind in ("sequence", "count"):
                continue
            if columns is not None and feature.column not in columns:
                continue
            column = _single(table.column(feature.column))
            if feature.kind == "multi_valued":
                column = _as_list(feature, column, path, file_row)
            raw[feature.name] = column
        label = _label(spec, _single(table.column(spec.label.column)), path, file_row)
        time_key, timestamp = _time(spec, _single(table.column(spec.time.column)), path, file_row)
        return RawBatch(raw, time_key, timestamp, label, first_row)


def _single(column: pa.ChunkedArray) -> pa.Array:
    """A column as one array: a batch's column is one chunk already, which is not copied."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


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
    """Tables of about `batch_rows` rows with exactly `types`' columns and types; the
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
        block_size=CSV_BLOCK_BYTES,
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
        held: list[pa.RecordBatch] = []
        for batch in reader:
            held.append(batch)
            if sum(b.num_rows for b in held) >= batch_rows:
                yield pa.Table.from_batches(held).combine_chunks()
                held = []
        if held:
            yield pa.Table.from_batches(held).combine_chunks()
    except pa.ArrowInvalid as error:
        if "Empty CSV file" in str(error):
            raise PrepareError(f"{path} is empty: no header line") from None
        if "straddling" in str(error):
            raise PrepareError(
                f"{path}: a line is longer than the CSV/TSV reader takes (about "
                f"{2 * CSV_BLOCK_BYTES >> 20} MiB, two of its blocks); store rows with such long "
                "values as Parquet"
            ) from None
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
    if not column.null_count:
        return
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
