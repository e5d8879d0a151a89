"""Real Criteo click logs (the day_N / Kaggle TSV format) for users who have the files.

Each line: label, 13 integer features, 26 categorical features as 8-digit hex strings; any
field may be empty. As in the DLRM reference scripts, dense values become log(1 + max(x, 0))
and categorical values are folded into [1, max_ind_range) with 0 kept for "missing".
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from feature_store.offline import PreparedTables, time_split
from feature_store.schema import FeatureSpec, Schema
from feature_store.wheels import DataError

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


def _hex_column(column: pa.ChunkedArray, path: Path, max_ind_range: int) -> np.ndarray:
    """8-digit hex strings -> ids in [1, max_ind_range); empty -> 0. Vectorised over bytes."""
    strings = column.to_numpy(zero_copy_only=False).astype("S8")
    digits = _HEX_VALUES[strings.view(np.uint8).reshape(-1, 8)]
    lengths = np.char.str_len(strings)
    invalid = ((digits < 0) & (np.arange(8)[None, :] < lengths[:, None])).any(axis=1)
    if invalid.any():
        row = int(np.flatnonzero(invalid)[0])
        raise CriteoFormatError(f"{path}: a categorical value {strings[row]!r} is not hex")
    digits = np.where(digits < 0, 0, digits)
    # Left-align shorter strings: value = sum(digit_i * 16^(len-1-i)).
    powers = np.maximum(lengths[:, None] - 1 - np.arange(8)[None, :], 0)
    values = (digits * (16**powers) * (np.arange(8)[None, :] < lengths[:, None])).sum(axis=1)
    return np.where(lengths == 0, 0, values % (max_ind_range - 1) + 1)


def read_criteo(
    path: Path, max_ind_range: int = DEFAULT_MAX_IND_RANGE, block_rows: int = 1 << 20
) -> Iterator[pa.RecordBatch]:
    """Record batches of one Criteo TSV file; a line with the wrong number of columns is an error
    naming the file and line."""

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
    row = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as error:
            raise translated(error) from error
        columns = {"label": batch.column("label")}
        for i in range(NUM_DENSE):
            dense = batch.column(f"dense_{i}").to_numpy(zero_copy_only=False)
            dense = np.log1p(np.maximum(np.nan_to_num(dense, nan=0.0), 0.0))
            columns[f"dense_{i}"] = pa.array(dense.astype(np.float32))
        for i in range(NUM_CATEGORICAL):
            columns[f"cat_{i}"] = pa.array(
                _hex_column(batch.column(f"cat_{i}"), path, max_ind_range)
            )
        columns["timestamp"] = pa.array(np.arange(row, row + batch.num_rows, dtype=np.int64))
        row += batch.num_rows
        yield pa.RecordBatch.from_pydict(columns)


def schema(max_ind_range: int = DEFAULT_MAX_IND_RANGE) -> Schema:
    categorical = tuple(
        FeatureSpec(f"cat_{i}", "categorical", max_ind_range) for i in range(NUM_CATEGORICAL)
    )
    dense = tuple(FeatureSpec(f"dense_{i}", "dense") for i in range(NUM_DENSE))
    return Schema(dataset="criteo", features=categorical + dense)


def build(
    name: str,
    progress: Callable[[str], None],
    paths: Sequence[Path],
    max_ind_range: int = DEFAULT_MAX_IND_RANGE,
) -> PreparedTables:
    """Days in the given order; the last file is the test split, the one before it validation
    (with a single file: its last 10% test, the 10% before that validation)."""
    if not paths:
        raise DataError("criteo needs at least one TSV file: --path day_0 [--path day_1 ...]")
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"criteo file {path} does not exist")
    progress(f"reading {len(paths)} Criteo file(s)")
    if len(paths) >= 3:
        splits = {
            "train": (b for p in paths[:-2] for b in read_criteo(Path(p), max_ind_range)),
            "valid": read_criteo(Path(paths[-2]), max_ind_range),
            "test": read_criteo(Path(paths[-1]), max_ind_range),
        }
    else:
        table = pa.Table.from_batches(
            [b for p in paths for b in read_criteo(Path(p), max_ind_range)]
        )
        splits = time_split(table)
    return PreparedTables(
        schema=schema(max_ind_range),
        splits=splits,
        extra_info={"files": [str(p) for p in paths], "max_ind_range": max_ind_range},
    )
