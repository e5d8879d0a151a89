"""Per-event JSON on the feature-log and actions topics: what any producer can send.

An ad server in Java or Go logs one impression per message as a JSON object, and one click per
message; it sends no Arrow and no watermarks. This module turns such messages into the rows the
joiner keeps, through the model's preprocessing artifact (`Preprocessor.encode`, the transform
offline preparation and `/score` apply), so the stream cannot disagree with training or serving.

The contract (docs/streaming.md has it in full, for producer teams):

- one UTF-8 JSON object per Kafka message, keyed by the request id;
- impressions: the spec's request-id column (`roles.request`, else `request_id`; a string or
  a non-negative integer), its event-time column (epoch s / ms / us / ns numbers or ISO-8601
  text, as `time.unit` says), and one field per feature named by the feature's `column`, with
  the raw value as the source files hold it (an id as a string or an integer as `type` says; a
  list of ids, or text split by `separator`, for multi_valued; a number for dense). A null is what a
  missing value is offline. `sequence` (a list of raw ids of `of`, oldest first) and `count` (a
  number) features are optional: absent, they are empty and 0;
- actions (clicks): the request-id and event-time columns; the label column is optional (absent:
  a click), a 0/1 value or the raw value the spec's label rule applies to (`rating >= 4`).

A message that breaks the contract raises no error here: it is returned with a `MessageError`
(reasons `malformed-json`, `not-an-object`, `missing-field`, `wrong-type`, `bad-time`,
`future-time`, `unmappable`), so the caller can dead-letter it and keep the good ones around it.

A run of messages (a poll) is parsed at once into columns (`pyarrow.json`, one message a line)
and checked column-wise: `json.loads` and per-field checks in Python cost about as much as the
rest of the join. The messages the column-wise parse cannot vouch for (a null, which may be a
missing field; a line break inside; a negative request id; ...) are checked one by one, and so is
every message of a run the parse refuses (a type it does not take, ids of two types): the
results, and each bad message's reason, are the same either way.
"""

from __future__ import annotations

import io
import json
import math
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from feature_store.artifact import Preprocessor, string_hash64
from feature_store.spec import DatasetSpec, FeatureDef
from online_training import messages

FORMATS = ("json", "arrow", "auto")
JSON_START = ord("{")
# The seed of string request ids' hash (any fixed value: a key only has to be stable).
REQUEST_SEED = 0
DEFAULT_REQUEST_FIELD = "request_id"
_TIME_SCALE = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}
_LABEL_RULES: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}


def is_json(value: bytes | None) -> bool:
    """How `--format auto` decides per message: a JSON object starts with `{` (after any
    whitespace); an Arrow IPC stream starts with 0xFFFFFFFF."""
    if not value:
        return False
    start = value.lstrip()[:1]
    return bool(start) and start[0] == JSON_START


@dataclass(frozen=True)
class Impressions:
    """Good impressions of a run of messages: `rows` as a feature-log batch holds them, and the
    index of each row's message in the run."""

    rows: pa.RecordBatch
    message_index: np.ndarray


@dataclass(frozen=True)
class Actions:
    """Good actions of a run of messages. `impression_time` is NaN: a JSON click does not say
    when its impression was (the joiner takes it from the impression)."""

    request_id: np.ndarray
    click: np.ndarray
    event_time: np.ndarray
    message_index: np.ndarray

    @property
    def impression_time(self) -> np.ndarray:
        return np.full(len(self.request_id), np.nan)


class EventDecoder:
    """Decodes runs of JSON messages of one data set (its spec and artifact)."""

    def __init__(
        self,
        preprocessor: Preprocessor,
        max_future_s: float = 300.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        spec = preprocessor.spec
        self.preprocessor = preprocessor
        self.spec = spec
        self.request_field = request_field(spec)
        self.time_field = spec.time.column
        self.label_field = spec.label.column
        self.max_future_s = max_future_s
        self.wall_clock = wall_clock
        self.features = spec.features

    # -- impressions ---------------------------------------------------------------------

    def impressions(
        self, values: Sequence[bytes | None], produced_at: Sequence[float]
    ) -> tuple[Impressions | None, dict[int, messages.MessageError]]:
        """The good impressions among `values` (None if none), and an error per bad message.

        The run is parsed at once into columns (`_parse_run`); the messages that parse cannot
        vouch for (a null, a missing field, a type it does not take) go through the
        per-message checks, which give each bad one its reason."""
        errors: dict[int, messages.MessageError] = {}
        now = self.wall_clock()
        fields = [self.request_field, self.time_field, *(f.column for f in self.features)]
        table, slow = self._parse_run(values, self._impression_schema(), fields)
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, list[pa.Array]]] = []
        if table is not None:
            request_ids, event_times = self._key_and_time_columns(table, slow, now)
            raw_columns = [self._feature_column(feature, table, slow) for feature in self.features]
            fast = np.flatnonzero(~slow)
            if len(fast):
                parts.append(
                    (
                        fast,
                        request_ids[fast],
                        event_times[fast],
                        [column.take(pa.array(fast)) for column in raw_columns],
                    )
                )
        parsed = self._one_by_one(
            values,
            slow,
            now,
            errors,
            lambda event: [self._feature_value(feature, event) for feature in self.features],
        )
        if parsed:
            parts.append(
                (
                    np.array([row[0] for row in parsed], dtype=np.int64),
                    request_keys([row[1] for row in parsed]),
                    np.array([row[2] for row in parsed], dtype=np.float64),
                    [
                        self._raw_array(feature, [row[3][position] for row in parsed])
                        for position, feature in enumerate(self.features)
                    ],
                )
            )
        if not parts:
            return None, errors
        index = np.concatenate([part[0] for part in parts])
        order = np.argsort(index, kind="stable")
        index = index[order]
        take = pa.array(order)
        keep = np.ones(len(index), dtype=bool)
        columns = {}
        for position, feature in enumerate(self.features):
            raw = pa.concat_arrays([part[3][position] for part in parts]).take(take)
            encoded, unmappable = self._encode(feature, raw)
            for row in np.flatnonzero(unmappable & keep):
                keep[row] = False
                errors[int(index[row])] = messages.MessageError(
                    "unmappable",
                    f"field {feature.column!r}: {raw[int(row)].as_py()!r} is not in the "
                    f"vocabulary of feature {feature.name!r}, which has no out-of-vocabulary id "
                    "(oov: false in the spec)",
                )
            columns[feature.name] = encoded
        rows = pa.RecordBatch.from_pydict(
            {
                "request_id": pa.array(np.concatenate([p[1] for p in parts])[order], pa.int64()),
                "event_time": pa.array(np.concatenate([p[2] for p in parts])[order], pa.float64()),
                "produced_at": pa.array(np.asarray(produced_at, dtype=np.float64)[index]),
                **columns,
            }
        )
        if not keep.all():
            rows = rows.filter(pa.array(keep))
            index = index[keep]
        if not rows.num_rows:
            return None, errors
        return Impressions(rows, index), errors

    def _encode(self, feature: FeatureDef, raw: pa.Array) -> tuple[pa.Array, np.ndarray]:
        """One feature's raw values of a run -> model input, and which rows cannot be mapped
        (a categorical value that becomes no id). The types were checked already."""
        encoded = self.preprocessor.encode(feature.name, raw)
        unmappable = np.zeros(len(raw), dtype=bool)
        if feature.kind == "categorical" and pa.types.is_list(encoded.type):
            lengths = np.asarray(encoded.value_lengths().to_numpy(zero_copy_only=False))
            unmappable = lengths == 0
            ids = np.zeros(len(raw), dtype=np.int64)
            ids[~unmappable] = encoded.flatten().to_numpy()
            encoded = pa.array(ids, pa.int64())
        return encoded, unmappable

    # -- a run parsed at once ------------------------------------------------------------

    def _id_type(self, feature: FeatureDef) -> pa.DataType:
        source = self.spec.feature(feature.of) if feature.kind == "sequence" else feature
        return pa.string() if source.type == "string" else pa.int64()

    def _time_type(self) -> pa.DataType:
        return pa.string() if self.spec.time.unit == "iso8601" else pa.float64()

    def _impression_schema(self) -> pa.Schema:
        """The types the run parse holds fields to. The request id, the optional fields
        (sequence, count) and multi_valued text-or-list fields are left to its inference: an
        absent column then tells a field missing everywhere from nulls."""
        fields = [pa.field(self.time_field, self._time_type())]
        for feature in self.features:
            if feature.kind in ("dense",):
                fields.append(pa.field(feature.column, pa.float64()))
            elif feature.kind == "categorical":
                fields.append(pa.field(feature.column, self._id_type(feature)))
            elif feature.kind == "multi_valued" and not feature.separator:
                fields.append(pa.field(feature.column, pa.list_(self._id_type(feature))))
        return pa.schema(fields)

    @staticmethod
    def _parse_run(
        values: Sequence[bytes | None], schema: pa.Schema, fields: list[str]
    ) -> tuple[pa.Table | None, np.ndarray]:
        """All messages of a run parsed at once (`pyarrow.json`, one line each), and which of
        them must be checked one by one (`slow`): an empty one, or one with a line break in it,
        is parsed as `{}` here and marked. None (every message slow) when the parse refuses the
        run: a message that is no JSON object, a type the schema does not take, bad UTF-8."""
        slow = np.zeros(len(values), dtype=bool)
        lines = list(values)
        joined = b"\n".join(value or b"" for value in lines)
        if joined.count(b"\n") != len(lines) - 1 or b"\r" in joined or not all(lines):
            for index, value in enumerate(lines):
                if not value or b"\n" in value or b"\r" in value:
                    lines[index] = b"{}"
                    slow[index] = True
            joined = b"\n".join(lines)
        try:
            joined.decode("utf-8")
            table = pa_json.read_json(
                io.BytesIO(joined),
                read_options=pa_json.ReadOptions(
                    use_threads=False, block_size=max(len(joined) + 1, 1 << 16)
                ),
                parse_options=pa_json.ParseOptions(
                    explicit_schema=schema, unexpected_field_behavior="infer"
                ),
            )
        except (pa.ArrowException, UnicodeDecodeError):
            return None, np.ones(len(values), dtype=bool)
        if table.num_rows != len(values):  # two objects on one line
            return None, np.ones(len(values), dtype=bool)
        names = set(table.column_names)
        return table.select([name for name in dict.fromkeys(fields) if name in names]), slow

    def _key_and_time_columns(
        self, table: pa.Table, slow: np.ndarray, now: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """The run's request keys and event times in seconds; marks `slow` the rows whose
        request id or time the per-message checks must judge (absent, null, negative, not
        finite, too far ahead)."""
        count = table.num_rows
        keys = np.zeros(count, dtype=np.int64)
        times = np.zeros(count, dtype=np.float64)
        request = _column(table, self.request_field)
        if request is None or not (
            pa.types.is_int64(request.type) or pa.types.is_string(request.type)
        ):
            slow[:] = True
            return keys, times
        valid = request.is_valid().to_numpy(zero_copy_only=False)
        if pa.types.is_string(request.type):
            keys[valid] = string_hash64(request.filter(pa.array(valid)), REQUEST_SEED) & np.int64(
                0x7FFFFFFFFFFFFFFF
            )
        else:
            keys = request.fill_null(-1).to_numpy()
            valid &= keys >= 0
        slow |= ~valid
        event_time = _column(table, self.time_field)
        if event_time is None:
            slow[:] = True
            return keys, times
        if self.spec.time.unit == "iso8601":
            for row, value in enumerate(event_time.to_pylist()):
                if value is None or slow[row]:
                    slow[row] = True
                    continue
                try:
                    times[row] = self._event_time(value)
                except messages.MessageError:
                    slow[row] = True
        else:
            scale = _TIME_SCALE[self.spec.time.unit]
            times = event_time.fill_null(math.nan).to_numpy() / scale
            slow |= ~np.isfinite(times)
        slow |= times > now + self.max_future_s
        return keys, times

    def _feature_column(self, feature: FeatureDef, table: pa.Table, slow: np.ndarray) -> pa.Array:
        """One feature's raw values of the run, typed as `_raw_array` types them; marks `slow`
        the rows the per-message checks must judge (a null, which may be a missing field, a null
        id in a list, text a multi_valued field cannot be split into)."""
        column = _column(table, feature.column)
        target = self._raw_array(feature, []).type
        count = table.num_rows
        if column is None or (feature.kind == "sequence" and pa.types.is_null(column.type)):
            if feature.kind == "sequence":
                return pa.array([[]] * count, target)
            if feature.kind == "count":
                return pa.array(np.zeros(count))
            slow[:] = True
            return pa.nulls(count, target)
        if feature.kind == "sequence":
            column = pc.if_else(column.is_null(), pa.scalar([], column.type), column)
        else:
            slow |= ~column.is_valid().to_numpy(zero_copy_only=False)
        if pa.types.is_string(column.type) and feature.kind == "multi_valued":
            return self._split_column(feature, column, slow)
        accepted = {
            "dense": (pa.float64(),),
            "count": (pa.float64(), pa.int64()),
            "categorical": (target,),
        }.get(feature.kind, (target, pa.list_(pa.null())))
        if column.type not in accepted:
            slow[:] = True
            return pa.nulls(count, target)
        if pa.types.is_list(column.type):
            items = column.flatten()
            if items.null_count:
                parents = pc.list_parent_indices(column).to_numpy()
                slow[np.unique(parents[~items.is_valid().to_numpy(zero_copy_only=False)])] = True
        return column.cast(target)

    def _split_column(self, feature: FeatureDef, column: pa.Array, slow: np.ndarray) -> pa.Array:
        """A multi_valued field sent as text: split by its separator as `_feature_value` does."""
        values = []
        for row, text in enumerate(column.to_pylist()):
            if text is None or slow[row]:
                values.append([])
                continue
            try:
                values.append(self._feature_value(feature, {feature.column: text}))
            except messages.MessageError:
                slow[row] = True
                values.append([])
        return self._raw_array(feature, values)

    def _raw_array(self, feature: FeatureDef, values: list) -> pa.Array:
        if feature.kind in ("dense", "count"):
            return pa.array(values, pa.float64())
        id_type = self._id_type(feature)
        if feature.kind == "categorical":
            return pa.array(values, id_type)
        return pa.array(values, pa.list_(id_type))

    # -- actions -------------------------------------------------------------------------

    def actions(
        self, values: Sequence[bytes | None]
    ) -> tuple[Actions | None, dict[int, messages.MessageError]]:
        """The good actions among `values` (None if none), and an error per bad message; parsed
        at once as `impressions` is, the messages the parse cannot vouch for one by one."""
        errors: dict[int, messages.MessageError] = {}
        now = self.wall_clock()
        schema = pa.schema([pa.field(self.time_field, self._time_type())])
        fields = [self.request_field, self.time_field, self.label_field]
        table, slow = self._parse_run(values, schema, fields)
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        if table is not None:
            request_ids, event_times = self._key_and_time_columns(table, slow, now)
            clicks = self._click_column(table, slow)
            fast = np.flatnonzero(~slow)
            if len(fast):
                parts.append((fast, request_ids[fast], clicks[fast], event_times[fast]))
        good = self._one_by_one(values, slow, now, errors, self._click)
        if good:
            parts.append(
                (
                    np.array([g[0] for g in good], dtype=np.int64),
                    request_keys([g[1] for g in good]),
                    np.array([g[3] for g in good], dtype=np.int8),
                    np.array([g[2] for g in good], dtype=np.float64),
                )
            )
        if not parts:
            return None, errors
        index = np.concatenate([part[0] for part in parts])
        order = np.argsort(index, kind="stable")
        return (
            Actions(
                request_id=np.concatenate([part[1] for part in parts])[order],
                click=np.concatenate([part[2] for part in parts]).astype(np.int8)[order],
                event_time=np.concatenate([part[3] for part in parts])[order],
                message_index=index[order],
            ),
            errors,
        )

    def _click_column(self, table: pa.Table, slow: np.ndarray) -> np.ndarray:
        """The run's clicks (absent everywhere: all clicks); marks `slow` the rows `_click`
        must judge (a null, which may be a missing label, or a label it does not take)."""
        column = _column(table, self.label_field)
        if column is None:
            return np.ones(table.num_rows, dtype=np.int8)
        if not (pa.types.is_int64(column.type) or pa.types.is_float64(column.type)):
            slow[:] = True
            return np.zeros(table.num_rows, dtype=np.int8)
        value = column.cast(pa.float64()).fill_null(math.nan).to_numpy()
        rule = self.spec.label
        if rule.op is None:
            slow |= ~np.isin(value, (0.0, 1.0))
            return (value == 1.0).astype(np.int8)
        slow |= np.isnan(value)
        return _LABEL_RULES[rule.op](value, rule.value).astype(np.int8)

    def _click(self, event: dict) -> int:
        if self.label_field not in event:
            return 1
        value = event[self.label_field]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise messages.MessageError(
                "wrong-type",
                f"field {self.label_field!r} (the label) takes a number, got {value!r}",
            )
        rule = self.spec.label
        if rule.op is None:
            if value not in (0, 1):
                raise messages.MessageError(
                    "wrong-type", f"field {self.label_field!r} (the label) is 0 or 1, got {value!r}"
                )
            return int(value)
        return int(_LABEL_RULES[rule.op](value, rule.value))

    # -- fields --------------------------------------------------------------------------

    def _one_by_one(
        self,
        values: Sequence[bytes | None],
        slow: np.ndarray,
        now: float,
        errors: dict[int, messages.MessageError],
        rest: Callable[[dict], Any],
    ) -> list[tuple[int, str | int, float, Any]]:
        """The messages a run's parse could not vouch for, checked one at a time: (index,
        request id, event time, what `rest` reads of the event) of each good one; a bad one's
        error goes into `errors`."""
        good = []
        for index in np.flatnonzero(slow).tolist():
            try:
                event = self._object(values[index])
                request_id, event_time = self._key_and_time(event, now)
                read = rest(event)
            except messages.MessageError as error:
                errors[index] = error
                continue
            good.append((index, request_id, event_time, read))
        return good

    @staticmethod
    def _object(value: bytes | None) -> dict:
        try:
            event = json.loads(value or b"")
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise messages.MessageError(
                "malformed-json", f"not a UTF-8 JSON object ({error})"
            ) from error
        if not isinstance(event, dict):
            raise messages.MessageError(
                "not-an-object", f"a message is one JSON object, got {type(event).__name__}"
            )
        return event

    def _key_and_time(self, event: dict, now: float) -> tuple[str | int, float]:
        request = self._field(event, self.request_field, "the request id")
        if not (
            isinstance(request, str)
            or (isinstance(request, int) and not isinstance(request, bool) and 0 <= request < 2**63)
        ):
            raise messages.MessageError(
                "wrong-type",
                f"field {self.request_field!r} (the request id) takes a string or an integer in "
                f"[0, 2**63), got {request!r}",
            )
        event_time = self._event_time(self._field(event, self.time_field, "the event time"))
        if event_time > now + self.max_future_s:
            raise messages.MessageError(
                "future-time",
                f"field {self.time_field!r}: event time {event_time:.3f} is {event_time - now:.0f} "
                f"s ahead of this consumer's clock; accepted: at most {self.max_future_s:g} s "
                "ahead (check the unit: the spec says time.unit "
                f"{self.spec.time.unit!r})",
            )
        return request, event_time

    def _event_time(self, value: object) -> float:
        unit = self.spec.time.unit
        if unit == "iso8601":
            if not isinstance(value, str):
                raise messages.MessageError(
                    "bad-time", f"field {self.time_field!r} takes ISO-8601 text, got {value!r}"
                )
            try:
                parsed = datetime.fromisoformat(value)
            except ValueError as error:
                raise messages.MessageError(
                    "bad-time",
                    f"field {self.time_field!r}: {value!r} is not an ISO-8601 time; accepted: "
                    "e.g. 2024-05-01T12:30:00, 2024-05-01 12:30:00.250 or "
                    "2024-05-01T12:30:00+02:00 (without an offset, UTC)",
                ) from error
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            return parsed.timestamp()
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise messages.MessageError(
                "bad-time",
                f"field {self.time_field!r} takes epoch time in {unit} (a number), got {value!r}",
            )
        return float(value) / _TIME_SCALE[unit]

    @staticmethod
    def _field(event: dict, name: str, what: str) -> object:
        if name not in event:
            raise messages.MessageError(
                "missing-field", f"no field {name!r} ({what}); fields: {sorted(event)[:20]}"
            )
        return event[name]

    def _feature_value(self, feature: FeatureDef, event: dict) -> object:
        """The raw value of one feature, type-checked (a list for multi_valued and sequence)."""
        if feature.kind in ("sequence", "count") and feature.column not in event:
            return [] if feature.kind == "sequence" else 0.0
        value = self._field(event, feature.column, f"feature {feature.name!r}")
        if value is None:
            return [] if feature.kind in ("multi_valued", "sequence") else None
        if feature.kind in ("dense", "count"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise messages.MessageError(
                    "wrong-type",
                    f"field {feature.column!r} (dense feature {feature.name!r}) takes a number, "
                    f"got {value!r}",
                )
            return float(value)
        source = self.spec.feature(feature.of) if feature.kind == "sequence" else feature
        if feature.kind == "categorical":
            _check_id(source, feature.column, value)
            return value
        if isinstance(value, str) and feature.kind == "multi_valued" and feature.separator:
            parts = [part for part in value.split(feature.separator) if part]
            if source.type == "int":
                try:
                    return [int(part) for part in parts]
                except ValueError as error:
                    raise messages.MessageError(
                        "wrong-type",
                        f"field {feature.column!r}: {value!r}; accepted: integers separated by "
                        f"{feature.separator!r}",
                    ) from error
            return parts
        if not isinstance(value, list):
            accepted = "a list of ids" + (
                f" or text separated by {feature.separator!r}" if feature.separator else ""
            )
            raise messages.MessageError(
                "wrong-type",
                f"field {feature.column!r} (feature {feature.name!r}) takes {accepted}, "
                f"got {value!r}",
            )
        expected = str if source.type == "string" else int
        if not all(type(item) is expected for item in value):  # a bool is no int here
            for item in value:
                _check_id(source, feature.column, item)
        return value


def _column(table: pa.Table, name: str) -> pa.Array | None:
    """A parsed run's column as one array, or None where no message of the run had the field."""
    if name not in table.column_names:
        return None
    return table.column(name).combine_chunks()


def raw_times(seconds: np.ndarray, unit: str) -> list:
    """Event times in seconds as a spec's time column holds them (what `_event_time` reads)."""
    if unit == "iso8601":
        return [datetime.fromtimestamp(t, UTC).isoformat() for t in seconds.tolist()]
    if unit == "s":
        return seconds.tolist()
    return np.round(seconds * _TIME_SCALE[unit]).astype(np.int64).tolist()


def _check_id(feature: FeatureDef, field_name: str, value: object) -> None:
    expected = str if feature.type == "string" else int
    if isinstance(value, bool) or not isinstance(value, expected):
        raise messages.MessageError(
            "wrong-type",
            f"field {field_name!r} (feature {feature.name!r}) takes {feature.type} ids, "
            f"got {value!r}",
        )


def request_field(spec: DatasetSpec) -> str:
    """The field of an event that holds its request id: the spec's `roles.request`, else
    `request_id`."""
    return spec.roles.get("request", DEFAULT_REQUEST_FIELD)


def request_keys(request_ids: list[str | int]) -> np.ndarray:
    """Raw request ids as the joiner's non-negative int64 keys: an integer stays itself, a
    string becomes the artifact's 64-bit string hash with the sign bit cleared."""
    keys = np.zeros(len(request_ids), dtype=np.int64)
    text = [index for index, value in enumerate(request_ids) if isinstance(value, str)]
    numbers = [index for index, value in enumerate(request_ids) if not isinstance(value, str)]
    if numbers:
        keys[numbers] = [request_ids[index] for index in numbers]
    if text:
        hashed = string_hash64(pa.array([request_ids[index] for index in text]), REQUEST_SEED)
        keys[text] = hashed & np.int64(0x7FFFFFFFFFFFFFFF)
    return keys
