"""Online features in Redis: what a scorer needs about a user and its candidate items right now.

Written by the data producers as traffic happens, read by the scorer in one round trip per
request. Keys live under `{namespace}:{dataset}` (namespace `embtab:features` by default):

- `...:user:{user_id}`: a hash of the user's attributes, one field per feature, msgpack values;
- `...:seq:{user_id}`: a list of the user's recent item ids, newest last, capped at the sequence
  feature's `max_length`; each element an 8-byte little-endian id, as in the parameter shards;
- `...:items`: one hash for all items, field = the item id as 8-byte little-endian, value = a
  msgpack array of the item's attributes in layout order.

Reads return `pyarrow.RecordBatch`es whose columns are named and typed as in the offline data
set, so the scorer builds model input from them as the trainer does from Parquet; attributes of
users or items the store does not know are null, an unknown user's sequence is empty.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import msgpack
import numpy as np
import pyarrow as pa
import redis

from feature_store.redis_client import redis_client
from feature_store.schema import FeatureSpec, Schema

NAMESPACE = "embtab:features"
ID_BYTES = 8

# Which features each data set keeps online, and under which entity.
ONLINE_FEATURES: dict[str, dict[str, tuple[str, ...] | str]] = {
    name: {
        "user_features": ("age", "gender", "occupation", "zip_code"),
        "item_features": ("release_year", "genres"),
        "sequence_feature": "hist_item_id",
    }
    for name in ("movielens-1m", "movielens-100k")
}


class OnlineFeatureError(Exception):
    """A failure of the online feature store; the message says what and where."""


class OnlineStoreUnavailable(OnlineFeatureError):
    """Redis did not answer in time, or refused the connection."""


class InvalidFeatureValues(OnlineFeatureError, ValueError):
    """Values given to a write that do not fit the layout or the schema."""


class CorruptFeatureValue(OnlineFeatureError):
    """A stored value that does not decode as the layout says it should."""


class NoOnlineLayout(OnlineFeatureError, ValueError):
    """A data set whose features have no online layout."""


@dataclass(frozen=True)
class OnlineLayout:
    """Which features are kept online: per user, per item, and the user's behaviour sequence."""

    dataset: str
    user_column: str
    item_column: str
    user_features: tuple[str, ...]
    item_features: tuple[str, ...]
    sequence_feature: str | None = None

    @classmethod
    def for_schema(cls, schema: Schema) -> OnlineLayout:
        groups = ONLINE_FEATURES.get(schema.dataset)
        if groups is None or not {"user", "item"} <= schema.id_columns.keys():
            raise NoOnlineLayout(
                f"data set {schema.dataset!r} has no online feature layout; "
                f"data sets with one: {', '.join(sorted(ONLINE_FEATURES))}"
            )
        return cls(
            dataset=schema.dataset,
            user_column=schema.id_columns["user"],
            item_column=schema.id_columns["item"],
            **groups,
        )


@dataclass(frozen=True)
class WriteCounts:
    """How many users, sequences and items one write touched."""

    users: int
    sequences: int
    items: int


class OnlineFeatureStore:
    """User profiles, behaviour sequences and item attributes of one data set in Redis."""

    def __init__(
        self,
        client: redis.Redis,
        schema: Schema,
        layout: OnlineLayout | None = None,
        namespace: str = NAMESPACE,
    ) -> None:
        self.client = client
        self.schema = schema
        self.layout = layout or OnlineLayout.for_schema(schema)
        self.prefix = f"{namespace}:{self.layout.dataset}"
        self._specs = {
            name: schema.feature(name)
            for name in (*self.layout.user_features, *self.layout.item_features)
        }
        self._sequence = (
            schema.feature(self.layout.sequence_feature) if self.layout.sequence_feature else None
        )
        self._user_fields = [name.encode() for name in self.layout.user_features]

    @classmethod
    def from_url(
        cls, url: str, schema: Schema, *, namespace: str = NAMESPACE, timeout_s: float = 1.0
    ) -> OnlineFeatureStore:
        return cls(redis_client(url, timeout_s=timeout_s), schema, namespace=namespace)

    # Keys.

    def user_key(self, user_id: int) -> str:
        return f"{self.prefix}:user:{int(user_id)}"

    def sequence_key(self, user_id: int) -> str:
        return f"{self.prefix}:seq:{int(user_id)}"

    @property
    def items_key(self) -> str:
        return f"{self.prefix}:items"

    # Writes.

    def write_users(
        self, user_ids: Sequence[int] | np.ndarray, attributes: Mapping[str, pa.Array | Sequence]
    ) -> int:
        """Set the given attributes of each user (other attributes are left as they are)."""
        ids = _ids(user_ids, "user ids")
        columns = self._columns(attributes, self.layout.user_features, len(ids), partial=True)
        with self._pipeline("write users") as pipe:
            self._queue_users(pipe, ids, columns, np.arange(len(ids)))
        return len(ids)

    def write_items(
        self, item_ids: Sequence[int] | np.ndarray, attributes: Mapping[str, pa.Array | Sequence]
    ) -> int:
        """Set every attribute of each item (all of the layout's item features are needed)."""
        ids = _ids(item_ids, "item ids")
        columns = self._columns(attributes, self.layout.item_features, len(ids), partial=False)
        with self._pipeline("write items") as pipe:
            self._queue_items(pipe, ids, columns, np.arange(len(ids)))
        return len(ids)

    def write_sequences(
        self, user_ids: Sequence[int] | np.ndarray, sequences: pa.Array | Sequence[Sequence[int]]
    ) -> int:
        """Replace each user's sequence (oldest first; only the last `max_length` are kept)."""
        ids = _ids(user_ids, "user ids")
        spec = self._sequence_spec()
        lists = self._columns({spec.name: sequences}, (spec.name,), len(ids), partial=False)
        with self._pipeline("write sequences") as pipe:
            self._queue_sequences(pipe, ids, lists[spec.name], np.arange(len(ids)))
        return len(ids)

    def append_to_sequences(
        self, user_ids: Sequence[int] | np.ndarray, item_ids: Sequence[int] | np.ndarray
    ) -> int:
        """Append one item per row (rows in event order) to its user's capped sequence."""
        users = _ids(user_ids, "user ids")
        items = _ids(item_ids, "item ids")
        spec = self._sequence_spec()
        if len(users) != len(items):
            raise InvalidFeatureValues(
                f"{len(users)} user ids but {len(items)} item ids; give one item per user row"
            )
        _check_range(spec, items)
        order = np.argsort(users, kind="stable")
        starts = np.r_[0, np.flatnonzero(np.diff(users[order])) + 1, len(order)]
        with self._pipeline("append to sequences") as pipe:
            for start, end in zip(starts[:-1], starts[1:], strict=True):
                key = self.sequence_key(users[order[start]])
                pipe.rpush(key, *_id_elements(items[order[start:end]]))
                pipe.ltrim(key, -spec.max_length, -1)
        return len(starts) - 1

    def write_events(self, rows: pa.RecordBatch) -> WriteCounts:
        """Bring the store up to date after these events (time order): each user's profile and
        sequence (the row's history plus its item) from their latest row, each item's attributes
        from its latest row. One atomic round trip."""
        layout = self.layout
        needed = [layout.user_column, layout.item_column, *layout.user_features]
        needed += [*layout.item_features]
        needed += [layout.sequence_feature] if layout.sequence_feature else []
        missing = [name for name in needed if name not in rows.schema.names]
        if missing:
            raise InvalidFeatureValues(
                f"events lack the online features {missing}; they need {needed}"
            )
        users = rows.column(layout.user_column).to_numpy()
        items = rows.column(layout.item_column).to_numpy()
        user_rows = _last_row_of_each(users)
        item_rows = _last_row_of_each(items)
        user_columns = {name: rows.column(name) for name in layout.user_features}
        item_columns = {name: rows.column(name) for name in layout.item_features}
        for name, column in {**user_columns, **item_columns}.items():
            _check_range(self._specs[name], _values(column))
        with self._pipeline("write events") as pipe:
            self._queue_users(pipe, users, user_columns, user_rows)
            self._queue_items(pipe, items, item_columns, item_rows)
            if self._sequence is not None:
                history = rows.column(self._sequence.name)
                _check_range(self._sequence, _values(history))
                _check_range(self._sequence, items)
                latest = _append_item(history.take(user_rows), items[user_rows])
                self._queue_sequences(pipe, users[user_rows], latest, np.arange(len(user_rows)))
        sequences = len(user_rows) if self._sequence is not None else 0
        return WriteCounts(users=len(user_rows), sequences=sequences, items=len(item_rows))

    # Reads.

    def get_users(self, user_ids: Sequence[int] | np.ndarray) -> pa.RecordBatch:
        """Profiles and sequences of these users in one round trip; one row per id."""
        ids = _ids(user_ids, "user ids")
        with self._pipeline("read users", transaction=False) as pipe:
            for user in ids:
                self._queue_user_read(pipe, user)
            replies = pipe.execute()
        return self._user_batch(ids, replies)

    def get_items(self, item_ids: Sequence[int] | np.ndarray) -> pa.RecordBatch:
        """Attributes of these items in one round trip; one row per id."""
        ids = _ids(item_ids, "item ids")
        with self._pipeline("read items", transaction=False) as pipe:
            pipe.hmget(self.items_key, list(_id_elements(ids)) or [b""])
            (packed,) = pipe.execute()
        return self._item_batch(ids, packed[: len(ids)])

    def get_request(self, user_id: int, item_ids: Sequence[int] | np.ndarray) -> pa.RecordBatch:
        """Everything to score `item_ids` for one user, in one round trip: one row per
        candidate with the user's features, the item's, and the user's sequence."""
        items = _ids(item_ids, "item ids")
        with self._pipeline("read request", transaction=False) as pipe:
            self._queue_user_read(pipe, int(user_id))
            pipe.hmget(self.items_key, list(_id_elements(items)) or [b""])
            replies = pipe.execute()
        user = self._user_batch(np.array([int(user_id)]), replies[:-1])
        item_batch = self._item_batch(items, replies[-1][: len(items)])
        repeat = np.zeros(len(items), dtype=np.int64)
        columns = {name: user.column(name).take(repeat) for name in user.schema.names}
        columns.update(zip(item_batch.schema.names, item_batch.columns, strict=True))
        order = [name for name in self._column_order() if name in columns]
        return pa.RecordBatch.from_pydict({name: columns[name] for name in order})

    def clear(self) -> int:
        """Delete every key of this store (this namespace and data set only); returns how many."""
        deleted = 0
        with self._redis_errors("clear"):
            batch: list[bytes] = []
            for key in self.client.scan_iter(match=f"{self.prefix}:*", count=1000):
                batch.append(key)
                if len(batch) == 1000:
                    deleted += self.client.unlink(*batch)
                    batch = []
            if batch:
                deleted += self.client.unlink(*batch)
        return deleted

    # Internals.

    def _sequence_spec(self) -> FeatureSpec:
        if self._sequence is None:
            raise InvalidFeatureValues(
                f"the online layout of {self.layout.dataset!r} has no sequence feature"
            )
        return self._sequence

    def _columns(
        self,
        given: Mapping[str, pa.Array | Sequence],
        allowed: Sequence[str],
        rows: int,
        partial: bool,
    ) -> dict[str, pa.Array]:
        unknown = sorted(set(given) - set(allowed))
        absent = [] if partial else [name for name in allowed if name not in given]
        if unknown or absent:
            raise InvalidFeatureValues(
                f"features {unknown or absent} do not match the online layout; "
                f"accepted: {', '.join(allowed)}"
            )
        columns = {}
        for name, values in given.items():
            column = values if isinstance(values, pa.Array) else pa.array(values)
            if isinstance(column, pa.ChunkedArray):
                column = column.combine_chunks()
            if len(column) != rows:
                raise InvalidFeatureValues(
                    f"feature {name!r} has {len(column)} values for {rows} ids"
                )
            spec = self._sequence if name == self.layout.sequence_feature else self._specs[name]
            _check_range(spec, _values(column))
            columns[name] = column
        return columns

    def _queue_users(self, pipe, ids: np.ndarray, columns: Mapping[str, pa.Array], rows) -> None:
        values = {name: column.take(rows).to_pylist() for name, column in columns.items()}
        for position, user in enumerate(ids[rows].tolist()):
            mapping = {name: msgpack.packb(v[position]) for name, v in values.items()}
            if mapping:
                pipe.hset(self.user_key(user), mapping=mapping)

    def _queue_items(self, pipe, ids: np.ndarray, columns: Mapping[str, pa.Array], rows) -> None:
        if not self.layout.item_features or not len(rows):
            return
        values = [columns[name].take(rows).to_pylist() for name in self.layout.item_features]
        packed = [msgpack.packb(list(row)) for row in zip(*values, strict=True)]
        fields = _id_elements(ids[rows])
        pipe.hset(self.items_key, mapping=dict(zip(fields, packed, strict=True)))

    def _queue_sequences(self, pipe, ids: np.ndarray, lists: pa.Array, rows) -> None:
        spec = self._sequence_spec()
        offsets = lists.offsets.to_numpy()
        flat = lists.values.to_numpy()
        for row in rows.tolist():
            start = max(int(offsets[row]), int(offsets[row + 1]) - spec.max_length)
            key = self.sequence_key(ids[row])
            pipe.delete(key)
            if offsets[row + 1] > start:
                pipe.rpush(key, *_id_elements(flat[start : offsets[row + 1]]))

    def _queue_user_read(self, pipe, user: int) -> None:
        if self._user_fields:
            pipe.hmget(self.user_key(user), self._user_fields)
        if self._sequence is not None:
            pipe.lrange(self.sequence_key(user), 0, -1)

    def _user_batch(self, ids: np.ndarray, replies: list) -> pa.RecordBatch:
        per_user = int(bool(self._user_fields)) + int(self._sequence is not None)
        columns: dict[str, pa.Array] = {self.layout.user_column: pa.array(ids, pa.int64())}
        if self._user_fields:
            profiles = replies[0::per_user]
            for index, name in enumerate(self.layout.user_features):
                values = [self._unpack(profile[index], name) for profile in profiles]
                columns[name] = self._array(values, name)
        if self._sequence is not None:
            columns[self._sequence.name] = self._decode_sequences(replies[per_user - 1 :: per_user])
        return pa.RecordBatch.from_pydict(columns)

    def _item_batch(self, ids: np.ndarray, packed: list) -> pa.RecordBatch:
        names = self.layout.item_features
        rows = [
            self._unpack_item(value, int(item)) for item, value in zip(ids, packed, strict=True)
        ]
        columns: dict[str, pa.Array] = {self.layout.item_column: pa.array(ids, pa.int64())}
        for index, name in enumerate(names):
            values = [None if row is None else row[index] for row in rows]
            columns[name] = self._array(values, name)
        return pa.RecordBatch.from_pydict(columns)

    def _array(self, values: list, name: str) -> pa.Array:
        spec = self._specs[name]
        try:
            return pa.array(values, _arrow_type(spec))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as error:
            raise CorruptFeatureValue(
                f"{self.prefix}: stored values of {name!r} are not {spec.kind} values ({error})"
            ) from error

    def _unpack(self, value: bytes | None, where: str):
        if value is None:
            return None
        try:
            return msgpack.unpackb(value)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as error:
            raise CorruptFeatureValue(
                f"{self.prefix}: the stored value of {where!r} is not msgpack ({error})"
            ) from error

    def _unpack_item(self, value: bytes | None, item: int):
        row = self._unpack(value, f"item {item}")
        if row is not None and (
            not isinstance(row, list) or len(row) != len(self.layout.item_features)
        ):
            raise CorruptFeatureValue(
                f"{self.items_key}: item {item} holds {row!r}; expected a list of "
                f"{len(self.layout.item_features)} values ({', '.join(self.layout.item_features)})"
            )
        return row

    def _decode_sequences(self, replies: list[list[bytes]]) -> pa.ListArray:
        lengths = np.array([len(elements) for elements in replies], dtype=np.int64)
        joined = b"".join(element for elements in replies for element in elements)
        if len(joined) != ID_BYTES * int(lengths.sum()):
            raise CorruptFeatureValue(
                f"{self.prefix}: a sequence element is not an {ID_BYTES}-byte id"
            )
        offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
        values = np.frombuffer(joined, dtype="<i8").astype(np.int64)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int64()))

    def _column_order(self) -> list[str]:
        names = [spec.name for spec in self.schema.features]
        ids = [self.layout.user_column, self.layout.item_column]
        return ids + [name for name in names if name not in ids]

    @contextlib.contextmanager
    def _pipeline(self, what: str, transaction: bool = True) -> Iterator:
        """A pipeline whose commands go out in one round trip; writes are atomic (MULTI/EXEC)."""
        with self._redis_errors(what), self.client.pipeline(transaction=transaction) as pipe:
            yield pipe
            if pipe.command_stack:
                pipe.execute()

    @contextlib.contextmanager
    def _redis_errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except redis.AuthenticationError as error:  # a ConnectionError to redis-py
            raise OnlineStoreUnavailable(
                f"online features ({what}): Redis at {_address(self.client)} refused the "
                f"credentials of its URL (redis://user:password@host:port/db): {error}"
            ) from error
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise OnlineStoreUnavailable(
                f"online features ({what}): Redis at {_address(self.client)} is unavailable: "
                f"{error}"
            ) from error
        except redis.RedisError as error:
            raise OnlineFeatureError(
                f"online features ({what}): Redis at {_address(self.client)} failed: {error}"
            ) from error


def _ids(values: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
    ids = np.asarray(values)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise InvalidFeatureValues(f"{what} must be a 1-D sequence of integers, got {ids.dtype}")
    return ids.astype(np.int64, copy=False)


def _id_elements(ids: np.ndarray) -> list[bytes]:
    """Each id as 8 little-endian bytes."""
    raw = np.ascontiguousarray(ids, dtype="<i8").tobytes()
    return [raw[start : start + ID_BYTES] for start in range(0, len(raw), ID_BYTES)]


def _values(column: pa.Array) -> np.ndarray:
    """The flat values of a scalar or list column."""
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        column = column.flatten()
    if column.null_count:
        raise InvalidFeatureValues("feature values must not be null")
    return column.to_numpy(zero_copy_only=False)


def _check_range(spec: FeatureSpec, values: np.ndarray) -> None:
    if spec.kind == "dense":
        if values.size and not np.isfinite(values.astype(np.float64)).all():
            raise InvalidFeatureValues(f"dense feature {spec.name!r} must be finite")
        return
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise InvalidFeatureValues(
            f"feature {spec.name!r} holds ids; got {values.dtype} values, accepted: integers"
        )
    if values.size and (values.min() < 0 or values.max() >= spec.cardinality):
        raise InvalidFeatureValues(
            f"feature {spec.name!r}: ids must be in [0, {spec.cardinality}), "
            f"got values in [{values.min()}, {values.max()}]"
        )


def _arrow_type(spec: FeatureSpec) -> pa.DataType:
    if spec.kind == "dense":
        return pa.float32()
    if spec.kind == "sequence" or spec.max_length > 1:
        return pa.list_(pa.int64())
    return pa.int64()


def _last_row_of_each(ids: np.ndarray) -> np.ndarray:
    """Index of the last row of each distinct id, in increasing row order."""
    _, from_end = np.unique(ids[::-1], return_index=True)
    return np.sort(len(ids) - 1 - from_end)


def _append_item(history: pa.Array, items: np.ndarray) -> pa.ListArray:
    """Each row's history list with its item appended."""
    offsets = history.offsets.to_numpy()
    flat = history.values.to_numpy()
    lengths = np.diff(offsets) + 1
    new_offsets = np.r_[0, np.cumsum(lengths)]
    values = np.empty(int(new_offsets[-1]), dtype=np.int64)
    last = new_offsets[1:] - 1
    keep = np.ones(len(values), dtype=bool)
    keep[last] = False
    values[keep] = flat[offsets[0] : offsets[-1]]
    values[last] = items
    return pa.ListArray.from_arrays(pa.array(new_offsets, pa.int32()), pa.array(values))


def _address(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
