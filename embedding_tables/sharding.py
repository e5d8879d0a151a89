"""The physical tables of every static method as torchrec modules, for torchrec's sharding.

`ShardableEmbeddingCollection` has the interface a model uses of `EmbeddingCollection`
(`forward(kjt) -> KeyedTensor`, `output_dim`, `feature_names`), but keeps its physical tables in
a torchrec `EmbeddingBagCollection` (pooled lookups) and a torchrec `EmbeddingCollection` (the
unpooled lookups of qr `mult` and of a method's `RowCombine`, ttrec's, whose combine must be
taken before pooling). Wrapped in torchrec's
`DistributedModelParallel`, those two modules are replaced by their sharded versions on the
planner's plan; nothing else changes. A lookup runs in the same three steps as the unsharded
collection:

1. index transform (`embedding_tables.transforms`, unchanged): ids -> physical rows, in embtab,
   before the lookup, so the rows' keys (`"<feature>@<j>"`, lookup j of a feature) are ordinary
   torchrec features and sharding never sees which method made them;
2. torchrec lookup (sharded or not), fbgemm TBE with the fused sparse optimizer;
3. combine (`embedding_tables.combine.combine_rows`): concat / add on pooled rows, mult or a
   RowCombine on unpooled rows then pooled.

torchrec module names cannot hold '.', so physical table `item_id.r` is torchrec table
`item_id__r` (`torchrec_name`). Collisionless tables (a dynamic id map, not a static transform)
are not torchrec's: each is an `embedding_tables.sharded_collisionless.OwnedCollisionlessTable`,
ids owned by rank by hash, built when the collection is given the process group (`group=`);
without one (planning only) they are left out.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ModuleSharder, ShardingType
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_configs import PoolingType as TorchrecPooling
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.embedding_modules import EmbeddingCollection as TorchrecEmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embedding_tables.collection import TOTAL_KEY, _check_tables
from embedding_tables.combine import Combine, combine_rows, pools_per_lookup
from embedding_tables.config import TableConfig
from embedding_tables.errors import ConfigError, FeatureError, IdError
from embedding_tables.lookup import TORCH_DTYPES, init_bound
from embedding_tables.optimizer import SparseOptimizerConfig
from embedding_tables.planning import PhysicalTable, plan_table
from embedding_tables.sharded_collisionless import OwnedCollisionlessTable
from embedding_tables.transforms import GraphHashMappingLike, IndexTransform, transform_for

SLOT_SEPARATOR = "@"
_TORCHREC_DTYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}
_FBGEMM_OPTIMIZER = {
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "sgd": EmbOptimType.EXACT_SGD,
}
SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_column_wise", "data_parallel")


def torchrec_name(physical_table: str) -> str:
    """The torchrec table name of a physical table ('.' is not allowed in module names)."""
    return physical_table.replace(".", "__")


def slot_key(feature: str, lookup: int) -> str:
    """The torchrec feature name of lookup `lookup` of `feature`."""
    return f"{feature}{SLOT_SEPARATOR}{lookup}"


class ShardableEmbeddingCollection(nn.Module):
    """Static-method tables in torchrec modules that DistributedModelParallel can shard.

    `tables`, `feature_to_table` and `mappings` as for `EmbeddingCollection`. `device="meta"`
    allocates nothing (DistributedModelParallel then allocates each rank's shards only).
    `group`: the process group whose ranks own the collisionless tables' ids, trained with
    `optimizer` (None: planning only, without collisionless lookups).
    KJTs with per-id weights are refused (the pooled modules are unweighted).
    """

    def __init__(
        self,
        tables: Sequence[TableConfig],
        feature_to_table: Mapping[str, str],
        mappings: Mapping[str, GraphHashMappingLike] | None = None,
        device: torch.device | str | None = None,
        optimizer: SparseOptimizerConfig | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        mappings = dict(mappings or {})
        self.configs = _check_tables(tables, feature_to_table, mappings)
        managed = {n: c for n, c in self.configs.items() if c.method.self_managed}
        self.owned = nn.ModuleDict(
            {}
            if group is None
            else {name: OwnedCollisionlessTable(c, optimizer, group) for name, c in managed.items()}
        )
        self.feature_to_table = dict(feature_to_table)
        static = {f: t for f, t in self.feature_to_table.items() if t not in managed}
        self.graphhash_mappings = nn.ModuleDict(
            {name: m for name, m in mappings.items() if isinstance(m, nn.Module)}
        )
        self.plans = {
            name: plan_table(config, mappings[name].num_rows if name in mappings else None)
            for name, config in self.configs.items()
            if name not in managed
        }
        self.transforms: dict[str, IndexTransform] = {
            feature: transform_for(
                self.configs[table], feature, mappings.get(table), self.plans[table]
            )
            for feature, table in static.items()
        }
        self._physical = {
            physical.name: physical for plan in self.plans.values() for physical in plan.physical
        }
        names = [torchrec_name(name) for name in self._physical]
        if len(set(names)) != len(names):
            raise ConfigError(
                f"physical tables {sorted(self._physical)} collide once '.' is replaced by '__' "
                "for torchrec; rename the logical tables"
            )
        pooled_slots: dict[str, list[str]] = {}
        row_slots: dict[str, list[str]] = {}
        for feature, transform in self.transforms.items():
            slots = pooled_slots if pools_per_lookup(self._combine(feature)) else row_slots
            for j, physical in enumerate(transform.tables):
                slots.setdefault(physical, []).append(slot_key(feature, j))
        widths = {name: self._physical[name].dim for name in row_slots}
        if len(set(widths.values())) > 1:
            raise ConfigError(
                "torchrec's EmbeddingCollection, which holds the tables read unpooled (qr mult "
                "partitions, ttrec cores), takes one row width for all of them; these differ: "
                f"{', '.join(f'{name} {dim}' for name, dim in widths.items())}; accepted: "
                "tables whose unpooled rows share one width (e.g. ttrec rank r with dim_factors "
                "(r, 1, r), or qr mult tables of one dim)"
            )
        device = torch.device("cpu" if device is None else device)
        self.pooled = (
            EmbeddingBagCollection(
                tables=[self._bag_config(name, keys) for name, keys in pooled_slots.items()],
                device=device,
            )
            if pooled_slots
            else None
        )
        self.rows = (
            TorchrecEmbeddingCollection(
                tables=[self._row_config(name, keys) for name, keys in row_slots.items()],
                device=device,
            )
            if row_slots
            else None
        )
        self._pooled_keys = [key for keys in pooled_slots.values() for key in keys]
        self._row_keys = [key for keys in row_slots.values() for key in keys]
        self.track_touched = False
        self._touched: dict[str, list[torch.Tensor]] = {}

    # ---- what a model uses ----------------------------------------------------------------

    @property
    def feature_names(self) -> list[str]:
        return list(self.feature_to_table)

    def output_dim(self, feature: str) -> int:
        if feature not in self.feature_to_table:
            raise FeatureError(
                f"unknown feature {feature!r}; configured features: {', '.join(self.feature_names)}"
            )
        config = self.configs[self.feature_to_table[feature]]
        return config.method.output_dim(config, feature)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled rows of every feature: KeyedTensor [B, sum of output dims]."""
        per_feature = self._check(features)
        batch = features.stride()
        slots = self._transform(per_feature)
        if self.track_touched and self.training and torch.is_grad_enabled():
            for feature, transform in self.transforms.items():
                for j, physical in enumerate(transform.tables):
                    self._touched.setdefault(physical, []).append(slots[slot_key(feature, j)][0])
        pooled = (
            self.pooled(_slot_kjt(self._pooled_keys, slots, batch)).to_dict() if self.pooled else {}
        )
        unpooled = self.rows(_slot_kjt(self._row_keys, slots, batch)) if self.rows else {}
        pieces = []
        for feature, (ids, lengths) in per_feature.items():
            table = self.feature_to_table[feature]
            if feature not in self.transforms:
                if table not in self.owned:
                    raise ConfigError(
                        f"feature {feature!r}: collisionless table {table!r} is built only with "
                        "the process group that owns its ids (group=); this collection has none"
                    )
                pieces.append(self.owned[table].pooled(ids, lengths))
                continue
            lookups = len(self.transforms[feature].tables)
            keys = [slot_key(feature, j) for j in range(lookups)]
            combine = self._combine(feature)
            if pools_per_lookup(combine):
                summed = combine_rows(combine, [pooled[key] for key in keys])
            else:
                combined = combine_rows(combine, [unpooled[key].values() for key in keys])
                summed = torch.segment_reduce(combined, "sum", lengths=lengths, unsafe=True)
            pieces.append(self._mean(summed, lengths, feature))
        return KeyedTensor(
            keys=self.feature_names,
            length_per_key=[self.output_dim(feature) for feature in self.feature_names],
            values=torch.cat(pieces, dim=1),
        )

    def check(self, features: KeyedJaggedTensor) -> None:
        """Raise the errors `forward` would raise for `features` (unknown features, ids out of
        range), without any lookup: a rank checks its batch before the collective step, which
        one rank alone cannot leave."""
        self._transform(self._check(features))

    def take_touched_rows(self) -> dict[str, torch.Tensor]:
        """The static physical rows this rank's training lookups read since the last call (with
        `track_touched` on; off, nothing is kept), unique per physical table; resets. A row's
        owner may be another rank: the union over ranks is what changed."""
        touched = {name: torch.unique(torch.cat(rows)) for name, rows in self._touched.items()}
        self._touched = {}
        return touched

    # ---- what checkpoints and planning use ----------------------------------------------------

    def physical_tables(self) -> list[PhysicalTable]:
        """The static physical tables (what torchrec shards)."""
        return list(self._physical.values())

    @property
    def self_managed(self) -> dict[str, nn.Module]:
        """This rank's part of each collisionless table (what checkpoint manifests report)."""
        return {name: owned.local for name, owned in self.owned.items()}

    def num_parameters(self) -> dict[str, int]:
        """Weights (rows * dim) per logical table (collisionless: this rank's), and the sum."""
        counts = dict.fromkeys(self.configs, 0)
        for table in self._physical.values():
            counts[table.logical_table] += table.num_parameters
        for name, table in self.self_managed.items():
            counts[name] = table.num_parameters()
        counts[TOTAL_KEY] = sum(counts.values())
        return counts

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of weights per logical table (static: all ranks; collisionless: this rank's)."""
        sizes = dict.fromkeys(self.configs, 0)
        for table in self._physical.values():
            sizes[table.logical_table] += table.memory_bytes
        for name, table in self.self_managed.items():
            sizes[name] = table.memory_bytes()
        sizes[TOTAL_KEY] = sum(sizes.values())
        return sizes

    def initial_rows(self, physical_table: str, seed: int) -> torch.Tensor:
        """The table's initial weights, drawn as the unsharded tables' (uniform in ±sqrt(1/rows),
        or N(0, init_std) where the method set one), from a generator seeded by (seed, table):
        the same on every rank and for every world size."""
        table = self._physical[physical_table]
        generator = torch.Generator().manual_seed(
            seed * 1_000_003 + zlib.crc32(table.name.encode())
        )
        if table.init_std is not None:
            rows = torch.randn(table.num_rows, table.dim, generator=generator) * table.init_std
        else:
            bound = init_bound(table.num_rows)
            rows = torch.rand(table.num_rows, table.dim, generator=generator) * (2 * bound) - bound
        return rows.to(TORCH_DTYPES[table.dtype])

    # ---- internals -------------------------------------------------------------------------

    def _combine(self, feature: str) -> Combine:
        return self.plans[self.feature_to_table[feature]].combine

    def _bag_config(self, physical: str, keys: list[str]) -> EmbeddingBagConfig:
        table = self._physical[physical]
        return EmbeddingBagConfig(
            name=torchrec_name(physical),
            num_embeddings=table.num_rows,
            embedding_dim=table.dim,
            feature_names=keys,
            pooling=TorchrecPooling.SUM,
            data_type=_TORCHREC_DTYPES[table.dtype],
        )

    def _row_config(self, physical: str, keys: list[str]) -> EmbeddingConfig:
        table = self._physical[physical]
        return EmbeddingConfig(
            name=torchrec_name(physical),
            num_embeddings=table.num_rows,
            embedding_dim=table.dim,
            feature_names=keys,
            data_type=_TORCHREC_DTYPES[table.dtype],
        )

    def _mean(self, summed: torch.Tensor, lengths: torch.Tensor, feature: str) -> torch.Tensor:
        """A mean-pooled feature's sums divided by its bag lengths (empty bags stay zeros).
        Done here rather than by torchrec's PoolingType.MEAN, whose sharded CPU module fails
        on tables whose feature names differ from the table name (torchrec 1.8)."""
        if self.configs[self.feature_to_table[feature]].pooling != "mean":
            return summed
        return summed / lengths.clamp(min=1).unsqueeze(1).to(summed.dtype)

    def _transform(
        self, per_feature: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(physical rows, lengths) of every static lookup slot."""
        slots = {}
        for feature, (ids, lengths) in per_feature.items():
            if feature not in self.transforms:
                continue
            for j, rows in enumerate(self.transforms[feature](ids)):
                slots[slot_key(feature, j)] = (rows, lengths)
        return slots

    def _check(self, features: KeyedJaggedTensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(ids, lengths) per configured feature; typed errors for anything else."""
        keys = features.keys()
        if sorted(keys) != sorted(self.feature_to_table):
            raise FeatureError(
                f"KeyedJaggedTensor features {list(keys)} do not match the collection's "
                f"{self.feature_names}"
            )
        if features.variable_stride_per_key():
            raise FeatureError("KeyedJaggedTensor with a batch size per feature is not supported")
        if features.weights_or_none() is not None:
            raise FeatureError(
                "per-id weights are not supported by the sharded collection; accepted: an "
                "unweighted KeyedJaggedTensor (mean pooling is a table option)"
            )
        if features.values().dtype not in (torch.int64, torch.int32):
            raise IdError(f"ids must be int64 or int32, got {features.values().dtype}")
        result = {}
        for key, jagged in features.to_dict().items():
            result[key] = (jagged.values().to(torch.int64), jagged.lengths().to(torch.int64))
        return {feature: result[feature] for feature in self.feature_to_table}


def _slot_kjt(
    keys: list[str], slots: Mapping[str, tuple[torch.Tensor, torch.Tensor]], batch: int
) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.cat([slots[key][0] for key in keys]),
        lengths=torch.cat([slots[key][1] for key in keys]),
        stride=batch,
    )


def sharders(
    optimizer: SparseOptimizerConfig, row_wise_on_cpu: bool = True
) -> list[ModuleSharder[nn.Module]]:
    """torchrec's sharders with the fused sparse optimizer of `optimizer`.

    torchrec 1.8 offers row-wise sharding of pooled tables on CUDA only (its EmbeddingBag
    sharder lists row_wise for compute device "cuda"); with `row_wise_on_cpu` it is offered on
    CPU too: the same sharded module, its gloo collectives tested against one rank in
    tests/models/test_distributed.py.
    """
    if optimizer.kind is None:
        raise ConfigError(
            "sharded tables train with a fused sparse optimizer; accepted kinds: "
            f"{', '.join(_FBGEMM_OPTIMIZER)}"
        )
    if optimizer.initial_accumulator_value != 0.0:
        raise ConfigError(
            "sharded tables start the row-wise Adagrad accumulator at 0 (fbgemm's default); got "
            f"initial_accumulator_value={optimizer.initial_accumulator_value}"
        )
    fused = {
        "optimizer": _FBGEMM_OPTIMIZER[optimizer.kind],
        "learning_rate": optimizer.lr,
        "eps": optimizer.eps,
    }
    bags = (
        _RowWiseBagSharder(fused_params=fused)
        if row_wise_on_cpu
        else EmbeddingBagCollectionSharder(fused_params=fused)
    )
    return [bags, EmbeddingCollectionSharder(fused_params=fused)]


class _RowWiseBagSharder(EmbeddingBagCollectionSharder):
    """torchrec's EmbeddingBag sharder, offering row_wise on CPU as well."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        if ShardingType.ROW_WISE.value not in types:
            types.append(ShardingType.ROW_WISE.value)
        return types
