"""A collisionless table across ranks: every id owned by one rank, chosen by hash.

Each rank holds a `CollisionlessTable` for the ids it owns (`owner_of`: a hash of the id mod the
world size, row-wise sharding by hash). A lookup sends each id to its owner (all-to-all), the
owner counts, expires, admits and evicts as the one-process table does, for its ids only, and
sends the rows back; the gradients take the way back in backward, and the owner's fused
row-wise Adagrad applies them (divided by the world size: every rank's loss is the mean over its
slice of the global batch). Admission sees every occurrence of an id in a step, whichever rank
it came from, so `min_count` and the TTL behave as on one process; capacity is split evenly
between owners, so eviction is per owner (LRU/LFU among the ids of one rank).

What one process shares, N owners have N of: the default row (read by ids not admitted yet) is
trained per owner. Checkpoints are per owner (`save_owned`), as entries (id, count, last seen,
row, accumulator, or no row while pending), so `load_owned` restores them onto any number of
ranks: each rank keeps the entries it owns under the new world size; the default rows of the
old owners are averaged. Count-min-sketch admission cannot be split by id and is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from embedding_tables.collisionless import (
    CHECKPOINT_VERSION,
    DEFAULT_ROW,
    STAT_NAMES,
    CheckpointError,
    CollisionlessTable,
    resolve_capacity,
)
from embedding_tables.config import TableConfig
from embedding_tables.errors import ConfigError
from embedding_tables.hashing import bucket
from embedding_tables.idmap import EMPTY
from embedding_tables.optimizer import SparseOptimizerConfig

# The owner hash uses a seed of its own, so that owners are independent of the map's hashing.
OWNER_SEED = 0x0C0FFEE
ENTRY_KEYS = ("ids", "count", "last_seen_us", "has_row", "rows", "momentum")


def owner_of(ids: torch.Tensor, world_size: int) -> torch.Tensor:
    """The rank that owns each id."""
    return bucket(ids, OWNER_SEED, world_size)


class OwnedCollisionlessTable(nn.Module):
    """The ids of one rank of a collisionless table spread over the ranks of `group`."""

    def __init__(
        self,
        config: TableConfig,
        optimizer: SparseOptimizerConfig | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if config.method.admission == "cms" and config.method.min_count > 1:
            raise ConfigError(
                f"table {config.name!r}: count-min-sketch admission cannot be split between "
                "owner ranks; accepted: admission='exact'"
            )
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        capacity = resolve_capacity(config)
        owned = None if capacity is None else -(-capacity // self.world_size)
        self.config = config
        self.local = CollisionlessTable(
            dataclasses.replace(
                config, method=dataclasses.replace(config.method, capacity=owned), budget=None
            ),
            optimizer,
        )

    def sequence(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of `ids` [N, dim] from their owners; differentiable back to the owners."""
        ids = ids.reshape(-1).to(torch.int64)
        owners = owner_of(ids, self.world_size)
        order = torch.argsort(owners, stable=True)
        send_counts = torch.bincount(owners, minlength=self.world_size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        owned_ids = torch.empty(sum(recv), dtype=torch.int64)
        dist.all_to_all_single(owned_ids, ids[order], recv, send, group=self.group)
        owned_rows = _ScaleGrad.apply(self.local.sequence(owned_ids), 1.0 / self.world_size)
        sorted_rows = dist_fn.all_to_all_single(
            torch.empty(ids.numel(), self.config.dim, dtype=owned_rows.dtype),
            owned_rows,
            send,
            recv,
            group=self.group,
        )
        return sorted_rows[torch.argsort(order)]

    def pooled(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Rows pooled per bag [B, dim] (sum, or mean per config.pooling; empty bags zeros)."""
        rows = self.sequence(ids)
        lengths = lengths.to(torch.int64)
        summed = torch.segment_reduce(rows, "sum", lengths=lengths, unsafe=True)
        if self.config.pooling == "mean":
            summed = summed / lengths.clamp(min=1).unsqueeze(1).to(summed.dtype)
        return summed

    def entries(self) -> dict[str, torch.Tensor]:
        """This owner's tracked ids as entries (see ENTRY_KEYS), its default row and stats."""
        state = self.local.state_dict()
        live = state["entry_ids"] != EMPTY
        row = state["entry_row"][live]
        has_row = row >= 0
        safe_row = row.clamp(min=DEFAULT_ROW)
        return {
            "ids": state["entry_ids"][live],
            "count": state["entry_count"][live],
            "last_seen_us": state["entry_last_seen_us"][live],
            "has_row": has_row,
            "rows": state["weight"][safe_row] * has_row.unsqueeze(1),
            "momentum": state["momentum"][safe_row] * has_row,
            "default_row": state["weight"][DEFAULT_ROW],
            "default_momentum": state["momentum"][DEFAULT_ROW : DEFAULT_ROW + 1],
            "stats": state["stats"],
        }

    def restore(self, parts: list[dict[str, torch.Tensor]]) -> None:
        """Take the entries this rank owns from every old owner's `entries()`."""
        self.local.load_state_dict(state_from_entries(parts, self.world_size, self.rank))


def state_from_entries(
    parts: list[dict[str, torch.Tensor]], world_size: int, rank: int
) -> dict[str, torch.Tensor]:
    """The CollisionlessTable state_dict of owner `rank` of `world_size`, from the entries of
    every old owner (world_size 1: the one-process table)."""
    keep = [owner_of(part["ids"], world_size) == rank for part in parts]
    chosen = {
        key: torch.cat([part[key][mask] for part, mask in zip(parts, keep, strict=True)])
        for key in ENTRY_KEYS
    }
    admitted = chosen["has_row"]
    num_rows = int(admitted.sum())
    entry_row = torch.full_like(chosen["ids"], -1)
    entry_row[admitted] = torch.arange(1, num_rows + 1)
    default = torch.stack([part["default_row"] for part in parts]).mean(dim=0)
    default_momentum = torch.cat([part["default_momentum"] for part in parts]).mean()
    stats = torch.stack([part["stats"] for part in parts]).sum(dim=0)
    return {
        "version": torch.tensor([CHECKPOINT_VERSION], dtype=torch.int64),
        "weight": torch.cat([default.unsqueeze(0), chosen["rows"][admitted]]),
        "momentum": torch.cat([default_momentum.reshape(1), chosen["momentum"][admitted]]),
        "touched": torch.zeros(num_rows + 1, dtype=torch.bool),
        "free_rows": torch.empty(0, dtype=torch.int64),
        "entry_ids": chosen["ids"],
        "free_entries": torch.empty(0, dtype=torch.int64),
        "entry_count": chosen["count"],
        "entry_last_seen_us": chosen["last_seen_us"],
        "entry_row": entry_row,
        "evicted_ids": torch.empty(0, dtype=torch.int64),
        # Counters are summed onto rank 0, so that their total over ranks is kept.
        "stats": stats if rank == 0 else torch.zeros(len(STAT_NAMES), dtype=torch.int64),
    }


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; gradient times `scale` backward."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def owner_file(rank: int, world_size: int) -> str:
    return f"owner-{rank:05d}-of-{world_size:05d}.safetensors"


def save_owned(path: str | Path, table: OwnedCollisionlessTable) -> Path:
    """Each rank writes its entries to `path`/owner-<r>-of-<n>.safetensors (collective)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    entries = {key: value.contiguous() for key, value in table.entries().items()}
    metadata = {"table": json.dumps(dataclasses.asdict(table.config), sort_keys=True)}
    save_file(entries, path / owner_file(table.rank, table.world_size), metadata=metadata)
    dist.barrier(group=table.group)
    return path


def read_owned(path: str | Path, config: TableConfig) -> list[dict[str, torch.Tensor]]:
    """The entries of every old owner of table `config` saved under `path`."""
    files = sorted(Path(path).glob("owner-*-of-*.safetensors"))
    if not files:
        raise CheckpointError(f"no collisionless owner files at {path}")
    world = int(files[0].name.split("-of-")[1].split(".")[0])
    if [f.name for f in files] != [owner_file(r, world) for r in range(world)]:
        raise CheckpointError(
            f"{path}: expected the files of {world} owners, found {[f.name for f in files]}"
        )
    parts = []
    for file in files:
        with safe_open(file, framework="pt") as handle:
            saved = json.loads((handle.metadata() or {}).get("table", "{}"))
            if saved.get("name") != config.name or saved.get("dim") != config.dim:
                raise CheckpointError(
                    f"{file} holds table {saved.get('name')!r} of dim {saved.get('dim')}, not "
                    f"{config.name!r} of dim {config.dim}"
                )
            parts.append({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    return parts


def load_owned(path: str | Path, table: OwnedCollisionlessTable) -> None:
    """Restore `table` from the files of any number of old owners."""
    table.restore(read_owned(path, table.config))
