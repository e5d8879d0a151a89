"""The reading side of the parameter shards: live version, manifests, heads, dense revisions,
preprocessing artifacts, delta logs, and rows by id in one pipelined round trip per node."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors.numpy

from serving.dense_blob import DenseState, parse_dense_blob
from serving.errors import StoreError, VersionNotFoundError, redis_call
from serving.keys import ModelKeys, shard_of
from serving.manifest import VersionHead, VersionManifest
from serving.redis_nodes import RedisNodes
from serving.row_encoding import decode_ids, decode_values, encode_ids


@dataclass(frozen=True)
class FetchedRows:
    """Rows of one table as read: values [n, dim] float32 (zeros where absent), found [n]."""

    values: np.ndarray
    found: np.ndarray


class ParamReader:
    """The reading side: versions, manifests, dense revisions, rows by id, delta logs."""

    def __init__(self, nodes: RedisNodes, model: str, chunk_fields: int = 1000) -> None:
        self.nodes = nodes
        self.keys = ModelKeys(model)
        self.model = model
        self.chunk_fields = chunk_fields

    def live_version(self) -> int | None:
        with redis_call(f"read the live version of {self.model!r}"):
            raw = self.nodes.meta.get(self.keys.version)
        return None if raw is None else int(raw)

    def manifest(self, version: int) -> VersionManifest:
        with redis_call(f"read the manifest of {self.model!r} v{version}"):
            raw = self.nodes.meta.get(self.keys.manifest(version))
        if raw is None:
            raise VersionNotFoundError(f"model {self.model!r} has no version {version}")
        manifest = VersionManifest.from_json(raw)
        here = 0 if self.nodes.config.cluster else self.nodes.num_nodes
        if manifest.num_nodes != here:
            published = (
                "a Redis Cluster" if manifest.num_nodes == 0 else f"{manifest.num_nodes} URL(s)"
            )
            reading = "a Redis Cluster" if here == 0 else f"{here} URL(s)"
            raise StoreError(
                f"model {self.model!r} v{version} was published over {published}; this reader "
                f"has {reading}: give it the publisher's Redis URLs, in the same order"
            )
        return manifest

    def head(self, version: int) -> VersionHead:
        with redis_call(f"read the head of {self.model!r} v{version}"):
            raw = self.nodes.meta.hgetall(self.keys.head(version))
        if b"dense" not in raw:  # gone, or a head a lost delta re-created
            raise VersionNotFoundError(f"model {self.model!r} has no version {version}")
        return VersionHead(
            version, int(raw[b"dense"]), int(raw[b"delta"]), raw.get(b"id", b"").decode()
        )

    def dense(self, version: int, revision: int) -> DenseState:
        with redis_call(f"read dense revision {revision} of {self.model!r} v{version}"):
            blob = self.nodes.meta.get(self.keys.dense(version, revision))
        if blob is None:
            raise VersionNotFoundError(
                f"model {self.model!r} v{version} has no dense revision {revision} (not "
                "committed yet, or expired after its grace period)"
            )
        return parse_dense_blob(version, revision, blob)

    def preprocessing(self, version: int) -> dict[str, bytes]:
        """The files of the version's preprocessing artifact ({} for a model without one)."""
        with redis_call(f"read the preprocessing artifact of {self.model!r} v{version}"):
            raw = self.nodes.meta.hgetall(self.keys.preprocessing(version))
        return {name.decode(): blob for name, blob in raw.items()}

    def delta_log(self, version: int, delta: int) -> dict[str, np.ndarray] | None:
        """Row ids delta `delta` changed, by table; None if the log is gone (expired)."""
        with redis_call(f"read delta {delta} of {self.model!r} v{version}"):
            blob = self.nodes.meta.get(self.keys.delta_log(version, delta))
        if blob is None:
            return None
        return dict(safetensors.numpy.load(blob)) if blob else {}

    def fetch_rows(
        self, manifest: VersionManifest, wanted: Mapping[str, np.ndarray]
    ) -> dict[str, FetchedRows]:
        """Rows of `wanted[table]` ids: one pipeline per node (HMGET chunks), one round trip."""
        pipes: dict[int, Any] = {}
        plan: list[tuple[str, np.ndarray, int, int]] = []  # table, positions, node, commands
        for table, ids in wanted.items():
            if not len(ids):
                continue
            ids = np.asarray(ids, dtype=np.int64)
            shards = shard_of(ids, manifest.num_shards)
            for shard in np.unique(shards):
                positions = np.flatnonzero(shards == shard)
                node = self.nodes.node_of_shard(int(shard))
                pipe = pipes.get(node) or pipes.setdefault(node, self.nodes.pipeline(node))
                key = self.keys.rows(manifest.version, table, int(shard))
                fields = encode_ids(ids[positions])
                commands = 0
                for start in range(0, len(fields), self.chunk_fields):
                    pipe.execute_command("HMGET", key, *fields[start : start + self.chunk_fields])
                    commands += 1
                plan.append((table, positions, node, commands))
        with redis_call(f"fetch rows of {self.model!r} v{manifest.version}"):
            answers = self.nodes.execute(pipes)
        cursors = dict.fromkeys(answers, 0)
        gathered: dict[str, list[tuple[np.ndarray, list]]] = {}
        for table, positions, node, commands in plan:
            start = cursors[node]
            values = [value for reply in answers[node][start : start + commands] for value in reply]
            cursors[node] = start + commands
            gathered.setdefault(table, []).append((positions, values))
        fetched = {}
        for table, ids in wanted.items():
            layout = manifest.table(table)
            values = np.zeros((len(ids), layout.dim), dtype=np.float32)
            found = np.zeros(len(ids), dtype=bool)
            for positions, raw in gathered.get(table, []):
                rows, present = decode_values(raw, manifest.encoding, layout.dim)
                values[positions] = rows
                found[positions] = present
            fetched[table] = FetchedRows(values, found)
        return fetched

    def scan_table(
        self, manifest: VersionManifest, table: str, count: int = 1000
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every (id, row) of a table, sorted by id (HSCAN over its shards): for checks and
        warm starts, not for the serving path."""
        layout = manifest.table(table)
        all_ids, all_rows = [], []
        with redis_call(f"scan {table!r} of {self.model!r} v{manifest.version}"):
            for shard in range(manifest.num_shards):
                client = self.nodes.clients[self.nodes.node_of_shard(shard)]
                key = self.keys.rows(manifest.version, table, shard)
                fields, values = [], []
                for field_bytes, value in client.hscan_iter(key, count=count):
                    fields.append(field_bytes)
                    values.append(value)
                if fields:
                    all_ids.append(decode_ids(fields))
                    all_rows.append(decode_values(values, manifest.encoding, layout.dim)[0])
        if not all_ids:
            return np.zeros(0, np.int64), np.zeros((0, layout.dim), np.float32)
        ids, rows = np.concatenate(all_ids), np.concatenate(all_rows)
        order = np.argsort(ids)
        return ids[order], rows[order]
