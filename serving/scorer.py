"""Score candidates with the live published version: request -> features -> rows -> forward.

Design, for a low p99. A server holds one `Snapshot` per (version, dense revision): the model
rebuilt from the dense blob, whose EmbeddingCollection's tables serve as scratch storage. For a
batch, `RowPlanner` computes every physical row the forward will read (the collection's own pure
index transforms); rows the scratch tables already hold (a residency bitmap per table, cleared
by deltas) cost nothing, the others come from the local `RowCache` or, for the misses, from
Redis in one pipelined round trip per node, and are written into the scratch tables
(`load_rows`, one index_copy per table); then the unmodified model forward runs. So a warm
request does no Redis round trip for rows and no copying, the cache bounds what is held beyond
the model's own allocation, and no per-request model or table is ever built. Batches run one at
a time, so the scratch tables are never shared; a new version or dense revision is built beside
the current snapshot and swapped in by one reference assignment, so a batch always sees one
dense version.

Online features: the user's profile and sequence are read once per batch (one round trip), item
attributes are kept locally for a short time (`serving.item_features`).

If Redis is down (see `serving.health`), rows not held locally are the tables' default rows,
user features are skipped and item features are what is held (request values and defaults
otherwise); the answer says it is degraded. The same holds while the served version's data is
missing from Redis (it lost its data: no live version, or a live version whose keys are gone):
rows are then not read from Redis at all (a publish under the same number may be writing its
own rows there), and the answers stay degraded until a version can be read again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from feature_store.artifact import Preprocessor
from feature_store.online import OnlineFeatureError, OnlineFeatureStore, OnlineStoreUnavailable
from feature_store.schema import Schema
from feature_store.wheels import DataError
from models.base import Model
from models.batches import batch_from_columns
from serving.cache import RowCache
from serving.dense_blob import DenseState
from serving.errors import (
    RedisUnavailableError,
    ServingError,
    StoreError,
    VersionNotFoundError,
)
from serving.health import RedisHealth
from serving.item_features import ItemFeatureCache, model_column
from serving.jagged import Jagged
from serving.manifest import VersionHead, VersionManifest
from serving.parsing import Preparation, check_model, prepare_columns
from serving.published_model import servable_model
from serving.raw_values import RawValueEncoder
from serving.reader import ParamReader
from serving.request import (
    FeatureRule,
    RequestColumns,
    RequestValues,
    ScoreRequest,
    feature_rules,
)
from serving.row_plan import RowPlanner

log = logging.getLogger("embtab.serving")


class NotReadyError(ServingError):
    """No version of the model is loaded yet (nothing published, or Redis unreachable)."""

    status = 503


@dataclass(frozen=True)
class ScorerConfig:
    """`max_candidates`: per request; `cache_bytes`: the row cache's budget (0: no row is kept
    between batches, not even in the model's tables: every row is read from Redis); `warm_rows`: how
    many of the hottest cached rows a new version prefetches before it goes live here;
    `item_features_ttl_s`: how long item attributes read from the online store are reused."""

    model: str
    max_candidates: int = 1000
    cache_bytes: int = 256 * 2**20
    warm_rows: int = 200_000
    item_features_ttl_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_candidates < 1 or self.cache_bytes < 0 or self.warm_rows < 0:
            raise ServingError(
                "max_candidates must be >= 1, cache_bytes and warm_rows >= 0; got "
                f"{self.max_candidates}, {self.cache_bytes}, {self.warm_rows}"
            )


@dataclass
class Snapshot:
    """One version and dense revision, ready to score. `delta` is the last delta whose
    invalidations this server has applied. `resident[table][row]` says the model's scratch
    table holds the current value of that row (static tables only: id-keyed tables are
    renumbered per batch); deltas clear it, under `residency_lock`."""

    manifest: VersionManifest
    dense_revision: int
    delta: int
    model: Model
    planner: RowPlanner
    default_rows: dict[str, np.ndarray]
    cache: RowCache
    rules: dict[str, FeatureRule]
    schema: Schema
    user_column: str
    item_column: str
    online: OnlineFeatureStore | None = None
    item_features: ItemFeatureCache | None = None
    encoder: RawValueEncoder | None = None  # raw values -> ids, for a model with an artifact
    resident: dict[str, np.ndarray] = field(default_factory=dict)
    residency_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def publish_id(self) -> str:
        return self.manifest.publish_id


@dataclass(frozen=True)
class RequestScores:
    """One request's scores (click probabilities, in candidate order) and what produced them."""

    scores: np.ndarray
    version: int
    delta: int
    degraded: bool


@dataclass(frozen=True)
class Scores:
    """Scores of each request of a batch."""

    per_request: list[np.ndarray]
    version: int
    delta: int
    degraded: bool

    def split(self) -> list[RequestScores]:
        return [
            RequestScores(scores, self.version, self.delta, self.degraded)
            for scores in self.per_request
        ]


@dataclass
class RowCounts:
    """Where the rows of scored batches came from, since start: already in the scratch tables,
    the row cache, Redis, or the default rows."""

    resident: int = 0
    cached: int = 0
    fetched: int = 0
    defaulted: int = 0
    candidates: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class Scorer:
    def __init__(
        self,
        reader: ParamReader,
        config: ScorerConfig,
        health: RedisHealth | None = None,
        online: Callable[[Schema, Preprocessor | None], OnlineFeatureStore | None] | None = None,
    ) -> None:
        if reader.model != config.model:
            raise ServingError(f"reader is for {reader.model!r}, config for {config.model!r}")
        self.reader = reader
        self.config = config
        self.health = health or RedisHealth()
        self.online_store_for = online
        self.counts = RowCounts()
        self.unknown_ids: Counter[str] = Counter()  # per feature: raw ids no vocabulary holds
        self._snapshot: Snapshot | None = None
        self._refresh_lock = threading.Lock()
        # Why the served version's data is missing from Redis, and since when; None if it is not.
        self._missing: tuple[str, float] | None = None

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    @property
    def ready(self) -> bool:
        return self._snapshot is not None

    @property
    def data_missing(self) -> bool:
        """Whether the served version's data is missing from Redis (see `data_state`)."""
        return self._missing is not None

    @property
    def degraded(self) -> bool:
        """Answers are degraded: Redis is unreachable, or the served version's data is gone."""
        return not self.health.up or self._missing is not None

    def data_state(self) -> dict:
        """For /healthz: whether the served version's data is in Redis, and if not, why."""
        missing = self._missing
        if missing is None:
            return {"data": "ok"}
        reason, since = missing
        return {
            "data": "missing",
            "data_error": reason,
            "data_missing_for_s": round(time.time() - since, 3),
        }

    # -- versions (watcher thread) ---------------------------------------------------------------

    def refresh(self) -> bool:
        """Catch up with Redis: a new publish (another version number or publish id), deltas
        (cache invalidation), a new dense revision; True if anything changed. Raises
        RedisUnavailableError if Redis is down. A live version that cannot be read while one is
        served (Redis lost its data) keeps the snapshot and marks the data missing until a
        version can be read again."""
        with self._refresh_lock:
            try:
                changed = self._catch_up()
            except VersionNotFoundError as error:
                if self._snapshot is None:
                    raise
                self._lost(str(error))
                return False
            if self._missing is not None and self._snapshot is not None:
                log.warning(
                    "%s: Redis holds a servable version again (v%d); no longer degraded",
                    self.config.model,
                    self._snapshot.version,
                )
            self._missing = None
            return changed

    def _lost(self, reason: str) -> None:
        if self._missing is None:
            log.error(
                "%s: the data of the served version v%d is missing from Redis (%s); answering "
                "from what this server holds, degraded, until a version is published again",
                self.config.model,
                self._snapshot.version,
                reason,
            )
            self._missing = (reason, time.time())

    def _catch_up(self) -> bool:
        live = self.reader.live_version()
        current = self._snapshot
        if live is None:
            if current is None:
                return False  # nothing published yet
            raise VersionNotFoundError(
                f"Redis holds no live version of model {self.config.model!r}"
            )
        head = self.reader.head(live)
        if current is None or (current.version, current.publish_id) != (live, head.publish_id):
            self._snapshot = self._build(head, previous=current)
            log.info(
                "serving %s version %d (publish %s)",
                self.config.model,
                live,
                head.publish_id or "without id",
            )
            return True
        changed = False
        if head.delta > current.delta:
            self._apply_deltas(current, head.delta)
            changed = True
        if head.dense_revision != current.dense_revision:
            dense = self.reader.dense(live, head.dense_revision)
            self._snapshot = self._snapshot_of(
                current.manifest, dense, current.delta, current.cache, current
            )
            log.info("serving %s v%d dense revision %d", self.config.model, live, dense.revision)
            changed = True
        return changed

    def _apply_deltas(self, snapshot: Snapshot, last: int) -> None:
        """Drop the rows deltas changed from the cache and the scratch tables; everything if a
        delta's log is gone (it expired while this server was cut off)."""
        for delta in range(snapshot.delta + 1, last + 1):
            changed = self.reader.delta_log(snapshot.version, delta)
            with snapshot.residency_lock:
                if changed is None:
                    snapshot.cache.clear()
                    for resident in snapshot.resident.values():
                        resident[:] = False
                    break
                for table, ids in changed.items():
                    snapshot.cache.invalidate(table, ids)
                    resident = snapshot.resident.get(table)
                    if resident is not None:
                        resident[ids[(ids >= 0) & (ids < len(resident))]] = False
        snapshot.delta = last

    def _build(self, head: VersionHead, previous: Snapshot | None) -> Snapshot:
        version = head.version
        manifest = self.reader.manifest(version)
        if manifest.publish_id != head.publish_id:
            raise VersionNotFoundError(
                f"model {self.config.model!r} version {version}: its manifest and head are of "
                "different publishes (its data was lost and is being published again)"
            )
        if head.dense_revision < 0:
            raise VersionNotFoundError(
                f"model {self.config.model!r} version {version} has no dense blob yet"
            )
        dense = self.reader.dense(version, head.dense_revision)
        cache = RowCache(self.config.cache_bytes)
        snapshot = self._snapshot_of(manifest, dense, head.delta, cache, previous)
        if previous is not None:
            self._warm(snapshot, previous)
        return snapshot

    def _snapshot_of(
        self,
        manifest: VersionManifest,
        dense: DenseState,
        delta: int,
        cache: RowCache,
        previous: Snapshot | None,
    ) -> Snapshot:
        """A snapshot of the model as published; the online store and the item features held
        locally carry over from `previous` when the features are the same."""
        model = servable_model(manifest.model_manifest, dense.tensors)
        spec = model.spec
        published = {layout.name: layout for layout in manifest.tables}
        for table in model.embeddings.physical_tables():
            layout = published.get(table.name)
            if layout is None or layout.dim != table.dim:
                raise StoreError(
                    f"model {manifest.model!r} v{manifest.version}: physical table "
                    f"{table.name!r} (dim {table.dim}) is not published as the model needs it"
                )
        defaults = {
            name: dense.default_rows.get(name, np.zeros(layout.dim, np.float32))
            for name, layout in published.items()
        }
        schema = spec.schema
        encoder = self._encoder_of(manifest, schema, previous)
        preprocessing = None if encoder is None else encoder.preprocessing
        if (
            previous is not None
            and previous.schema == schema
            and _artifact_hash(previous.encoder) == _artifact_hash(encoder)
        ):
            online, item_features = previous.online, previous.item_features
        else:
            online = (
                None
                if self.online_store_for is None
                else self.online_store_for(schema, preprocessing)
            )
            item_features = None
            if online is not None and online.layout.item_features:
                item_features = ItemFeatureCache(
                    online,
                    [schema.feature(name) for name in online.layout.item_features],
                    ttl_s=self.config.item_features_ttl_s,
                )
        return Snapshot(
            manifest=manifest,
            dense_revision=dense.revision,
            encoder=encoder,
            delta=delta,
            model=model,
            planner=RowPlanner(model.embeddings, model.feature_columns()),
            default_rows=defaults,
            cache=cache,
            rules=feature_rules(
                schema, {table.name: table for table in spec.tables}, spec.feature_to_table
            ),
            schema=schema,
            user_column=schema.id_columns.get("user", ""),
            item_column=schema.id_columns.get("item", ""),
            online=online,
            item_features=item_features,
            resident={
                table.name: np.zeros(table.num_rows, dtype=bool)
                for table in model.embeddings.physical_tables()
                if table.name not in model.embeddings.self_managed and self.config.cache_bytes
            },
        )

    def _encoder_of(
        self, manifest: VersionManifest, schema: Schema, previous: Snapshot | None
    ) -> RawValueEncoder | None:
        """The raw-value encoder of the version's preprocessing artifact (published with it;
        kept from `previous` when the artifact is the same)."""
        recorded = manifest.model_manifest.get("preprocessing")
        if not recorded:
            return None
        if (
            previous is not None
            and previous.encoder is not None
            and previous.encoder.preprocessing.content_hash == recorded["content_hash"]
        ):
            return previous.encoder
        try:
            preprocessing = Preprocessor.from_files(self.reader.preprocessing(manifest.version))
        except DataError as error:
            raise StoreError(
                f"model {manifest.model!r} v{manifest.version}: its preprocessing artifact is "
                f"unusable: {error}"
            ) from error
        if preprocessing.content_hash != recorded["content_hash"]:
            raise StoreError(
                f"model {manifest.model!r} v{manifest.version}: the published preprocessing "
                f"artifact has content hash {preprocessing.content_hash}, the model was trained "
                f"with {recorded['content_hash']}"
            )
        return RawValueEncoder(
            preprocessing,
            schema.id_columns.get("user", ""),
            schema.id_columns.get("item", ""),
            self.unknown_ids,
        )

    def _warm(self, snapshot: Snapshot, previous: Snapshot) -> None:
        """Prefetch, from the new version, the rows that were hot in the previous one."""
        wanted = {}
        for layout in snapshot.manifest.tables:
            try:
                old = previous.manifest.table(layout.name)
            except StoreError:
                continue
            if (old.dim, old.keyed_by) == (layout.dim, layout.keyed_by):
                ids = previous.cache.hot_ids(layout.name, self.config.warm_rows)
                if len(ids):
                    wanted[layout.name] = np.sort(ids)
        if not wanted:
            return
        epochs = {table: snapshot.cache.epoch(table) for table in wanted}
        fetched = self.reader.fetch_rows(snapshot.manifest, wanted)
        for table, ids in wanted.items():
            rows = fetched[table]
            snapshot.cache.put(table, ids, rows.values, rows.found, epochs[table])

    # -- requests (event loop) -------------------------------------------------------------------

    def prepare(self, request: RequestValues | ScoreRequest) -> RequestColumns:
        """Check a request against the model and turn it into columns (no Redis involved). The
        service passes what `parse_request` gives; a ScoreRequest is taken as built in process."""
        if isinstance(request, ScoreRequest):
            request = RequestValues.of(request)
        check_model(request, self.config.model)
        return prepare_columns(request, self.preparation())

    def preparation(self) -> Preparation:
        """What checking a request against the served version takes (for serving.parsing)."""
        snapshot = self._snapshot
        if snapshot is None:
            raise NotReadyError(f"model {self.config.model!r} has no version loaded yet")
        return Preparation(
            snapshot.rules, snapshot.user_column, snapshot.item_column, snapshot.encoder
        )

    # -- batches (scoring thread) ----------------------------------------------------------------

    def score(self, batch: list[RequestColumns]) -> Scores:
        snapshot = self._snapshot
        if snapshot is None:
            raise NotReadyError(f"model {self.config.model!r} has no version loaded yet")
        sparse, dense = self._assemble(snapshot, batch)
        plan = snapshot.planner.plan(sparse)
        self._load_rows(snapshot, plan.needed, plan.local)
        columns: dict = {
            name: (column.values, column.lengths) for name, column in plan.columns.items()
        }
        columns.update(dense)
        inputs = batch_from_columns(columns, snapshot.schema, with_labels=False)
        with torch.inference_mode():
            probabilities = torch.sigmoid(snapshot.model(inputs.sparse, inputs.dense)).numpy()
        bounds = np.cumsum([0] + [request.num_candidates for request in batch])
        with self.counts.lock:
            self.counts.candidates += int(bounds[-1])
        return Scores(
            per_request=[probabilities[bounds[i] : bounds[i + 1]] for i in range(len(batch))],
            version=snapshot.version,
            delta=snapshot.delta,
            degraded=self.degraded,
        )

    def _assemble(
        self, snapshot: Snapshot, batch: list[RequestColumns]
    ) -> tuple[dict[str, Jagged], dict[str, np.ndarray]]:
        """Every feature of the schema for every candidate: request > online store > default."""
        counts = np.array([request.num_candidates for request in batch], dtype=np.int64)
        rows = int(counts.sum())
        user_ids = np.array([request.user_id for request in batch], dtype=np.int64)
        item_ids = np.concatenate([request.item_ids for request in batch])
        user_of_row = np.repeat(user_ids, counts)
        online = self._online_columns(snapshot, batch, counts)
        sparse: dict[str, Jagged] = {}
        dense: dict[str, np.ndarray] = {}
        for spec in snapshot.schema.features:
            name = spec.name
            if name == snapshot.user_column:
                known = np.repeat([request.user_known for request in batch], counts)
                sparse[name] = Jagged(user_of_row[known], known.astype(np.int64))
                continue
            if name == snapshot.item_column:
                known = np.concatenate([request.known_items() for request in batch])
                sparse[name] = Jagged(item_ids[known], known.astype(np.int64))
                continue
            if spec.kind == "dense":
                fallback = online.get(name)
                values = np.zeros(rows, np.float32) if fallback is None else fallback
                given = [request.dense.get(name) for request in batch]
                if any(entry is not None for entry in given):
                    request_values = np.concatenate(
                        [
                            g[0] if g is not None else np.zeros(r.num_candidates, np.float32)
                            for g, r in zip(given, batch, strict=True)
                        ]
                    )
                    mask = np.concatenate(
                        [
                            g[1] if g is not None else np.zeros(r.num_candidates, bool)
                            for g, r in zip(given, batch, strict=True)
                        ]
                    )
                    values = np.where(mask, request_values, values).astype(np.float32)
                dense[name] = values
                continue
            fallback = online.get(name)
            column = Jagged.empty(rows) if fallback is None else fallback
            given = [request.sparse.get(name) for request in batch]
            if any(entry is not None for entry in given):
                request_column = Jagged.concat(
                    [
                        g[0] if g is not None else Jagged.empty(r.num_candidates)
                        for g, r in zip(given, batch, strict=True)
                    ]
                )
                mask = np.concatenate(
                    [
                        g[1] if g is not None else np.zeros(r.num_candidates, bool)
                        for g, r in zip(given, batch, strict=True)
                    ]
                )
                column = request_column.where(mask, column)
            sparse[name] = column
        return sparse, dense

    def _online_columns(
        self, snapshot: Snapshot, batch: list[RequestColumns], counts: np.ndarray
    ) -> dict[str, Jagged | np.ndarray]:
        """Online user features (one round trip per batch) and item features (local, see
        `serving.item_features`) of every candidate row, looked up by raw id and encoded through
        the version's artifact: a Jagged column, or float32 values for a dense feature; unknown
        users and items give empty bags and zeros. With Redis down, only the item features held
        locally."""
        if snapshot.online is None:
            return {}
        specs = {spec.name: spec for spec in snapshot.schema.features}
        columns: dict[str, Jagged | np.ndarray] = {}
        position_of: dict[int | str | None, int] = {}
        user_of_request = [
            position_of.setdefault(request.raw_user_id, len(position_of)) for request in batch
        ]
        known = [user for user in position_of if user is not None]
        try:
            if snapshot.item_features is not None:
                items = [
                    item
                    for request in batch
                    for item in request.raw_item_ids or [None] * request.num_candidates
                ]
                columns.update(snapshot.item_features.columns(items, self.health.up))
            if not self.health.up:
                return columns
            users = snapshot.online.get_users(known)
        except OnlineStoreUnavailable as error:
            self.health.failed(error)
            return columns
        except OnlineFeatureError as error:
            log.warning("online features unusable, scoring without them: %s", error)
            return columns
        # Rows of `users` in order of `known`, then one empty row for a user without a raw id.
        row_of = {user: row for row, user in enumerate(known)}
        rows = np.array([row_of.get(user, len(known)) for user in position_of], np.int64)
        user_index = rows[np.repeat(user_of_request, counts)]
        preprocessing = snapshot.online.preprocessing
        for name in users.schema.names:
            spec = specs.get(name)
            if spec is None or name in (snapshot.user_column, snapshot.item_column):
                continue
            column = model_column(preprocessing, spec, users.column(name))
            if isinstance(column, np.ndarray):
                columns[name] = np.append(column, np.float32(0))[user_index]
            elif len(position_of) == 1 and known:  # as every request scored alone
                columns[name] = column.repeat(0, len(user_index))
            else:
                columns[name] = Jagged.concat([column, Jagged.empty(1)]).take(user_index)
        return columns

    def _load_rows(
        self, snapshot: Snapshot, needed: dict[str, np.ndarray], local: dict[str, np.ndarray]
    ) -> None:
        """Write every row the forward reads into the scratch tables: rows already resident
        there are skipped, the others come from the cache, then from Redis (one round trip per
        node for all misses), then the default rows."""
        manifest, cache = snapshot.manifest, snapshot.cache
        pending: dict[str, np.ndarray] = {}
        resident_count = 0
        for table, ids in needed.items():
            resident = snapshot.resident.get(table)
            if resident is not None:
                missing = ids[~resident[ids]]
                resident_count += len(ids) - len(missing)
                ids = missing
            if len(ids):
                pending[table] = ids
        epochs = {table: cache.epoch(table) for table in pending}
        found_rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        misses: dict[str, np.ndarray] = {}
        cached = 0
        for table, ids in pending.items():
            values, found, hit = cache.get(table, ids, manifest.table(table).dim)
            found_rows[table] = (values, found)
            cached += int(hit.sum())
            if not hit.all():
                misses[table] = np.flatnonzero(~hit)
        fetched_count = 0
        if misses and self.health.up and self._missing is None:
            wanted = {table: pending[table][positions] for table, positions in misses.items()}
            try:
                fetched = self.reader.fetch_rows(manifest, wanted)
            except RedisUnavailableError as error:
                self.health.failed(error)
            else:
                for table, positions in misses.items():
                    rows = fetched[table]
                    values, found = found_rows[table]
                    values[positions] = rows.values
                    found[positions] = rows.found
                    cache.put(table, wanted[table], rows.values, rows.found, epochs[table])
                    fetched_count += len(positions)
        defaulted = 0
        embeddings = snapshot.model.embeddings
        for table, ids in pending.items():
            values, found = found_rows[table]
            if not found.all():
                values[~found] = snapshot.default_rows[table]
                defaulted += int((~found).sum())
            targets = local.get(table, ids)
            embeddings.load_rows(table, torch.from_numpy(targets), torch.from_numpy(values))
        with snapshot.residency_lock:
            for table, ids in pending.items():
                resident = snapshot.resident.get(table)
                if resident is not None and cache.epoch(table) == epochs[table]:
                    resident[ids[found_rows[table][1]]] = True
        with self.counts.lock:
            self.counts.resident += resident_count
            self.counts.cached += cached
            self.counts.fetched += fetched_count
            self.counts.defaulted += defaulted


def _artifact_hash(encoder: RawValueEncoder | None) -> str | None:
    """The content hash of a version's artifact: what the online store's values are encoded
    with (None for a model without one)."""
    return None if encoder is None else encoder.preprocessing.content_hash
