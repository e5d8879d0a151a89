"""Sharding a model's tables with torchrec: the plan, the sharded model, a sharded checkpoint
loaded back as one.

The physical tables of every static method sit in torchrec modules
(`embedding_tables.sharding.ShardableEmbeddingCollection`) that torchrec's planner shards
(table-wise, row-wise, column-wise, table-column-wise) and DistributedModelParallel replaces by
their sharded versions. The index transforms run in embtab before the sharded lookup, so a model
never knows it is sharded. Collisionless tables are owned by rank by hash
(`embedding_tables.sharded_collisionless`). Tables start from the same seeded rows whatever the
world size (`ShardableEmbeddingCollection.initial_rows`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError
from torchrec.distributed.types import ShardingPlan

from embedding_tables.planning import TBE_DIM_MULTIPLE
from embedding_tables.sharding import ShardableEmbeddingCollection, sharders, torchrec_name
from models.build import MODEL_CLASSES, ModelSpec
from models.checkpoint import GRAPHHASH_PREFIX, graphhash_from_tensors, spec_from_manifest
from models.errors import ModelConfigError
from models.sharded_checkpoint import SHARDED_PREFIXES, ShardedCheckpoint, load_sharded
from models.train import seed_everything

# Ranking models whose only sparse input is pooled lookups (DIN reads unpooled sequences, the
# retrievers train on a ranking loss over in-batch negatives: neither is sharded yet).
DISTRIBUTED_MODELS = ("lr", "dlrm", "dcn", "deepfm")
# Data parallel is left out unless asked for: its tables would be trained by the dense
# optimizer, not by the fused row-wise Adagrad every other path uses.
DEFAULT_SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_column_wise")
MAX_COLUMN_SHARD = 128


class ShardingPlanError(ModelConfigError):
    """torchrec's planner found no placement for a table under the given world size and types."""


def plan_sharding(
    model: nn.Module,
    world_size: int,
    sharding: Mapping[str, str],
    spec: ModelSpec,
    group: dist.ProcessGroup | None = None,
    compute_device: str = "cpu",
    topology: Topology | None = None,
) -> ShardingPlan:
    """torchrec's plan for `model`'s tables; with `group`, planned on rank 0 and broadcast."""
    collection: ShardableEmbeddingCollection = model.embeddings
    physical = {table.name: table for table in collection.physical_tables()}
    unknown = sorted(set(sharding) - set(physical))
    if unknown:
        raise ShardingPlanError(
            f"sharding names unknown physical table(s) {unknown}; accepted: {', '.join(physical)}"
        )
    constraints = {
        torchrec_name(name): ParameterConstraints(
            sharding_types=[sharding[name]] if name in sharding else list(DEFAULT_SHARDING_TYPES),
            min_partition=column_shard_width(table.dim),
        )
        for name, table in physical.items()
    }
    planner = EmbeddingShardingPlanner(
        topology=topology or Topology(world_size=world_size, compute_device=compute_device),
        constraints=constraints,
    )
    table_sharders = sharders(spec.sparse_optimizer)
    try:
        if group is None:
            return planner.plan(model, table_sharders)
        return planner.collective_plan(model, table_sharders, group)
    except (PlannerError, RuntimeError, ValueError) as error:
        raise ShardingPlanError(
            f"torchrec's planner cannot shard tables {list(physical)} over {world_size} rank(s) "
            f"with sharding {dict(sharding) or 'of its choice'}: {str(error).splitlines()[0]}"
        ) from error


def column_shard_width(dim: int) -> int:
    """The narrowest column shard the planner may cut: half a row (so small test tables can
    be split in two) but at least TBE's 4 columns and at most torchrec's usual 128."""
    return min(MAX_COLUMN_SHARD, max(TBE_DIM_MULTIPLE, dim // 2))


def sharded_model_shell(
    spec: ModelSpec,
    mappings: Mapping[str, nn.Module],
    group: dist.ProcessGroup | None = None,
) -> nn.Module:
    """The model with its tables on the meta device (nothing allocated), ready to be planned;
    with `group`, its collisionless tables are built, owned by the group's ranks."""
    if spec.model.name not in DISTRIBUTED_MODELS:
        raise ModelConfigError(
            f"model {spec.model.name!r} is not trained distributed; accepted: "
            f"{', '.join(DISTRIBUTED_MODELS)}"
        )
    embeddings = ShardableEmbeddingCollection(
        list(spec.tables),
        spec.feature_to_table,
        mappings,
        device="meta",
        optimizer=spec.sparse_optimizer,
        group=group,
    )
    model = MODEL_CLASSES[spec.model.name](spec.model, spec.schema, embeddings)
    model.spec = spec
    return model


def build_sharded_model(
    spec: ModelSpec,
    mappings: Mapping[str, nn.Module],
    sharding: Mapping[str, str],
    seed: int,
) -> DistributedModelParallel:
    """The model sharded over the default process group, tables at their seeded initial rows;
    `sharding` pins physical tables to a sharding type (the rest are the planner's choice)."""
    seed_everything(seed)
    model = sharded_model_shell(spec, mappings, dist.GroupMember.WORLD)
    plan = plan_sharding(model, dist.get_world_size(), sharding, spec, group=dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(
        model, device=torch.device("cpu"), plan=plan, sharders=sharders(spec.sparse_optimizer)
    )
    collection: ShardableEmbeddingCollection = dmp.module.embeddings
    names = {torchrec_name(table.name): table.name for table in collection.physical_tables()}
    with torch.no_grad():
        for key, value in dmp.state_dict().items():
            table = table_key(key)
            if table is None:
                continue
            rows = collection.initial_rows(names[table], seed)
            for shard in value.local_shards():
                (row, column), (count, width) = shard.metadata.shard_offsets, shard.tensor.shape
                shard.tensor.copy_(rows[row : row + count, column : column + width])
    return dmp


def load_sharded_model(
    path: str | Path, sharding: Mapping[str, str]
) -> tuple[DistributedModelParallel, dict[str, Any]]:
    """A sharded checkpoint written by any number of ranks, as the model sharded over the
    default process group (collective); and the checkpoint's manifest."""
    checkpoint = ShardedCheckpoint(path)
    manifest = checkpoint.manifest
    spec = spec_from_manifest(manifest)
    mapping_tensors = {
        key: checkpoint.full(key) for key in checkpoint.shapes if key.startswith(GRAPHHASH_PREFIX)
    }
    mappings = graphhash_from_tensors(manifest, mapping_tensors, str(path))
    dmp = build_sharded_model(spec, mappings, sharding, seed=0)
    load_sharded(dmp, path)
    return dmp, manifest


def table_key(key: str) -> str | None:
    """The torchrec table name of a state_dict key of a table weight, else None."""
    for prefix in SHARDED_PREFIXES:
        if key.startswith(prefix) and key.endswith(".weight"):
            return key[len(prefix) : -len(".weight")]
    return None


def plan_summary(dmp: DistributedModelParallel) -> dict[str, dict[str, Any]]:
    """Per torchrec table: its sharding type and the ranks/offsets/sizes of its shards."""
    summary = {}
    for module_plan in dmp.plan.plan.values():
        for table, parameter in module_plan.items():
            shards = parameter.sharding_spec.shards if parameter.sharding_spec else []
            summary[table] = {
                "sharding_type": parameter.sharding_type,
                "ranks": parameter.ranks,
                "shards": [
                    {
                        "rank": shard.placement.rank(),
                        "offsets": shard.shard_offsets,
                        "sizes": shard.shard_sizes,
                    }
                    for shard in shards
                ],
            }
    return summary
