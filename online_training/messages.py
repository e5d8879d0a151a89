"""The wire format of the streaming topics: one Arrow IPC stream per Kafka message, many rows.

Why Arrow IPC: it is columnar, so encoding and decoding cost a copy per column and nothing per
row; it is self-describing, so list features (genres, a behaviour sequence) travel as they are;
and a decoded batch is the same `pyarrow.RecordBatch` that `Dataset.iter_batches` yields offline,
so the trainer reads online and offline batches the same way.

Each message carries exactly one record batch. Its schema metadata says what it is:

- `embtab.kind`: `feature-log`, `actions` or `examples`;
- `embtab.version`: the format version (1);
- `embtab.watermark`: event time (seconds) before which the writer has sent every row of this
  partition: a joiner may close windows that end before it;
- `embtab.end_of_stream`: `1` on the writer's last message of a partition (then the watermark
  is `inf`);
- `embtab.dataset`: the data set the rows come from.

Columns every row of a kind has (feature columns come on top, named as in the data set):

- feature-log: request_id int64, event_time float64 (impression time), produced_at float64
  (wall clock when served), then every feature of the data set;
- actions: request_id int64, user_id int64, item_id int64, click int8 (0/1), impression_time
  float64, event_time float64 (action time), produced_at float64;
- examples: the feature-log columns, then label int8 (0/1).

Feature columns are signed integers, floats, or lists of them; nothing may be null. A batch of
zero rows is a heartbeat: it only advances the watermark (or ends the stream).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

FORMAT_VERSION = 1
FEATURE_LOG = "feature-log"
ACTIONS = "actions"
EXAMPLES = "examples"
KINDS = (FEATURE_LOG, ACTIONS, EXAMPLES)
COMPRESSIONS = (None, "lz4", "zstd")
# Arrow's own buffer compression: about 5x fewer bytes for the broker to store and serve, at
# well under a microsecond per row; any pyarrow reads it, whatever the broker supports.
DEFAULT_COMPRESSION = "lz4"

REQUIRED_COLUMNS: dict[str, dict[str, pa.DataType]] = {
    FEATURE_LOG: {
        "request_id": pa.int64(),
        "event_time": pa.float64(),
        "produced_at": pa.float64(),
    },
    ACTIONS: {
        "request_id": pa.int64(),
        "user_id": pa.int64(),
        "item_id": pa.int64(),
        "click": pa.int8(),
        "impression_time": pa.float64(),
        "event_time": pa.float64(),
        "produced_at": pa.float64(),
    },
    EXAMPLES: {
        "request_id": pa.int64(),
        "event_time": pa.float64(),
        "produced_at": pa.float64(),
        "label": pa.int8(),
    },
}
FEATURE_VALUE_TYPES = (pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.float32(), pa.float64())


class MessageError(ValueError):
    """A Kafka message that is not a valid embtab batch.

    `reason` is a short code for counting (`undecodable`, `not-one-batch`, `metadata`,
    `wrong-kind`, `missing-column`, `wrong-type`, `nulls`, `invalid-value`); the message text
    says what was wrong and what is accepted.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Batch:
    """One decoded message: its rows and what its metadata says."""

    kind: str
    rows: pa.RecordBatch
    watermark: float
    end_of_stream: bool = False
    dataset: str = ""

    @property
    def num_rows(self) -> int:
        return self.rows.num_rows

    def column(self, name: str) -> np.ndarray:
        """A fixed-width column as a numpy array (zero copy)."""
        return self.rows.column(name).to_numpy()

    @property
    def feature_names(self) -> list[str]:
        required = REQUIRED_COLUMNS[self.kind]
        return [name for name in self.rows.schema.names if name not in required]


def encode(batch: Batch, compression: str | None = DEFAULT_COMPRESSION) -> bytes:
    """The batch as one Arrow IPC stream (validated first: nothing invalid is ever sent)."""
    if compression not in COMPRESSIONS:
        raise ValueError(
            f"unknown compression {compression!r}; accepted: {', '.join(map(str, COMPRESSIONS))}"
        )
    validate(batch)
    metadata = {
        "embtab.kind": batch.kind,
        "embtab.version": str(FORMAT_VERSION),
        "embtab.watermark": repr(float(batch.watermark)),
        "embtab.end_of_stream": "1" if batch.end_of_stream else "0",
        "embtab.dataset": batch.dataset,
    }
    rows = batch.rows.replace_schema_metadata(metadata)
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, rows.schema, options=options) as writer:
        writer.write_batch(rows)
    return sink.getvalue().to_pybytes()


def decode(data: bytes, kind: str) -> Batch:
    """The batch in `data`, which must be a valid message of `kind`; else a MessageError."""
    if kind not in KINDS:
        raise ValueError(f"unknown message kind {kind!r}; accepted: {', '.join(KINDS)}")
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
        batches = list(reader)
    # Decoding arbitrary bytes is a parser boundary: any failure in it means "undecodable".
    except Exception as error:
        raise MessageError("undecodable", f"not an Arrow IPC stream ({error})") from error
    if len(batches) != 1:
        raise MessageError(
            "not-one-batch", f"a message holds exactly one record batch, this one {len(batches)}"
        )
    rows = batches[0]
    metadata = {
        key.decode(errors="replace"): value.decode(errors="replace")
        for key, value in (rows.schema.metadata or {}).items()
    }
    if metadata.get("embtab.kind") != kind:
        raise MessageError(
            "wrong-kind", f"expected a {kind} batch, got {metadata.get('embtab.kind')!r}"
        )
    if metadata.get("embtab.version") != str(FORMAT_VERSION):
        raise MessageError(
            "metadata",
            f"format version {metadata.get('embtab.version')!r}; accepted: {FORMAT_VERSION}",
        )
    try:
        watermark = float(metadata["embtab.watermark"])
    except (KeyError, ValueError) as error:
        raise MessageError("metadata", f"embtab.watermark must be a number, got {error}") from error
    if math.isnan(watermark):
        raise MessageError("metadata", "embtab.watermark is NaN; it must be a number or inf")
    end = metadata.get("embtab.end_of_stream", "0")
    if end not in ("0", "1"):
        raise MessageError("metadata", f"embtab.end_of_stream must be 0 or 1, got {end!r}")
    batch = Batch(
        kind=kind,
        rows=rows.replace_schema_metadata(None),
        watermark=watermark,
        end_of_stream=end == "1",
        dataset=metadata.get("embtab.dataset", ""),
    )
    validate(batch)
    return batch


def validate(batch: Batch) -> None:
    """Raise a MessageError unless the rows have the columns, types and values of their kind."""
    if batch.kind not in KINDS:
        raise MessageError("wrong-kind", f"unknown kind {batch.kind!r}; accepted: {KINDS}")
    rows = batch.rows
    schema = rows.schema
    for name, expected in REQUIRED_COLUMNS[batch.kind].items():
        index = schema.get_field_index(name)
        if index < 0:
            raise MessageError(
                "missing-column",
                f"a {batch.kind} batch needs column {name!r} ({expected}); "
                f"columns: {', '.join(schema.names)}",
            )
        if schema.field(index).type != expected:
            raise MessageError(
                "wrong-type",
                f"column {name!r} of a {batch.kind} batch must be {expected}, "
                f"got {schema.field(index).type}",
            )
    if len(set(schema.names)) != len(schema.names):
        raise MessageError("wrong-type", f"duplicate column names: {schema.names}")
    for name in batch.feature_names:
        _check_feature_type(name, schema.field(name).type)
    try:
        rows.validate(full=True)
    except pa.ArrowException as error:
        raise MessageError("undecodable", f"inconsistent Arrow buffers: {error}") from error
    for name, column in zip(schema.names, rows.columns, strict=True):
        nulls = column.null_count
        if pa.types.is_list(column.type):
            nulls += column.values.null_count
        if nulls:
            raise MessageError("nulls", f"column {name!r} has {nulls} nulls; none are accepted")
    if rows.num_rows:
        _check_values(batch)


def _check_feature_type(name: str, data_type: pa.DataType) -> None:
    value_type = data_type.value_type if pa.types.is_list(data_type) else data_type
    if value_type not in FEATURE_VALUE_TYPES:
        raise MessageError(
            "wrong-type",
            f"feature column {name!r} is {data_type}; accepted: signed integers, floats or "
            "lists of them",
        )


def _check_values(batch: Batch) -> None:
    for name in ("event_time", "produced_at", "impression_time"):
        if name in batch.rows.schema.names and not np.isfinite(batch.column(name)).all():
            raise MessageError("invalid-value", f"column {name!r} must be finite")
    for name in ("click", "label"):
        if name in batch.rows.schema.names:
            values = batch.column(name)
            if ((values != 0) & (values != 1)).any():
                raise MessageError("invalid-value", f"column {name!r} must be 0 or 1")
    if (
        batch.kind == ACTIONS
        and (batch.column("impression_time") > batch.column("event_time")).any()
    ):
        raise MessageError(
            "invalid-value", "an action's event_time must not be before its impression_time"
        )
    if (batch.column("request_id") < 0).any():
        raise MessageError("invalid-value", "request ids must be >= 0")


def with_columns(
    rows: pa.RecordBatch, columns: Mapping[str, pa.Array | np.ndarray]
) -> pa.RecordBatch:
    """`rows` with columns added (or replaced), keeping the order of the existing ones."""
    arrays = dict(zip(rows.schema.names, rows.columns, strict=True))
    for name, values in columns.items():
        arrays[name] = values if isinstance(values, pa.Array) else pa.array(values)
    return pa.RecordBatch.from_pydict(arrays)


def heartbeat(
    kind: str,
    watermark: float,
    *,
    end_of_stream: bool = False,
    dataset: str = "",
) -> Batch:
    """A zero-row batch that only moves the watermark on (or ends the stream)."""
    columns = {name: pa.array([], type=t) for name, t in REQUIRED_COLUMNS[kind].items()}
    return Batch(
        kind=kind,
        rows=pa.RecordBatch.from_pydict(columns),
        watermark=math.inf if end_of_stream else watermark,
        end_of_stream=end_of_stream,
        dataset=dataset,
    )


def concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    """Row-wise concatenation of batches that share a schema (at least one batch)."""
    if len(batches) == 1:
        return batches[0]
    return pa.concat_batches(batches)
