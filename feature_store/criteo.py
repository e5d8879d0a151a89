"""Real Criteo click logs (the day_N / Kaggle TSV format) for users who have the files, prepared
by their bundled spec (`feature_store/specs/criteo.yaml`) like any user's data.

Each line: label, 13 integer features, 26 categorical features as 8-digit hex strings; any
field may be empty. The files have no event time and their ids are hex text, so the reader
writes each day once as Parquet: the hex values as their integers (empty: null) and each event's
row number (counted across the days in the given order) as its time. As in the DLRM reference
scripts, the spec folds ids into a fixed range (`max_ind_range` ids per table, the last one for
a missing value) and makes dense values log(1 + max(x, 0)), 0 when missing.
"""

from __future__ import annotations

import functools
import hashlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from feature_store.spec import DatasetSpec, SplitSpec, load_spec
from feature_store.wheels import DataError, cache_dir

SPEC_PATH = Path(__file__).parent / "specs" / "criteo.yaml"
NUM_DENSE = 13
NUM_CATEGORICAL = 26
NUM_COLUMNS = 1 + NUM_DENSE + NUM_CATEGORICAL
DEFAULT_MAX_IND_RANGE = 10_000_000
_HEX_VALUES = np.full(256, -1, dtype=np.int64)
for _position, _char in enumerate(b"0123456789abcdef"):
    _HEX_VALUES[_char] = _position
    _HEX_VALUES[ord(chr(_char).upper())] = _position


class CriteoFormatError(DataError):
    """A Criteo file that is not in the TSV format; names the file and line."""


def _hex_column(column: pa.ChunkedArray, path: Path, first_line: int) -> pa.Array:
    """Hex strings of up to 8 digits -> their int64 values; empty -> null. Vectorised."""
    strings = column.to_numpy(zero_copy_only=False).astype("S8")
    digits = _HEX_VALUES[strings.view(np.uint8).reshape(-1, 8)]
    lengths = np.char.str_len(strings)
    within = np.arange(8)[None, :] < lengths[:, None]
    invalid = ((digits < 0) & within).any(axis=1)
    if invalid.any():
        row = int(np.flatnonzero(invalid)[0])
        raise CriteoFormatError(
            f"{path}: line {first_line + row}: a categorical value "
            f"{strings[row].decode(errors='replace')!r} is not hex; "
            "accepted: up to 8 hex digits, or empty"
        )
    digits = np.where(digits < 0, 0, digits)
    # Left-align shorter strings: value = sum(digit_i * 16^(len-1-i)).
    powers = np.maximum(lengths[:, None] - 1 - np.arange(8)[None, :], 0)
    values = (digits * (16**powers) * within).sum(axis=1)
    return pa.array(values, pa.int64(), mask=lengths == 0)


def read_criteo(path: Path, block_rows: int = 1 << 20) -> Iterator[pa.RecordBatch]:
    """Record batches of one Criteo TSV file in raw form (label, dense numbers, categorical
    integers; empty fields null); a line with the wrong number of columns is an error naming
    the file and line."""

    rejected: list[pacsv.InvalidRow] = []

    def reject(row: pacsv.InvalidRow) -> str:
        # pyarrow swallows exceptions raised here: note the row and let the read fail.
        rejected.append(row)
        return "error"

    names = ["label", *(f"dense_{i}" for i in range(NUM_DENSE))]
    names += [f"cat_{i}" for i in range(NUM_CATEGORICAL)]
    types = {"label": pa.int8(), **{f"dense_{i}": pa.float64() for i in range(NUM_DENSE)}}
    types.update({f"cat_{i}": pa.string() for i in range(NUM_CATEGORICAL)})

    def translated(error: pa.ArrowInvalid) -> CriteoFormatError:
        if not rejected:
            return CriteoFormatError(f"{path}: not a Criteo TSV file: {error}")
        bad = rejected[0]
        return CriteoFormatError(
            f"{path}: line {bad.number}: expected {NUM_COLUMNS} tab-separated columns "
            f"(label, {NUM_DENSE} integers, {NUM_CATEGORICAL} hex categories), "
            f"got {bad.actual_columns}"
        )

    open_reader = functools.partial(
        pacsv.open_csv,
        path,
        read_options=pacsv.ReadOptions(
            column_names=names, use_threads=False, block_size=block_rows * 200
        ),
        parse_options=pacsv.ParseOptions(
            delimiter="\t", quote_char=False, invalid_row_handler=reject
        ),
        convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False),
    )
    try:
        reader = open_reader()
    except pa.ArrowInvalid as error:
        raise translated(error) from error
    line = 1
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as error:
            raise translated(error) from error
        columns = {name: batch.column(name) for name in names if not name.startswith("cat_")}
        for i in range(NUM_CATEGORICAL):
            columns[f"cat_{i}"] = _hex_column(batch.column(f"cat_{i}"), path, line)
        line += batch.num_rows
        yield pa.RecordBatch.from_pydict(columns)


def raw_dir(paths: Sequence[Path]) -> tuple[Path, list[int]]:
    """A directory holding the days as `day-NNN.parquet` (with a `row` column), written once
    per set of files, and each day's row count."""
    if not paths:
        raise DataError("criteo needs at least one TSV file: --path day_0 [--path day_1 ...]")
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"criteo file {path} does not exist")
    identity = [
        (str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in paths
    ]
    key = hashlib.sha256(repr(identity).encode()).hexdigest()[:12]
    directory = cache_dir() / "raw" / "criteo" / key
    days = [directory / f"day-{index:03d}.parquet" for index in range(len(paths))]
    if not all(day.exists() for day in days):
        directory.mkdir(parents=True, exist_ok=True)
        row = 0
        for path, day in zip(paths, days, strict=True):
            row = _write_day(Path(path), day, row)
    return directory, [pq.ParquetFile(day).metadata.num_rows for day in days]


def _write_day(path: Path, day: Path, first_row: int) -> int:
    """Write one TSV day as Parquet (into a temporary file renamed into place); returns the
    row number after its last row."""
    row = first_row
    with tempfile.NamedTemporaryFile(dir=day.parent, suffix=".parquet", delete=False) as handle:
        writer = None
        try:
            for batch in read_criteo(path):
                rows = pa.array(np.arange(row, row + batch.num_rows, dtype=np.int64))
                table = pa.Table.from_batches([batch]).append_column("row", rows)
                if writer is None:
                    writer = pq.ParquetWriter(handle.name, table.schema)
                writer.write_table(table)
                row += batch.num_rows
        finally:
            if writer is not None:
                writer.close()
    if writer is None:
        Path(handle.name).unlink()
        raise CriteoFormatError(f"{path} has no lines; every Criteo day needs at least one")
    Path(handle.name).rename(day)
    return row


def spec(paths: Sequence[Path], max_ind_range: int = DEFAULT_MAX_IND_RANGE) -> DatasetSpec:
    """The bundled spec over the given days (in that order): with three days or more the last
    is the test split and the one before it validation, else the last 10% and the 10% before."""
    directory, rows = raw_dir(paths)
    bundled = load_spec(SPEC_PATH)
    features = tuple(
        replace(feature, cardinality=max_ind_range - 1) if feature.has_ids else feature
        for feature in bundled.features
    )
    split = bundled.split
    if len(rows) >= 3:
        # Exact: round(total * (n / total)) is n for every row count a file can have.
        split = SplitSpec(by="time", valid=rows[-2] / sum(rows), test=rows[-1] / sum(rows))
    return replace(bundled, features=features, split=split, base_dir=str(directory))
