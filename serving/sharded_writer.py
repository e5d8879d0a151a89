"""Writing rows to Redis shards: ids grouped by shard and node, sent as pipelined HSET/HDEL
chunks (in MULTI/EXEC transactions where the caller asks for them)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from serving.keys import ModelKeys, shard_of
from serving.manifest import VersionManifest
from serving.redis_nodes import RedisNodes
from serving.row_encoding import encode_ids


class ShardedWriter:
    """Groups rows by shard and node and writes them as pipelined HSET/HDEL chunks."""

    def __init__(
        self, nodes: RedisNodes, keys: ModelKeys, chunk_fields: int, batch_rows: int
    ) -> None:
        self.nodes = nodes
        self.keys = keys
        self.chunk_fields = chunk_fields  # fields per HSET / HDEL command
        self.batch_rows = batch_rows  # rows per pipelined round trip of `write`

    def _by_shard(self, ids: np.ndarray, num_shards: int) -> Iterator[tuple[int, np.ndarray]]:
        shards = shard_of(ids, num_shards)
        order = np.argsort(shards, kind="stable")
        sorted_shards = shards[order]
        starts = np.flatnonzero(np.r_[True, sorted_shards[1:] != sorted_shards[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for start, end in zip(starts, ends, strict=True):
            yield int(sorted_shards[start]), order[start:end]

    def write(
        self, manifest: VersionManifest, table: str, ids: np.ndarray, encoded: np.ndarray
    ) -> None:
        """Write rows in pipelined batches of `batch_rows` (each batch as it is sent)."""
        for begin in range(0, len(ids), self.batch_rows):
            pipes: dict[int, Any] = {}
            end = begin + self.batch_rows
            self.queue_write(pipes, manifest, table, ids[begin:end], encoded[begin:end])
            self.nodes.execute(pipes)

    def queue_write(
        self,
        pipes: dict[int, Any],
        manifest: VersionManifest,
        table: str,
        ids: np.ndarray,
        encoded: np.ndarray,
        transaction: bool = False,
    ) -> None:
        """Add HSETs of rows to the per-node pipelines in `pipes` (made as needed)."""
        chunk = self.chunk_fields
        for shard, positions in self._by_shard(ids, manifest.num_shards):
            pipe = self._pipe(pipes, self.nodes.node_of_shard(shard), transaction)
            key = self.keys.rows(manifest.version, table, shard)
            fields = encode_ids(ids[positions])
            values = encoded[positions]
            for start in range(0, len(fields), chunk):
                arguments: list[bytes] = []
                for field_bytes, value in zip(
                    fields[start : start + chunk], values[start : start + chunk], strict=True
                ):
                    arguments += (field_bytes, value.tobytes())
                pipe.execute_command("HSET", key, *arguments)

    def queue_delete(
        self,
        pipes: dict[int, Any],
        manifest: VersionManifest,
        table: str,
        ids: np.ndarray,
        transaction: bool = False,
    ) -> None:
        """Add HDELs of ids to the per-node pipelines in `pipes` (made as needed)."""
        chunk = self.chunk_fields
        for shard, positions in self._by_shard(ids, manifest.num_shards):
            pipe = self._pipe(pipes, self.nodes.node_of_shard(shard), transaction)
            key = self.keys.rows(manifest.version, table, shard)
            fields = encode_ids(ids[positions])
            for start in range(0, len(fields), chunk):
                pipe.execute_command("HDEL", key, *fields[start : start + chunk])

    def _pipe(self, pipes: dict[int, Any], node: int, transaction: bool) -> Any:
        if node not in pipes:
            pipes[node] = self.nodes.pipeline(node, transaction=transaction)
        return pipes[node]
