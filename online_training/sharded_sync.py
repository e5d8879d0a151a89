"""Delta sync of a model sharded over ranks: every rank reports what changed, rank 0 publishes.

The rows a step changes are spread out: a static table's rows live on the ranks torchrec's plan
put them on, a collisionless table's ids on their owners. So a sync is collective. Each rank
reports the static rows its own lookups read and the collisionless ids it owns that were
touched or evicted; their union, the same on every rank, is the pending delta. Each rank then
cuts the pending rows it holds out of its local shards (whole rows, or a column slice of them)
and sends them to rank 0, which puts the rows together and pushes the delta with the one-process
store (`ParamPublisher.publish_delta`) and `ParamSync`'s retries. Only rank 0 talks to Redis; it
broadcasts the outcome, so every rank stands at the same version and delta, or raises the same
SyncError, and a push that failed keeps its pending rows on every rank for the next attempt.

A full publish (nothing live that this model may continue, or its version was collected) goes
through a sharded checkpoint: every rank saves its shards under `staging`, rank 0 exports them as
one ordinary checkpoint and publishes it, so `staging` must be a directory every rank can write
and rank 0 can read (any local directory when the ranks share a host).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel

from embedding_tables.collisionless import DEFAULT_ROW, resolve_capacity
from embedding_tables.idmap import EMPTY
from embedding_tables.sharded_collisionless import owner_of
from embedding_tables.sharding import torchrec_name
from models.sharded_checkpoint import (
    OWNED_PREFIX,
    export_checkpoint,
    local_regions,
    save_sharded,
)
from models.sharding_plan import table_key
from online_training.sync import ParamSync, SyncConfig, SyncError
from serving.errors import VersionNotFoundError
from serving.manifest import TableLayout
from serving.published_model import publish_checkpoint
from serving.publisher import ParamPublisher, PublishResult

log = logging.getLogger(__name__)

Result = TypeVar("Result")

# (physical table, ids, first column, values [len(ids), width]): part of some rows held here.
Piece = tuple[str, np.ndarray, int, np.ndarray]


class ShardedParamSync(ParamSync):
    """`ParamSync` for a sharded model; `attach`, `publish_full`, `collect` and `sync` are
    collective (each rank calls them, from its training thread, between steps)."""

    def __init__(
        self,
        publisher: ParamPublisher,
        dmp: DistributedModelParallel,
        config: SyncConfig,
        staging: Path,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(publisher, dmp.module, config, clock)
        self.dmp = dmp
        self.staging = Path(staging)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.embeddings = dmp.module.embeddings
        self.embeddings.track_touched = True
        self._physical = {torchrec_name(t.name): t for t in self.embeddings.physical_tables()}
        self._dims = {t.name: t.dim for t in self._physical.values()}
        self._dims.update({name: owned.config.dim for name, owned in self.embeddings.owned.items()})

    def _layouts(self) -> list[TableLayout]:
        """The physical tables as the one-process model publishes them."""
        static = [TableLayout(t.name, t.num_rows, t.dim, "row") for t in self._physical.values()]
        managed = [
            TableLayout(name, resolve_capacity(owned.config) or 0, owned.config.dim, "id")
            for name, owned in self.embeddings.owned.items()
        ]
        return static + managed

    def _full_publish(self) -> Callable[[], PublishResult]:
        """Every rank saves its shards; rank 0 will export them and publish the export."""
        shards = save_sharded(self.staging / "publish", self.dmp)

        def publish() -> PublishResult:
            plain = export_checkpoint(shards, self.staging / "publish.safetensors")
            return publish_checkpoint(
                self.publisher,
                str(plain),
                encoding=self.config.encoding,
                num_shards=self.config.num_shards,
            )

        return publish

    def _changes(self) -> list[tuple[str, tuple[np.ndarray, np.ndarray]]]:
        """Every rank's changes: the static rows its lookups read, the collisionless ids it owns
        that were touched or evicted."""
        local = [
            (name, (rows.numpy(), np.zeros(0, np.int64)))
            for name, rows in self.embeddings.take_touched_rows().items()
        ]
        for name, owned in self.embeddings.owned.items():
            table = owned.local
            rows = table.take_touched_rows()
            ids = table.ids_of_rows(rows[rows != DEFAULT_ROW]).numpy()
            local.append((name, (ids[ids != EMPTY], table.evicted_ids().numpy())))
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, local)
        return [change for part in everyone for change in part]

    def _values(
        self,
    ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
        """On rank 0, the pending rows as (ids, values) and the ids to delete, per table; on
        the other ranks, empty dicts (they send their parts)."""
        pieces: list[Piece] = []
        gone: dict[str, np.ndarray] = {}
        with torch.no_grad():
            for name, row, column, shard in self._local_shards():
                ids = self._rows.get(name)
                if ids is None:
                    continue
                held = ids[(ids >= row) & (ids < row + shard.shape[0])]
                if len(held):
                    values = shard[torch.from_numpy(held - row)].float().numpy()
                    pieces.append((name, held, column, values))
            for name, owned in self.embeddings.owned.items():
                ids = self._rows.get(name)
                if ids is None:
                    continue
                candidates = torch.from_numpy(ids)
                mine = candidates[owner_of(candidates, self.world_size) == self.rank]
                rows = owned.local.rows_of(mine)
                alive = rows != DEFAULT_ROW
                values = owned.local.weight[rows[alive]].float().numpy()
                pieces.append((name, mine[alive].numpy(), 0, values))
                gone[name] = mine[~alive].numpy()
        everyone: list[Any] = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object((pieces, gone), everyone, dst=0)
        if self.rank != 0:
            return {}, {}
        by_table: dict[str, list[Piece]] = {}
        deleted = dict(self._deleted)
        for part_pieces, part_gone in everyone:
            for piece in part_pieces:
                by_table.setdefault(piece[0], []).append(piece)
            for name, ids in part_gone.items():
                if len(ids):
                    deleted[name] = np.union1d(deleted.get(name, ids[:0]), ids)
        return {name: self._assemble(name, parts) for name, parts in by_table.items()}, deleted

    def _assemble(self, name: str, pieces: list[Piece]) -> tuple[np.ndarray, np.ndarray]:
        """Whole rows of a table from pieces of them; every value must be covered once."""
        ids = np.unique(np.concatenate([piece[1] for piece in pieces]))
        dim = self._dims[name]
        values = np.zeros((len(ids), dim), np.float32)
        covered = np.zeros(len(ids) * dim, np.int64)
        for _, held, column, part in pieces:
            where = np.searchsorted(ids, held)
            values[where, column : column + part.shape[1]] = part
            flat = (where[:, None] * dim + np.arange(column, column + part.shape[1])).ravel()
            np.add.at(covered, flat, 1)
        if not (covered == 1).all():
            raise SyncError(
                f"table {name!r}: the ranks' shards do not cover its changed rows exactly once"
            )
        return ids, values

    def _default_rows(self) -> dict[str, np.ndarray]:
        """On rank 0 (empty elsewhere): per table, the row served when its own cannot be had:
        the mean row of a static table, the owners' mean default row of a collisionless one."""
        sums = [
            (name, column, shard.double().sum(dim=0).numpy(), shard.shape[0])
            for name, _, column, shard in self._local_shards()
        ]
        managed = {
            name: owned.local.default_row_values().double().numpy()
            for name, owned in self.embeddings.owned.items()
        }
        everyone: list[Any] = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object((sums, managed), everyone, dst=0)
        if self.rank != 0:
            return {}
        totals = {name: np.zeros(dim) for name, dim in self._dims.items()}
        counts = {name: np.zeros(dim) for name, dim in self._dims.items()}
        for part_sums, part_managed in everyone:
            for name, column, total, rows in part_sums:
                totals[name][column : column + len(total)] += total
                counts[name][column : column + len(total)] += rows
            for name, row in part_managed.items():
                totals[name] += row
                counts[name] += 1
        return {
            name: (totals[name] / np.maximum(counts[name], 1)).astype(np.float32) for name in totals
        }

    def _dense_state(self) -> dict[str, torch.Tensor]:
        """On rank 0 (empty elsewhere: only rank 0 pushes, and every rank holds the same
        replicas), the dense blob's tensors: the state_dict without the tables, keyed as in
        the one-process model."""
        if self.rank != 0:
            return {}
        return {
            key: value.detach().cpu().contiguous().clone()
            for key, value in self.dmp.state_dict().items()
            if table_key(key) is None and not key.startswith(OWNED_PREFIX)
        }

    def _local_shards(self) -> list[tuple[str, int, int, torch.Tensor]]:
        """(physical table, first row, first column, rows) of every table shard held here."""
        shards = []
        for key, value in self.dmp.state_dict().items():
            name = table_key(key)
            if name is None:
                continue
            for offsets, tensor in local_regions(value):
                shards.append((self._physical[name].name, offsets[0], offsets[1], tensor))
        return shards

    def _drain(self) -> None:
        """Forget every rank's record of changes (a full publish or the live version covers
        them)."""
        self.embeddings.take_touched_rows()
        for owned in self.embeddings.owned.values():
            owned.local.take_touched_rows()
            owned.local.evicted_ids()

    def _at_store(self, action: Callable[[], Result]) -> Result:
        """`action`'s result, run on rank 0 and broadcast; its failure raised on every rank
        (VersionNotFoundError as such, anything else as SyncError on the other ranks)."""
        outcome: list[Any] = [None]
        error: BaseException | None = None
        if self.rank == 0:
            try:
                outcome[0] = ("ok", action())
            except VersionNotFoundError as gone:
                outcome[0], error = ("gone", str(gone)), gone
            except Exception as failure:  # every rank must learn of it, then it is raised
                outcome[0], error = ("failed", f"{type(failure).__name__}: {failure}"), failure
        dist.broadcast_object_list(outcome, src=0)
        kind, value = outcome[0]
        if kind == "ok":
            return value
        if error is not None:
            raise error
        if kind == "gone":
            raise VersionNotFoundError(value)
        raise SyncError(f"rank 0 could not publish: {value}")
