"""Publish a model's embedding rows and dense parameters to Redis shards (`serving.reader`
reads them back).

What is published is each table's *physical* rows (a qr table's small tables, a hash table's
hashed rows, a unified group's shared table), keyed by row id; a collisionless table is keyed by
raw id, so its Redis hashes are its id map. The dense parameters, GraphHash maps and any other
mapping state go into one safetensors blob per dense revision. Key layout: `serving.keys`.

Versions. A full publish takes a new version number, writes its manifest, every row and the dense
blob into that version's namespace, and only then flips `embtab:{m}:version` (one MULTI) and
tells servers on the model's pub/sub channel. Until the flip nothing a server reads changes, so a
publisher killed halfway leaves the live version untouched; its half-written namespace is
registered as `writing` and `collect_garbage` deletes it once its heartbeat is `stale_after_s`
old. The retired version's keys expire `grace_s` after the flip, so servers that have not yet
switched keep reading whole rows.

Deltas (touched rows, deleted ids, optionally new dense parameters) are written in place into
the live namespace by one writer per model (the streaming sync): the delta number is reserved,
the changed row ids are logged (so every server can invalidate its cache, even one that missed
the pub/sub message), then the rows, deletions and head move go to each node as one MULTI/EXEC
transaction. Redis runs a transaction whole or, if its writer dies before EXEC arrives, not at
all, so a writer killed mid-delta leaves no row of it readable. The meta node's transaction
also writes the dense blob and moves the head, and runs last: with one node a delta goes live
at once or not at all; with several, a writer that dies between two nodes' EXECs leaves the
earlier nodes' rows ahead of the head until the next delta rewrites them. (In a Redis Cluster,
where shards are in different slots, delta rows are written in plain pipelines.) A delta is
what one sync interval touched, so a transaction stays small. A dense revision is a whole blob
under its own key, so a reader never mixes two dense revisions.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import safetensors.numpy
import torch

from serving.dense_blob import DenseState, dense_blob, float_rows, parse_dense_blob
from serving.errors import PublishError, VersionNotFoundError, redis_call
from serving.keys import ModelKeys
from serving.manifest import TableLayout, VersionManifest
from serving.redis_nodes import RedisNodes
from serving.row_encoding import check_encoding, encode_rows
from serving.sharded_writer import ShardedWriter

# Both delta scripts first check that the head still belongs to the publish the delta extends
# (ARGV[1]: its publish id), and return GONE when it does not (lost, or re-created by another
# publish under the same number).
GONE = -3
_SAME_PUBLISH = """
local head = redis.call('HMGET', KEYS[1], 'dense', 'id')
if not head[1] or (head[2] or '') ~= ARGV[1] then return -3 end
"""
_RESERVE_DELTA = _SAME_PUBLISH + "return redis.call('HINCRBY', KEYS[1], 'delta_seq', 1)\n"
# The head moves to a delta only forward: a late commit of an older delta leaves it alone.
_COMMIT_DELTA = (
    _SAME_PUBLISH
    + """
local delta = tonumber(redis.call('HGET', KEYS[1], 'delta') or '0')
if tonumber(ARGV[2]) > delta then redis.call('HSET', KEYS[1], 'delta', ARGV[2]) end
if ARGV[3] ~= '' then
  local dense = tonumber(redis.call('HGET', KEYS[1], 'dense') or '-1')
  if tonumber(ARGV[3]) > dense then
    redis.call('HSET', KEYS[1], 'dense', ARGV[3])
    return dense
  end
end
return -2
"""
)


@dataclass(frozen=True)
class PublishResult:
    model: str
    version: int
    publish_id: str
    previous_version: int | None
    rows_written: dict[str, int]
    dense_bytes: int
    seconds: float


@dataclass(frozen=True)
class DeltaResult:
    model: str
    version: int
    publish_id: str
    delta: int
    rows_written: dict[str, int]
    ids_deleted: dict[str, int]
    dense_revision: int | None


@dataclass(frozen=True)
class StoreOptions:
    """How a publisher batches writes and how long old state is kept.

    `chunk_fields`: fields per HSET/HMGET command; `batch_rows`: rows per pipelined round trip;
    `grace_s`: how long a retired version (or dense revision) stays readable after a flip;
    `stale_after_s`: how old a `writing` namespace's heartbeat must be before it counts as
    abandoned; `delta_log_ttl_s`: how long delta logs are kept for servers to catch up.
    """

    chunk_fields: int = 1000
    batch_rows: int = 32768
    grace_s: float = 60.0
    stale_after_s: float = 600.0
    delta_log_ttl_s: float = 3600.0
    heartbeat_s: float = 1.0

    def __post_init__(self) -> None:
        if self.chunk_fields < 1 or self.batch_rows < 1:
            raise PublishError("chunk_fields and batch_rows must be >= 1")
        if min(self.grace_s, self.stale_after_s, self.delta_log_ttl_s) <= 0:
            raise PublishError("grace_s, stale_after_s and delta_log_ttl_s must be > 0")


def _as_ids(ids: Any) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise PublishError(f"row ids must be integers, got dtype {ids.dtype}")
    return ids.astype(np.int64, copy=False).reshape(-1)


def _check_rows(layout: TableLayout, ids: np.ndarray, rows: np.ndarray) -> None:
    if rows.ndim != 2 or rows.shape != (len(ids), layout.dim):
        raise PublishError(
            f"table {layout.name!r}: rows must be [{len(ids)}, {layout.dim}] for {len(ids)} ids, "
            f"got {list(rows.shape)}"
        )
    if layout.keyed_by == "row" and len(ids) and (ids.min() < 0 or ids.max() >= layout.rows):
        raise PublishError(
            f"table {layout.name!r}: row ids must be in [0, {layout.rows}), got "
            f"[{int(ids.min())}, {int(ids.max())}]"
        )


class FullPublish:
    """One full publish in progress: `write_rows` as often as needed, then `commit` (or nothing:
    an uncommitted namespace never goes live and is collected once stale)."""

    def __init__(self, publisher: ParamPublisher, manifest: VersionManifest) -> None:
        self._publisher = publisher
        self.manifest = manifest
        self.rows_written = dict.fromkeys((t.name for t in manifest.tables), 0)
        self._last_heartbeat = time.time()
        self._started = time.monotonic()
        self._done = False

    @property
    def version(self) -> int:
        return self.manifest.version

    def write_rows(self, table: str, ids: Any, rows: Any) -> None:
        if self._done:
            raise PublishError(f"version {self.version} is already committed")
        layout = self.manifest.table(table)
        ids, rows = _as_ids(ids), float_rows(rows)
        _check_rows(layout, ids, rows)
        encoded = encode_rows(rows, self.manifest.encoding)
        with redis_call(f"publish {self.manifest.model!r} v{self.version}"):
            self._publisher._writer.write(self.manifest, table, ids, encoded)
            self.rows_written[table] += len(ids)
            if time.time() - self._last_heartbeat >= self._publisher.options.heartbeat_s:
                self._publisher._mark(self.version, "writing")
                self._last_heartbeat = time.time()

    def commit(
        self,
        dense: Mapping[str, torch.Tensor],
        default_rows: Mapping[str, Any] | None = None,
    ) -> PublishResult:
        """Write the dense blob, then flip the live version to this one and tell servers."""
        if self._done:
            raise PublishError(f"version {self.version} is already committed")
        defaults = dict(default_rows or {})
        for table, row in defaults.items():
            layout = self.manifest.table(table)
            if float_rows(row).size != layout.dim:
                raise PublishError(
                    f"table {table!r}: its default row must have {layout.dim} values"
                )
        blob = dense_blob(dense, defaults)
        publisher = self._publisher
        keys = publisher.keys
        final = VersionManifest(**{**asdict(self.manifest), "rows_written": self.rows_written})
        final = VersionManifest.from_json(final.to_json())
        with redis_call(f"commit {self.manifest.model!r} v{self.version}"):
            meta = publisher.nodes.meta
            meta.set(keys.dense(self.version, 0), blob)
            meta.hset(keys.head(self.version), "dense", 0)
            meta.set(keys.manifest(self.version), final.to_json())
            previous = publisher.live_version()
            now = time.time()
            flip = meta.pipeline(transaction=True)
            flip.set(keys.version, self.version)
            flip.hset(keys.namespaces, self.version, json.dumps({"state": "live", "at": now}))
            if previous is not None and previous != self.version:
                flip.hset(keys.namespaces, previous, json.dumps({"state": "retired", "at": now}))
            flip.execute()
            self._done = True
            if previous is not None and previous != self.version:
                publisher._expire_namespace(previous, publisher.options.grace_s)
            publisher._announce({"kind": "version", "version": self.version})
        return PublishResult(
            model=self.manifest.model,
            version=self.version,
            publish_id=final.publish_id,
            previous_version=previous,
            rows_written=dict(self.rows_written),
            dense_bytes=len(blob),
            seconds=time.monotonic() - self._started,
        )


class ParamPublisher:
    """The writing side: full publishes, deltas, and collection of old namespaces."""

    def __init__(self, nodes: RedisNodes, model: str, options: StoreOptions | None = None) -> None:
        self.nodes = nodes
        self.keys = ModelKeys(model)
        self.model = model
        self.options = options or StoreOptions()
        self._writer = ShardedWriter(
            nodes, self.keys, self.options.chunk_fields, self.options.batch_rows
        )
        self._reserve_delta = nodes.meta.register_script(_RESERVE_DELTA)
        self._commit_delta = nodes.meta.register_script(_COMMIT_DELTA)
        self._manifests: dict[int, VersionManifest] = {}

    def live_version(self) -> int | None:
        with redis_call(f"read the live version of {self.model!r}"):
            raw = self.nodes.meta.get(self.keys.version)
        return None if raw is None else int(raw)

    def begin(
        self,
        tables: Sequence[TableLayout],
        *,
        encoding: str = "fp32",
        num_shards: int | None = None,
        model_manifest: Mapping[str, Any] | None = None,
        preprocessing: Mapping[str, bytes] | None = None,
    ) -> FullPublish:
        """Reserve a new version, register it as `writing` and write its manifest (and the
        preprocessing artifact's files, which belong to this version and no other)."""
        check_encoding(encoding)
        names = [table.name for table in tables]
        if len(set(names)) != len(names):
            raise PublishError(f"duplicate physical table names: {sorted(names)}")
        shards = num_shards or max(1, self.nodes.num_nodes)
        if shards < 1:
            raise PublishError(f"num_shards must be >= 1, got {shards}")
        with redis_call(f"begin a publish of {self.model!r}"):
            meta = self.nodes.meta
            version = int(meta.incr(self.keys.next_version))
            publish_id = uuid.uuid4().hex
            manifest = VersionManifest(
                model=self.model,
                version=version,
                encoding=encoding,
                num_shards=shards,
                num_nodes=0 if self.nodes.config.cluster else self.nodes.num_nodes,
                tables=tuple(tables),
                model_manifest=dict(model_manifest or {}),
                created_at=time.time(),
                publish_id=publish_id,
            )
            start = meta.pipeline(transaction=True)
            start.set(self.keys.manifest(version), manifest.to_json())
            start.hset(
                self.keys.head(version),
                mapping={"id": publish_id, "dense": -1, "delta": 0, "delta_seq": 0},
            )
            if preprocessing:
                start.hset(self.keys.preprocessing(version), mapping=dict(preprocessing))
            start.hset(
                self.keys.namespaces, version, json.dumps({"state": "writing", "at": time.time()})
            )
            start.execute()
        self._manifests[version] = manifest
        return FullPublish(self, manifest)

    def publish(
        self,
        tables: Mapping[TableLayout, Iterable[tuple[Any, Any]]],
        dense: Mapping[str, torch.Tensor],
        *,
        default_rows: Mapping[str, Any] | None = None,
        encoding: str = "fp32",
        num_shards: int | None = None,
        model_manifest: Mapping[str, Any] | None = None,
    ) -> PublishResult:
        """A whole full publish: every table's (ids, rows) chunks, then the dense blob, the flip."""
        publish = self.begin(
            list(tables), encoding=encoding, num_shards=num_shards, model_manifest=model_manifest
        )
        for layout, chunks in tables.items():
            for ids, rows in chunks:
                publish.write_rows(layout.name, ids, rows)
        result = publish.commit(dense, default_rows)
        self.collect_garbage()
        return result

    def manifest(self, version: int) -> VersionManifest:
        if version not in self._manifests:
            with redis_call(f"read the manifest of {self.model!r} v{version}"):
                raw = self.nodes.meta.get(self.keys.manifest(version))
            if raw is None:
                raise VersionNotFoundError(f"model {self.model!r} has no version {version}")
            self._manifests[version] = VersionManifest.from_json(raw)
        return self._manifests[version]

    def publish_delta(
        self,
        rows: Mapping[str, tuple[Any, Any]] | None = None,
        deleted: Mapping[str, Any] | None = None,
        dense: Mapping[str, torch.Tensor] | None = None,
        *,
        default_rows: Mapping[str, Any] | None = None,
        version: int | None = None,
        publish_id: str | None = None,
    ) -> DeltaResult:
        """Apply touched rows (`{table: (ids, rows)}`), deleted ids (`{table: ids}`) and, if
        given, new dense parameters and default rows to the live version (or `version`) in
        place. New dense parameters or default rows make a new dense revision: the whole blob,
        with the default rows not given carried over from the current revision.

        `publish_id` names the publish the delta extends (by default, whichever holds the
        version now): if that version is gone, or is another publish, VersionNotFoundError is
        raised and nothing is committed."""
        rows, deleted = dict(rows or {}), dict(deleted or {})
        target = self.live_version() if version is None else version
        if target is None:
            raise VersionNotFoundError(
                f"model {self.model!r} has no live version to apply a delta to; publish it first"
            )
        manifest = self.manifest(target)
        if publish_id is not None and manifest.publish_id != publish_id:
            self._manifests.pop(target, None)  # the manifest held may be of a lost publish
            manifest = self.manifest(target)
        expected = manifest.publish_id if publish_id is None else publish_id
        if manifest.publish_id != expected:
            raise VersionNotFoundError(self._gone(target, expected))
        prepared = {}
        for table, (ids, values) in rows.items():
            layout = manifest.table(table)
            ids, values = _as_ids(ids), float_rows(values)
            _check_rows(layout, ids, values)
            prepared[table] = (ids, encode_rows(values, manifest.encoding))
        removed = {table: _as_ids(ids) for table, ids in deleted.items()}
        for table in removed:
            manifest.table(table)
        for table, row in (default_rows or {}).items():
            if float_rows(row).size != manifest.table(table).dim:
                raise PublishError(
                    f"table {table!r}: its default row must have {manifest.table(table).dim} values"
                )
        changed = {}
        for table in set(prepared) | set(removed):
            parts = [removed.get(table, np.zeros(0, np.int64))]
            if table in prepared:
                parts.append(prepared[table][0])
            changed[table] = np.unique(np.concatenate(parts))
        meta = self.nodes.meta
        # Shards of a Redis Cluster are in different slots: no transaction can span them.
        atomic = not self.nodes.config.cluster
        with redis_call(f"apply a delta to {self.model!r} v{target}"):
            delta = int(self._reserve_delta(keys=[self.keys.head(target)], args=[expected]))
            if delta == GONE:
                self._manifests.pop(target, None)
                raise VersionNotFoundError(self._gone(target, expected))
            meta.set(
                self.keys.delta_log(target, delta),
                safetensors.numpy.save(changed) if changed else b"",
                px=int(self.options.delta_log_ttl_s * 1000),
            )
            blob = None
            if dense is not None or default_rows:
                current = self._dense_now(target)
                tensors = current.tensors if dense is None else dense
                defaults = {**current.default_rows, **(default_rows or {})}
                blob = dense_blob(tensors, defaults)
            pipes: dict[int, Any] = {}
            for table, (ids, encoded) in prepared.items():
                self._writer.queue_write(pipes, manifest, table, ids, encoded, atomic)
            for table, ids in removed.items():
                self._writer.queue_delete(pipes, manifest, table, ids, atomic)
            head = pipes.pop(0, None) or self.nodes.pipeline(0, transaction=atomic)
            self.nodes.execute(pipes)
            if blob is not None:
                head.set(self.keys.dense(target, delta), blob)
            dense_revision = None if blob is None else delta
            commit = {
                "keys": [self.keys.head(target)],
                "args": [expected, delta, "" if dense_revision is None else dense_revision],
            }
            if atomic:
                self._commit_delta(**commit, client=head)
                replaced = int(head.execute()[-1])
            else:  # a cluster pipeline cannot carry a script
                head.execute()
                replaced = int(self._commit_delta(**commit))
            if replaced == GONE:
                self._manifests.pop(target, None)
                raise VersionNotFoundError(self._gone(target, expected))
            if replaced >= 0:
                meta.pexpire(self.keys.dense(target, replaced), int(self.options.grace_s * 1000))
            self._announce(
                {"kind": "delta", "version": target, "delta": delta, "dense": dense_revision}
            )
        return DeltaResult(
            model=self.model,
            version=target,
            publish_id=expected,
            delta=delta,
            rows_written={table: len(ids) for table, (ids, _) in prepared.items()},
            ids_deleted={table: len(ids) for table, ids in removed.items()},
            dense_revision=dense_revision,
        )

    def _gone(self, version: int, publish_id: str) -> str:
        return (
            f"model {self.model!r} v{version} (publish {publish_id or 'without id'}) is gone from "
            "Redis: its data was lost (flushed, or a restart without persistence) or collected; "
            "publish the model in full again"
        )

    def _dense_now(self, version: int) -> DenseState:
        meta = self.nodes.meta
        revision = int(meta.hget(self.keys.head(version), "dense") or -1)
        blob = meta.get(self.keys.dense(version, revision))
        if blob is None:
            raise VersionNotFoundError(
                f"model {self.model!r} v{version} has no dense revision {revision} to build on"
            )
        return parse_dense_blob(version, revision, blob)

    def collect_garbage(self, now: float | None = None) -> list[int]:
        """Delete namespaces that are abandoned (`writing` with a stale heartbeat) or retired for
        longer than the grace period; never the live one. Returns the versions deleted."""
        now = time.time() if now is None else now
        with redis_call(f"collect old namespaces of {self.model!r}"):
            live = self.live_version()
            entries = self.nodes.meta.hgetall(self.keys.namespaces)
            deleted = []
            for raw_version, raw_info in entries.items():
                version = int(raw_version)
                if version == live:
                    continue
                info = json.loads(raw_info)
                age = now - float(info.get("at", 0.0))
                limit = (
                    self.options.stale_after_s
                    if info.get("state") == "writing"
                    else self.options.grace_s
                )
                if age >= limit:
                    self._delete_namespace(version)
                    deleted.append(version)
        return sorted(deleted)

    def _namespace_keys(self, version: int) -> tuple[list[str], dict[int, list[str]]]:
        """(meta keys, row keys by node) of a version; empty if its manifest is gone."""
        meta = self.nodes.meta
        raw = meta.get(self.keys.manifest(version))
        if raw is None:
            return [], {}
        manifest = VersionManifest.from_json(raw)
        last = int(meta.hget(self.keys.head(version), "delta_seq") or 0)
        meta_keys = [
            self.keys.manifest(version),
            self.keys.head(version),
            self.keys.preprocessing(version),
        ]
        for revision in range(last + 1):
            meta_keys += [
                self.keys.dense(version, revision),
                self.keys.delta_log(version, revision),
            ]
        rows: dict[int, list[str]] = {}
        for table in manifest.tables:
            for shard in range(manifest.num_shards):
                node = self.nodes.node_of_shard(shard)
                rows.setdefault(node, []).append(self.keys.rows(version, table.name, shard))
        return meta_keys, rows

    def _delete_namespace(self, version: int) -> None:
        meta_keys, rows = self._namespace_keys(version)
        pipes = {node: self.nodes.pipeline(node) for node in rows}
        for node, keys in rows.items():
            for key in keys:
                pipes[node].unlink(key)
        self.nodes.execute(pipes)
        cleanup = self.nodes.meta.pipeline(transaction=False)
        for key in meta_keys:
            cleanup.unlink(key)
        cleanup.hdel(self.keys.namespaces, version)
        cleanup.execute()
        self._manifests.pop(version, None)

    def _expire_namespace(self, version: int, seconds: float) -> None:
        meta_keys, rows = self._namespace_keys(version)
        milliseconds = max(1, int(seconds * 1000))
        pipes = {node: self.nodes.pipeline(node) for node in rows}
        for node, keys in rows.items():
            for key in keys:
                pipes[node].pexpire(key, milliseconds)
        self.nodes.execute(pipes)
        expire = self.nodes.meta.pipeline(transaction=False)
        for key in meta_keys:
            expire.pexpire(key, milliseconds)
        expire.execute()

    def _mark(self, version: int, state: str) -> None:
        self.nodes.meta.hset(
            self.keys.namespaces, version, json.dumps({"state": state, "at": time.time()})
        )

    def _announce(self, message: Mapping[str, Any]) -> None:
        self.nodes.meta.publish(self.keys.events, json.dumps({"model": self.model, **message}))
