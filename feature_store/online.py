"""Online features in Redis: what a scorer needs about a user and its candidate items right now.

Written by the data producers as traffic happens, read by the scorer in one round trip per
request. The store speaks raw values, as the source files have them: users and items are keyed
by their raw id (a string or an integer) and attributes are raw values (string or integer ids,
lists of them, numbers). Nothing in it depends on a preprocessing artifact, so features written
once stay right across model versions whose vocabularies number the ids differently, and a
producer that knows only raw ids can write it; serving encodes what it reads through the
version's artifact (`serving.scorer`). Keys live under `{namespace}:{dataset}` (namespace
`embtab:features` by default):

- `...:user:{raw user id}`: a hash of the user's attributes, one field per feature, msgpack
  values;
- `...:seq:{raw user id}`: a list of the user's recent raw item ids, newest last, capped at the
  sequence feature's `max_length`; each element one msgpack value;
- `...:items`: one hash for all items, field = the raw item id as text (UTF-8), value = a msgpack
  array of the item's attributes in layout order.

A raw id's text is the string itself, or the integer in decimal: a feature's raw ids are all
strings or all integers (the spec's `type`), so the two never meet in one key space.

Reads return `pyarrow.RecordBatch`es whose columns are named as in the data set and typed as the
raw values (string or int64 ids, lists of them, float64 numbers); attributes of users or items
the store does not know are null, an unknown user's sequence is empty. A data set prepared
without a preprocessing artifact has no raw values but its prepared ids: the store then holds
those (int64 ids, float32 numbers), checked against the schema's cardinalities.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import redis

from feature_store.artifact import Preprocessor
from feature_store.redis_client import redis_client
from feature_store.schema import FeatureSpec, Schema

NAMESPACE = "embtab:features"

# The built-in MovieLens layouts, for artifacts prepared before specs said it (`online:`, which
# the bundled MovieLens specs now do); any other data set declares its layout in its spec.
LAYOUTS_BEFORE_SPECS: dict[str, dict[str, tuple[str, ...] | str]] = {
    name: {
        "user_features": ("age", "gender", "occupation", "zip_code"),
        "item_features": ("release_year", "genres"),
        "sequence_feature": "hist_item_id",
    }
    for name in ("movielens-1m", "movielens-100k")
}

RawId = int | str


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
    def for_schema(cls, schema: Schema, preprocessing: Preprocessor | None = None) -> OnlineLayout:
        """The layout the data set's spec declares (`online:`), from its artifact."""
        declared = preprocessing.spec.online if preprocessing is not None else None
        if declared is not None:
            groups = {
                "user_features": declared.user_features,
                "item_features": declared.item_features,
                "sequence_feature": declared.sequence,
            }
        else:
            groups = LAYOUTS_BEFORE_SPECS.get(schema.dataset)
        if groups is None or not {"user", "item"} <= schema.id_columns.keys():
            raise NoOnlineLayout(
                f"data set {schema.dataset!r} has no online feature layout; declare one in its "
                "spec (`online:` with user_features, item_features, sequence; docs/your-data.md)"
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


@dataclass
class PreparedWrite:
    """What `write_prepared` did: rows written, and rows skipped for want of a raw user or item
    id."""

    rows: int = 0
    skipped: int = 0


@dataclass(frozen=True)
class _RawKind:
    """What one online column holds: the Arrow type of its values, and of each id in it."""

    type: pa.DataType
    id_type: pa.DataType | None  # None for numbers

    @property
    def is_list(self) -> bool:
        return pa.types.is_list(self.type)


class OnlineFeatureStore:
    """User profiles, behaviour sequences and item attributes of one data set in Redis, keyed
    by raw ids. `preprocessing`: the data set's artifact, which says each feature's raw type
    (and turns a prepared copy's rows back into raw values, `raw_events`); None for a data set
    prepared without one, whose store holds prepared ids."""

    def __init__(
        self,
        client: redis.Redis,
        schema: Schema,
        layout: OnlineLayout | None = None,
        namespace: str = NAMESPACE,
        preprocessing: Preprocessor | None = None,
    ) -> None:
        self.client = client
        self.schema = schema
        self.layout = layout or OnlineLayout.for_schema(schema, preprocessing)
        self.preprocessing = preprocessing
        self.prefix = f"{namespace}:{self.layout.dataset}"
        layout = self.layout
        names = [layout.user_column, layout.item_column, *layout.user_features]
        names += [*layout.item_features, layout.sequence_feature]
        self._kinds = {name: self._kind(name) for name in names if name is not None}
        self._sequence = (
            schema.feature(layout.sequence_feature) if layout.sequence_feature else None
        )
        self._user_fields = [name.encode() for name in layout.user_features]

    @classmethod
    def from_url(
        cls,
        url: str,
        schema: Schema,
        *,
        namespace: str = NAMESPACE,
        timeout_s: float = 1.0,
        preprocessing: Preprocessor | None = None,
    ) -> OnlineFeatureStore:
        return cls(
            redis_client(url, timeout_s=timeout_s),
            schema,
            namespace=namespace,
            preprocessing=preprocessing,
        )

    # Keys.

    def user_key(self, user_id: RawId) -> str:
        return f"{self.prefix}:user:{_text(user_id)}"

    def sequence_key(self, user_id: RawId) -> str:
        return f"{self.prefix}:seq:{_text(user_id)}"

    @property
    def items_key(self) -> str:
        return f"{self.prefix}:items"

    # Writes.

    def write_users(
        self, user_ids: Sequence[RawId] | pa.Array, attributes: Mapping[str, pa.Array | Sequence]
    ) -> int:
        """Set the given attributes of each user (other attributes are left as they are)."""
        ids = self._ids(user_ids, self.layout.user_column)
        columns = self._columns(attributes, self.layout.user_features, len(ids), partial=True)
        with self._pipeline("write users") as pipe:
            self._queue_users(pipe, ids, columns, np.arange(len(ids)))
        return len(ids)

    def write_items(
        self, item_ids: Sequence[RawId] | pa.Array, attributes: Mapping[str, pa.Array | Sequence]
    ) -> int:
        """Set every attribute of each item (all of the layout's item features are needed)."""
        ids = self._ids(item_ids, self.layout.item_column)
        columns = self._columns(attributes, self.layout.item_features, len(ids), partial=False)
        with self._pipeline("write items") as pipe:
            self._queue_items(pipe, ids, columns, np.arange(len(ids)))
        return len(ids)

    def write_sequences(
        self,
        user_ids: Sequence[RawId] | pa.Array,
        sequences: pa.Array | Sequence[Sequence[RawId]],
    ) -> int:
        """Replace each user's sequence (oldest first; only the last `max_length` are kept)."""
        ids = self._ids(user_ids, self.layout.user_column)
        spec = self._sequence_spec()
        lists = self._columns({spec.name: sequences}, (spec.name,), len(ids), partial=False)
        with self._pipeline("write sequences") as pipe:
            self._queue_sequences(pipe, ids, lists[spec.name], np.arange(len(ids)))
        return len(ids)

    def append_to_sequences(
        self, user_ids: Sequence[RawId] | pa.Array, item_ids: Sequence[RawId] | pa.Array
    ) -> int:
        """Append one item per row (rows in event order) to its user's capped sequence."""
        users = self._ids(user_ids, self.layout.user_column)
        items = self._ids(item_ids, self.layout.item_column)
        spec = self._sequence_spec()
        if len(users) != len(items):
            raise InvalidFeatureValues(
                f"{len(users)} user ids but {len(items)} item ids; give one item per user row"
            )
        per_user: dict[RawId, list[RawId]] = {}
        for user, item in zip(users.to_pylist(), items.to_pylist(), strict=True):
            per_user.setdefault(user, []).append(item)
        with self._pipeline("append to sequences") as pipe:
            for user, appended in per_user.items():
                key = self.sequence_key(user)
                pipe.rpush(key, *(msgpack.packb(item) for item in appended))
                pipe.ltrim(key, -spec.max_length, -1)
        return len(per_user)

    def write_events(self, rows: pa.RecordBatch) -> WriteCounts:
        """Bring the store up to date after these events (time order, raw values): each user's
        profile and sequence (the row's history plus its item) from their latest row, each
        item's attributes from its latest row. One atomic round trip."""
        layout = self.layout
        needed = [layout.user_column, layout.item_column, *layout.user_features]
        needed += [*layout.item_features]
        needed += [layout.sequence_feature] if layout.sequence_feature else []
        missing = [name for name in needed if name not in rows.schema.names]
        if missing:
            raise InvalidFeatureValues(
                f"events lack the online features {missing}; they need {needed}"
            )
        users = self._ids(rows.column(layout.user_column), layout.user_column)
        items = self._ids(rows.column(layout.item_column), layout.item_column)
        user_rows = _last_row_of_each(users)
        item_rows = _last_row_of_each(items)
        user_columns = {name: rows.column(name) for name in layout.user_features}
        item_columns = {name: rows.column(name) for name in layout.item_features}
        for name, column in {**user_columns, **item_columns}.items():
            self._check(name, column)
        with self._pipeline("write events") as pipe:
            self._queue_users(pipe, users, user_columns, user_rows)
            self._queue_items(pipe, items, item_columns, item_rows)
            if self._sequence is not None:
                history = rows.column(self._sequence.name)
                self._check(self._sequence.name, history)
                latest = _append_item(history.take(user_rows), items.take(user_rows))
                self._queue_sequences(
                    pipe, users.take(user_rows), latest, np.arange(len(user_rows))
                )
        sequences = len(user_rows) if self._sequence is not None else 0
        return WriteCounts(users=len(user_rows), sequences=sequences, items=len(item_rows))

    def write_prepared(
        self, batches: Iterable[pa.RecordBatch], max_rows: int | None = None
    ) -> PreparedWrite:
        """Fill the store from a prepared copy's rows (time order: a time split's train, valid,
        test), batch by batch as `write_events` does, until `max_rows` rows (whole batches) or
        the end. The ids go back to their raw values through the artifact: a row whose user or
        item the vocabulary did not keep (the out-of-vocabulary id: a user first seen after the
        fit rows) has no raw id to key it by and is skipped, and counted; a feature hashed from
        raw strings (`ids: hash`) is refused with RawValueError, since its prepared copy holds
        only the hashes."""
        written = PreparedWrite()
        for batch in batches:
            raw = self.raw_events(batch)
            keyed = pc.and_(
                pc.is_valid(raw.column(self.layout.user_column)),
                pc.is_valid(raw.column(self.layout.item_column)),
            )
            kept = raw.filter(keyed)
            if kept.num_rows:
                self.write_events(kept)
            written.rows += kept.num_rows
            written.skipped += raw.num_rows - kept.num_rows
            if max_rows is not None and written.rows + written.skipped >= max_rows:
                break
        return written

    def raw_events(self, prepared: pa.RecordBatch) -> pa.RecordBatch:
        """The online columns of a prepared copy's rows as raw values, through the artifact
        (vocabulary ids back to their values): what `write_events` takes from embtab's own
        replays. Unchanged for a data set prepared without an artifact."""
        names = [name for name in self._kinds if name in prepared.schema.names]
        if self.preprocessing is None:
            return pa.RecordBatch.from_arrays([prepared.column(n) for n in names], names=names)
        return pa.RecordBatch.from_arrays(
            [self.preprocessing.decode(name, prepared.column(name)) for name in names],
            names=names,
        )

    # Reads.

    def get_users(self, user_ids: Sequence[RawId] | pa.Array) -> pa.RecordBatch:
        """Profiles and sequences of these users in one round trip; one row per id."""
        ids = self._ids(user_ids, self.layout.user_column)
        with self._pipeline("read users", transaction=False) as pipe:
            for user in ids.to_pylist():
                self._queue_user_read(pipe, user)
            replies = pipe.execute()
        return self._user_batch(ids, replies)

    def get_items(self, item_ids: Sequence[RawId] | pa.Array) -> pa.RecordBatch:
        """Attributes of these items in one round trip; one row per id."""
        ids = self._ids(item_ids, self.layout.item_column)
        with self._pipeline("read items", transaction=False) as pipe:
            pipe.hmget(self.items_key, [_text(item) for item in ids.to_pylist()] or [b""])
            (packed,) = pipe.execute()
        return self._item_batch(ids, packed[: len(ids)])

    def get_request(self, user_id: RawId, item_ids: Sequence[RawId] | pa.Array) -> pa.RecordBatch:
        """Everything to score `item_ids` for one user, in one round trip: one row per
        candidate with the user's features, the item's, and the user's sequence."""
        user = self._ids([user_id], self.layout.user_column)
        items = self._ids(item_ids, self.layout.item_column)
        with self._pipeline("read request", transaction=False) as pipe:
            self._queue_user_read(pipe, user_id)
            pipe.hmget(self.items_key, [_text(item) for item in items.to_pylist()] or [b""])
            replies = pipe.execute()
        user_batch = self._user_batch(user, replies[:-1])
        item_batch = self._item_batch(items, replies[-1][: len(items)])
        repeat = np.zeros(len(items), dtype=np.int64)
        columns = {name: user_batch.column(name).take(repeat) for name in user_batch.schema.names}
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

    def _kind(self, name: str) -> _RawKind:
        """The raw type of a column: the artifact's spec says it; prepared ids without one."""
        spec = self.schema.feature(name)
        if self.preprocessing is None:
            if spec.kind == "dense":
                return _RawKind(pa.float32(), None)
            listed = spec.kind == "sequence" or spec.max_length > 1
            return _RawKind(pa.list_(pa.int64()) if listed else pa.int64(), pa.int64())
        feature = self.preprocessing.spec.feature(name)
        if feature.kind in ("dense", "count"):
            return _RawKind(pa.float64(), None)
        source = (
            self.preprocessing.spec.feature(feature.of) if feature.kind == "sequence" else feature
        )
        id_type = pa.string() if source.type == "string" else pa.int64()
        listed = feature.kind != "categorical"
        return _RawKind(pa.list_(id_type) if listed else id_type, id_type)

    def _ids(self, values: Sequence[RawId] | pa.Array, column: str) -> pa.Array:
        """Raw ids of the user or item column as an Arrow array of its raw type."""
        kind = self._kinds[column]
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        try:
            ids = values if isinstance(values, pa.Array) else pa.array(list(values), kind.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError) as error:
            raise InvalidFeatureValues(
                f"{column!r} ids must be {_described(kind)}: {error}"
            ) from error
        self._check(column, ids)
        return ids

    def _check(self, name: str, column: pa.Array) -> None:
        """Values of one column fit its raw type (and, for prepared ids, the schema's range)."""
        kind = self._kinds[name]
        flat = column.flatten() if kind.is_list and _is_list(column.type) else column
        if kind.is_list != _is_list(column.type) or not _fits(flat.type, kind):
            raise InvalidFeatureValues(
                f"feature {name!r} holds {_described(kind)}; got {column.type} values"
            )
        if flat.null_count:
            raise InvalidFeatureValues(f"feature {name!r}: values must not be null")
        values = flat.to_numpy(zero_copy_only=False)
        if kind.id_type is None:
            if values.size and not np.isfinite(values.astype(np.float64)).all():
                raise InvalidFeatureValues(f"dense feature {name!r} must be finite")
            return
        spec = self.schema.feature(name)
        if (
            self.preprocessing is None
            and values.size
            and (values.min() < 0 or values.max() >= spec.cardinality)
        ):
            raise InvalidFeatureValues(
                f"feature {name!r}: prepared ids must be in [0, {spec.cardinality}), "
                f"got values in [{values.min()}, {values.max()}]"
            )

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
            kind = self._kinds[name]
            try:
                column = values if isinstance(values, pa.Array) else pa.array(values, kind.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError) as error:
                raise InvalidFeatureValues(
                    f"feature {name!r} holds {_described(kind)}: {error}"
                ) from error
            if isinstance(column, pa.ChunkedArray):
                column = column.combine_chunks()
            if len(column) != rows:
                raise InvalidFeatureValues(
                    f"feature {name!r} has {len(column)} values for {rows} ids"
                )
            self._check(name, column)
            columns[name] = column
        return columns

    def _queue_users(self, pipe, ids: pa.Array, columns: Mapping[str, pa.Array], rows) -> None:
        values = {name: column.take(rows).to_pylist() for name, column in columns.items()}
        for position, user in enumerate(ids.take(rows).to_pylist()):
            mapping = {name: msgpack.packb(v[position]) for name, v in values.items()}
            if mapping:
                pipe.hset(self.user_key(user), mapping=mapping)

    def _queue_items(self, pipe, ids: pa.Array, columns: Mapping[str, pa.Array], rows) -> None:
        if not self.layout.item_features or not len(rows):
            return
        values = [columns[name].take(rows).to_pylist() for name in self.layout.item_features]
        packed = [msgpack.packb(list(row)) for row in zip(*values, strict=True)]
        fields = [_text(item) for item in ids.take(rows).to_pylist()]
        pipe.hset(self.items_key, mapping=dict(zip(fields, packed, strict=True)))

    def _queue_sequences(self, pipe, ids: pa.Array, lists: pa.Array, rows) -> None:
        spec = self._sequence_spec()
        users = ids.to_pylist()
        for row in rows.tolist():
            items = lists[row].as_py()[-spec.max_length :]
            key = self.sequence_key(users[row])
            pipe.delete(key)
            if items:
                pipe.rpush(key, *(msgpack.packb(item) for item in items))

    def _queue_user_read(self, pipe, user: RawId) -> None:
        if self._user_fields:
            pipe.hmget(self.user_key(user), self._user_fields)
        if self._sequence is not None:
            pipe.lrange(self.sequence_key(user), 0, -1)

    def _user_batch(self, ids: pa.Array, replies: list) -> pa.RecordBatch:
        per_user = int(bool(self._user_fields)) + int(self._sequence is not None)
        columns: dict[str, pa.Array] = {self.layout.user_column: ids}
        if self._user_fields:
            profiles = replies[0::per_user]
            for index, name in enumerate(self.layout.user_features):
                values = [self._unpack(profile[index], name) for profile in profiles]
                columns[name] = self._array(values, name)
        if self._sequence is not None:
            name = self._sequence.name
            lists = [
                [self._unpack(element, name) for element in elements]
                for elements in replies[per_user - 1 :: per_user]
            ]
            columns[name] = self._array(lists, name)
        return pa.RecordBatch.from_pydict(columns)

    def _item_batch(self, ids: pa.Array, packed: list) -> pa.RecordBatch:
        names = self.layout.item_features
        rows = [
            self._unpack_item(value, item)
            for item, value in zip(ids.to_pylist(), packed, strict=True)
        ]
        columns: dict[str, pa.Array] = {self.layout.item_column: ids}
        for index, name in enumerate(names):
            values = [None if row is None else row[index] for row in rows]
            columns[name] = self._array(values, name)
        return pa.RecordBatch.from_pydict(columns)

    def _array(self, values: list, name: str) -> pa.Array:
        kind = self._kinds[name]
        try:
            return pa.array(values, kind.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError) as error:
            raise CorruptFeatureValue(
                f"{self.prefix}: stored values of {name!r} are not {_described(kind)} ({error})"
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

    def _unpack_item(self, value: bytes | None, item: RawId):
        row = self._unpack(value, f"item {item}")
        if row is not None and (
            not isinstance(row, list) or len(row) != len(self.layout.item_features)
        ):
            raise CorruptFeatureValue(
                f"{self.items_key}: item {item} holds {row!r}; expected a list of "
                f"{len(self.layout.item_features)} values ({', '.join(self.layout.item_features)})"
            )
        return row

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


def _text(raw_id: RawId) -> str:
    """A raw id as its key text: the string, or the integer in decimal."""
    return raw_id if isinstance(raw_id, str) else str(int(raw_id))


def _is_list(data_type: pa.DataType) -> bool:
    return pa.types.is_list(data_type) or pa.types.is_large_list(data_type)


def _fits(data_type: pa.DataType, kind: _RawKind) -> bool:
    """Whether values of `data_type` are of the column's raw kind (nulls fit any)."""
    if pa.types.is_null(data_type):
        return True
    if kind.id_type is None:
        return pa.types.is_integer(data_type) or pa.types.is_floating(data_type)
    if pa.types.is_string(kind.id_type):
        return pa.types.is_string(data_type) or pa.types.is_large_string(data_type)
    return pa.types.is_integer(data_type)


def _described(kind: _RawKind) -> str:
    if kind.id_type is None:
        return "numbers"
    ids = "string ids" if pa.types.is_string(kind.id_type) else "integer ids"
    return f"lists of {ids}" if kind.is_list else ids


def _last_row_of_each(ids: pa.Array) -> np.ndarray:
    """Index of the last row of each distinct id, in increasing row order."""
    last: dict[RawId, int] = {}
    for row, value in enumerate(ids.to_pylist()):
        last[value] = row
    return np.sort(np.fromiter(last.values(), dtype=np.int64, count=len(last)))


def _append_item(history: pa.Array, items: pa.Array) -> pa.ListArray:
    """Each row's history list with its item appended."""
    lists = [
        (previous or []) + [item]
        for previous, item in zip(history.to_pylist(), items.to_pylist(), strict=True)
    ]
    return pa.array(lists, pa.list_(items.type))


def _address(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
