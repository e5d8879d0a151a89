"""Checkpoints of a sharded model: one safetensors file per rank, readable by any world size.

A directory `rank-<r>-of-<n>.safetensors`: each rank writes its local shards of every sharded
tensor (table weights, and the fused optimizer's momentum) as `<key>@<offsets>`, with each
shard's offsets, sizes and the tensor's global shape in the file's metadata; rank 0 also writes
the replicated tensors (dense parameters) whole and the model manifest. Reading assembles any
region of any tensor from the shards that overlap it, so a checkpoint written by n ranks loads
onto m ranks under another plan (`load_sharded`), or into the plain one-process model as an
ordinary checkpoint (`export_checkpoint`). Collisionless tables are saved per owner under
`collisionless/<table>/` (`embedding_tables.sharded_collisionless`) and restored by id owner. The
directory is written to `<dir>.partial` and
renamed when every rank has written, so a crash leaves the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.optim.optimizers import in_backward_optimizer_filter

from embedding_tables.sharded_collisionless import (
    load_owned,
    read_owned,
    save_owned,
    state_from_entries,
)
from embedding_tables.sharding import torchrec_name
from models.checkpoint import MANIFEST_KEY, manifest_of, read_manifest, write_checkpoint_file
from models.config import table_config_from_dict
from models.errors import CheckpointError

SHARDS_KEY = "embtab.shards"
MOMENTUM_SUFFIX = ".momentum"
# Where the sharded collection's modules keep their tables, and their names in the plain model.
SHARDED_PREFIXES = ("embeddings.pooled.embedding_bags.", "embeddings.rows.embeddings.")
PLAIN_PREFIX = "embeddings.tables."
DENSE_OPTIMIZER_PREFIX = "dense_optimizer."
OWNED_PREFIX = "embeddings.owned."
COLLISIONLESS_DIR = "collisionless"
PLAIN_SELF_MANAGED_PREFIX = "embeddings.self_managed."


@dataclass(frozen=True)
class Piece:
    """One shard of a tensor in one rank's file."""

    file: Path
    name: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


def local_regions(value: torch.Tensor) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """(offsets, tensor) of the parts of `value` this rank holds: its local shards, or all of a
    replicated tensor."""
    if isinstance(value, ShardedTensor):
        return [
            (tuple(shard.metadata.shard_offsets), shard.tensor) for shard in value.local_shards()
        ]
    return [((0,) * value.dim(), value)]


def sharded_state(
    dmp: torch.nn.Module, dense_optimizer: torch.optim.Optimizer | None = None
) -> dict[str, torch.Tensor]:
    """Model and optimizer state of a DistributedModelParallel model, keyed as saved: the
    state_dict's keys, `<table key>.momentum` for each table's row-wise accumulator, and
    `dense_optimizer.<parameter>.<state>` for the dense optimizer's state (created if absent,
    so that a fresh optimizer can be loaded into)."""
    state = {
        key: value
        for key, value in dmp.state_dict().items()
        if not key.startswith(OWNED_PREFIX)  # per-owner entries, saved by save_owned
    }
    for key, entries in dmp.fused_optimizer.state_dict()["state"].items():
        for name, value in entries.items():
            if name.endswith(".momentum1"):
                state[key.removesuffix(".weight") + MOMENTUM_SUFFIX] = value
    if dense_optimizer is not None:
        for name, parameter in dense_parameters(dmp).items():
            entries = dense_optimizer.state[parameter]
            if not entries:
                entries.update(
                    step=torch.zeros(()),
                    exp_avg=torch.zeros_like(parameter),
                    exp_avg_sq=torch.zeros_like(parameter),
                )
            for kind, value in entries.items():
                state[f"{DENSE_OPTIMIZER_PREFIX}{name}.{kind}"] = value
    return state


def dense_parameters(dmp: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters the dense optimizer trains (not the fused tables), by their names in the
    unwrapped model (the same for every world size)."""
    return dict(in_backward_optimizer_filter(dmp.module.named_parameters()))


def save_sharded(
    path: str | Path,
    dmp: torch.nn.Module,
    dense_optimizer: torch.optim.Optimizer | None = None,
    extra: dict | None = None,
) -> Path:
    """Every rank writes its shards; rank 0 the replicated tensors and the manifest. Collective:
    every rank must call it."""
    path = Path(path)
    rank, world = dist.get_rank(), dist.get_world_size()
    staging = path.with_name(path.name + ".partial")
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    tensors: dict[str, torch.Tensor] = {}
    shards: dict[str, dict[str, Any]] = {}
    for key, value in sharded_state(dmp, dense_optimizer).items():
        if not isinstance(value, ShardedTensor) and rank != 0:
            continue
        for offsets, tensor in local_regions(value):
            name = key + "@" + ",".join(map(str, offsets))
            tensors[name] = tensor.detach().cpu().contiguous().clone()
            shards[name] = {
                "key": key,
                "offsets": list(offsets),
                "sizes": list(tensor.shape),
                "shape": list(value.shape),
            }
    metadata = {SHARDS_KEY: json.dumps(shards, sort_keys=True)}
    if rank == 0:
        manifest = manifest_of(dmp.module, extra=extra)
        tables = dmp.module.embeddings.physical_tables()
        manifest["sharding"] = {
            "world_size": world,
            "torchrec_tables": {torchrec_name(table.name): table.name for table in tables},
        }
        metadata[MANIFEST_KEY] = json.dumps(manifest, sort_keys=True)
    save_file(tensors, staging / rank_file(rank, world), metadata=metadata)
    for name, owned in dmp.module.embeddings.owned.items():
        save_owned(staging / COLLISIONLESS_DIR / name, owned)
    dist.barrier()
    if rank == 0:
        previous = path.with_name(path.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        if path.exists():
            os.replace(path, previous)
        os.replace(staging, path)
        shutil.rmtree(previous, ignore_errors=True)
    dist.barrier()
    return path


def rank_file(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


class ShardedCheckpoint:
    """The shards of a checkpoint directory, indexed by tensor; regions read on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        files = sorted(self.path.glob("rank-*-of-*.safetensors"))
        if not files:
            raise CheckpointError(f"no sharded checkpoint at {self.path} (no rank-*.safetensors)")
        world = int(files[0].name.split("-of-")[1].split(".")[0])
        expected = [rank_file(r, world) for r in range(world)]
        if [f.name for f in files] != expected:
            raise CheckpointError(
                f"{self.path}: expected the files of {world} ranks ({expected[0]} ...), found "
                f"{[f.name for f in files]}"
            )
        self.world_size = world
        self.manifest = read_manifest(files[0])
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.pieces: dict[str, list[Piece]] = {}
        for file in files:
            try:
                with safe_open(file, framework="pt") as handle:
                    shards = json.loads((handle.metadata() or {}).get(SHARDS_KEY, "{}"))
            except (SafetensorError, OSError, ValueError) as error:
                raise CheckpointError(f"{file} is not a readable shard file: {error}") from error
            for name, info in shards.items():
                self.shapes[info["key"]] = tuple(info["shape"])
                self.pieces.setdefault(info["key"], []).append(
                    Piece(file, name, tuple(info["offsets"]), tuple(info["sizes"]))
                )

    def region(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """The part [offsets, offsets + sizes) of tensor `key`, from every shard overlapping it."""
        if key not in self.pieces:
            raise CheckpointError(f"{self.path}: no tensor {key!r}")
        result: torch.Tensor | None = None
        covered = 0
        for piece in self.pieces[key]:
            low = [max(o, p) for o, p in zip(offsets, piece.offsets, strict=True)]
            high = [
                min(o + s, p + q)
                for o, s, p, q in zip(offsets, sizes, piece.offsets, piece.sizes, strict=True)
            ]
            if any(h <= lo for lo, h in zip(low, high, strict=True)):
                continue
            with safe_open(piece.file, framework="pt") as handle:
                source = handle.get_slice(piece.name)
                part = source[
                    tuple(
                        slice(lo - p, h - p)
                        for lo, h, p in zip(low, high, piece.offsets, strict=True)
                    )
                ]
            if result is None:
                result = torch.empty(sizes, dtype=part.dtype)
            result[
                tuple(slice(lo - o, h - o) for lo, h, o in zip(low, high, offsets, strict=True))
            ] = part
            covered += part.numel()
        if result is None and 0 in sizes:
            with safe_open(self.pieces[key][0].file, framework="pt") as handle:
                dtype = handle.get_tensor(self.pieces[key][0].name).dtype
            return torch.empty(sizes, dtype=dtype)
        if result is None or covered != result.numel():
            raise CheckpointError(
                f"{self.path}: the shards of {key!r} do not cover {list(offsets)} + {list(sizes)}"
            )
        return result

    def full(self, key: str) -> torch.Tensor:
        shape = self.shapes[key]
        return self.region(key, (0,) * len(shape), shape)


def load_sharded(
    dmp: torch.nn.Module,
    path: str | Path,
    dense_optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Fill this rank's shards (and replicated tensors, and the dense optimizer's state) from a
    checkpoint written by any number of ranks; every tensor is checked before any is written.
    Returns the manifest."""
    checkpoint = ShardedCheckpoint(path)
    state = sharded_state(dmp, dense_optimizer)
    problems = [
        f"{key}: {checkpoint.shapes.get(key, 'missing')} in the "
        f"checkpoint, {tuple(value.shape)} here"
        for key, value in state.items()
        if checkpoint.shapes.get(key) != tuple(value.shape)
    ]
    if problems:
        raise CheckpointError(
            f"{path} (written by {checkpoint.world_size} ranks) does not fit this model: "
            + "; ".join(problems[:5])
            + ("" if len(problems) <= 5 else f"; and {len(problems) - 5} more")
        )
    parts = [
        (tensor, checkpoint.region(key, offsets, tuple(tensor.shape)))
        for key, value in state.items()
        for offsets, tensor in local_regions(value)
    ]
    with torch.no_grad():
        for tensor, part in parts:
            tensor.copy_(part)
    for name, owned in dmp.module.embeddings.owned.items():
        load_owned(checkpoint.path / COLLISIONLESS_DIR / name, owned)
    return checkpoint.manifest


def export_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Write a sharded checkpoint as one ordinary checkpoint of the plain (one-process) model,
    for `models.checkpoint.load_checkpoint`, `embtab eval` and publishing to serving.

    A column-wise sharded table keeps one row-wise Adagrad accumulator per column shard; the
    plain table's accumulator is their mean weighted by shard width, which is exactly the
    accumulator of the whole row (each step adds the mean of g^2 over the row's columns)."""
    checkpoint = ShardedCheckpoint(path)
    names = checkpoint.manifest["sharding"]["torchrec_tables"]
    tensors: dict[str, torch.Tensor] = {}
    for key in checkpoint.shapes:
        if key.startswith(DENSE_OPTIMIZER_PREFIX):
            continue  # the plain checkpoint holds no optimizer state but the tables'
        prefix = next((p for p in SHARDED_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            tensors[key] = checkpoint.full(key)
            continue
        table, kind = key[len(prefix) :].rsplit(".", 1)
        plain = f"{PLAIN_PREFIX}{names[table]}.{kind}"
        if kind == "weight":
            tensors[plain] = checkpoint.full(key)
        else:
            tensors[plain] = _row_accumulator(checkpoint, key, prefix + table + ".weight")
    for fields in checkpoint.manifest["tables"]:
        directory = checkpoint.path / COLLISIONLESS_DIR / fields["name"]
        if directory.is_dir():
            config = table_config_from_dict(fields, "manifest.tables", strict=False)
            state = state_from_entries(read_owned(directory, config), 1, 0)
            for key, value in state.items():
                tensors[f"{PLAIN_SELF_MANAGED_PREFIX}{config.name}.{key}"] = value
    return write_checkpoint_file(out, tensors, checkpoint.manifest)


def _row_accumulator(checkpoint: ShardedCheckpoint, key: str, weight_key: str) -> torch.Tensor:
    """[rows] accumulator of a table from its column shards' [shards * rows] accumulators."""
    rows, dim = checkpoint.shapes[weight_key]
    widths = [p.sizes[1] for p in sorted(checkpoint.pieces[weight_key], key=lambda p: p.offsets[1])]
    stacked = checkpoint.full(key).view(-1, rows)
    if stacked.shape[0] == 1:
        return stacked[0]
    if stacked.shape[0] != len(widths):
        raise CheckpointError(
            f"{checkpoint.path}: {key} holds {stacked.shape[0]} accumulators per row but the "
            f"table has {len(widths)} column shards"
        )
    weights = torch.tensor(widths, dtype=stacked.dtype).unsqueeze(1) / dim
    return (stacked * weights).sum(dim=0)
