"""EmbeddingCollection: every compression method behind torchrec's EmbeddingBagCollection shape.

`ec(kjt)` takes a torchrec KeyedJaggedTensor and returns a KeyedTensor with one key per feature,
in the order of `feature_to_table`'s keys, each `ec.output_dim(feature)` wide (dim; k_f * dim for
unified). `ec.sequence(kjt)` returns the unpooled rows of every feature as a dict of
JaggedTensors (torchrec EmbeddingCollection's shape). A lookup runs in three named steps:

1. index transform (`embedding_tables.transforms`): ids -> physical rows, one tensor per lookup
   (unified: feature f's lookup j hashes with seed `hashing.feature_seed(table seed, f, j)`).
   The lookups of a table group run as one batched transform (`BatchedTransform`);
2. table-batched lookup (`embedding_tables.lookup`, `embedding_tables.torch_lookup`): all
   physical tables of a dtype in one lookup call (one fbgemm TBE call, or torch ops); each table
   whose combine precedes pooling (qr `mult`, a method's `RowCombine`: ttrec), whose lookups
   must be read unpooled, in a call of its own;
3. combine (`embedding_tables.combine`): concat (unified, qr concat; free: adjacent columns),
   add (qr add, graphhash double), mult (qr mult: elementwise product of the partitions'
   rows, then pooling, in one autograd Function) or the method's RowCombine (ttrec's
   tensor-train contraction, once per distinct id of the batch, then pooling, in torch ops),
   all vectorised.

Sparse training (the part the model trainer relies on):

- With `optimizer=SparseOptimizerConfig(kind="rowwise_adagrad" | "sgd", ...)` the update is
  fused into backward, as fbgemm's TBE and torchrec's fused EBC do: `loss.backward()` updates
  the touched rows. The table weights are then NOT nn.Parameters: `ec.parameters()` (and a
  model's `.parameters()`) holds none of them, so a dense optimizer over `model.parameters()`
  is safe and never sees them. Call backward once per forward; each lookup call (`ec(kjt)`,
  `ec.sequence(kjt)`) applies its own update in its backward.
- With `optimizer=None` (or kind None) the tables are ordinary nn.Parameters with dense
  gradients, for a dense optimizer (and for gradient tests).
- Collisionless tables (self-managed) always apply their own fused update.

Pooling: `sum`, or `mean` = sum(w_i * row_i) / bag length (w_i = 1 without per-sample
weights). Empty bags pool to zeros. Per-sample weights (the KJT's weights) apply to pooled
lookups only; `sequence` ignores them.

Physical tables are named as `embedding_tables.planning` documents (`item_id`, `item_id.r`,
`item_id.q`, the unified group's name); `take_touched_rows`, `export_rows`, `load_rows` and the
state_dict (`tables.<physical>.weight`, `tables.<physical>.momentum` for row-wise Adagrad) use
those names. The device is fixed at construction (the fused tables do not follow `.to()`).

Backends (`ec.backend`, chosen when the collection is built by `embedding_tables.backend` from
the device and the EMBTAB_LOOKUP switch): step 2 runs in fbgemm's TBE (`fbgemm`) where fbgemm
has kernels for the device (CPU; CUDA only with fbgemm-gpu's CUDA build), otherwise in torch ops
(`torch`: `embedding_bag` and the same sparse optimizer in its backward, on any device; forced
by EMBTAB_LOOKUP=torch); for `optimizer=None` both train through the torch ops. With
EMBTAB_LOOKUP=triton (`triton`) the three steps of every static table of a dtype on CUDA (but
those with a RowCombine, which take the torch ops) run
fused in one Triton launch (`embedding_tables.kernels.group.FusedTableGroup`: index transform,
gathers, combine, pooling; the sparse optimizer fused into its backward, or dense gradients for
`optimizer=None`), with the same physical tables, names, state_dict and numerics. The kernels
are opt-in because they have been checked only under Triton's interpreter, not on a GPU.

Methods: each table's method (`embedding_tables.methods`) plans its physical tables and builds
its index transforms; the collection asks it, never its name. A method that takes a mapping
(`graphhash`: a GraphHashMapping per table, given as `mappings=` or by `set_graphhash_mapping`)
is a static transform like the others; a self-managed method (`collisionless`) builds a module
of its own (`Method.build_table`) that the collection calls per feature.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from embedding_tables.backend import lookup_backend
from embedding_tables.checked import CheckedKJT, check_layout
from embedding_tables.combine import (
    Combine,
    RowCombine,
    UnpooledFeature,
    combine_rows,
    mult_pool,
    pool_rows,
    pools_per_lookup,
)
from embedding_tables.config import TableConfig
from embedding_tables.cpu_kernels import (
    MAX_PARTS,
    CpuKernels,
    KernelTransform,
    PooledTerms,
    library,
)
from embedding_tables.errors import (
    ConfigError,
    EmbeddingTableError,
    FeatureError,
    IdError,
)
from embedding_tables.interfaces import TableGroupLookup
from embedding_tables.lookup import TORCH_DTYPES, TableBatchedLookup, bag_offsets
from embedding_tables.optimizer import SparseOptimizerConfig
from embedding_tables.planning import PhysicalTable, TablePlan, plan_table
from embedding_tables.torch_lookup import TorchLookup
from embedding_tables.transforms import (
    BatchedTransform,
    GraphHashMappingLike,
    IndexTransform,
    check_id_dtype,
    kernel_transform_of,
    out_of_range_error,
    transform_for,
)

TOTAL_KEY = "total"


@dataclass(frozen=True)
class _FeatureLookup:
    """Where one feature's lookups go: a lookup group and its slots, or a self-managed table."""

    feature: str
    table: str
    combine: Combine  # single | concat | add | mult | a RowCombine | self_managed
    output_dim: int
    mean: bool
    group: int = -1
    slots: tuple[int, ...] = ()
    # Columns [start, end) of the feature in its fused group's output (fused groups only).
    fused_columns: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class _KernelTerm:
    """One pooled term of a group run by the CPU kernels: `feature`'s ids through `transform`,
    the rows of the group's tables `tables` (one per partition, multiplied), pooled into
    columns [start, end) of the group's output (`columns`), or into the feature's own output
    (qr mult; `columns` None)."""

    feature: str
    transform: KernelTransform
    tables: tuple[int, ...]
    columns: tuple[int, int] | None


@dataclass(frozen=True)
class _KernelPlan:
    """The CPU kernels' terms for some groups and a KJT's key order, reused from batch to
    batch: the outputs are `groups`' (in order), then, if any, one for the qr mult features,
    which hold `mult_columns` (feature, start, end) of it; `tables` says where each term's
    tables come from (to notice a table that moved)."""

    key: tuple[tuple[int, ...], tuple[str, ...]]
    entries: list[tuple[int, _KernelTerm]]
    terms: PooledTerms
    groups: tuple[int, ...]
    mult_columns: list[tuple[str, int, int]]
    tables: list[tuple[object, tuple[int, ...]]]


@dataclass
class _GroupLayout:
    """A lookup group being laid out: its tables in order of first use and its slots as
    (table index, feature, lookup j)."""

    index: int
    kind: str  # pooled | rows | fused
    tables: list[PhysicalTable] = field(default_factory=list)
    slots: list[tuple[int, str, int]] = field(default_factory=list)
    features: list[str] = field(default_factory=list)

    def add(
        self, feature: str, physical: Sequence[PhysicalTable], lookup_tables: Sequence[str]
    ) -> None:
        for table in physical:
            if table not in self.tables:
                self.tables.append(table)
        names = [table.name for table in self.tables]
        for j, name in enumerate(lookup_tables):
            self.slots.append((names.index(name), feature, j))
        self.features.append(feature)


@dataclass
class _FeatureBatch:
    ids: torch.Tensor
    lengths: torch.Tensor
    weights: torch.Tensor | None


@dataclass
class _Batch:
    """A checked KJT: int64 values, lengths and float weights on the device, and per feature."""

    keys: list[str]
    values: torch.Tensor
    lengths: torch.Tensor
    weights: torch.Tensor | None
    features: dict[str, _FeatureBatch]
    counts: list[int]
    batch_size: int


class PhysicalTables(nn.Module):
    """The lookup groups and the name of every physical table in them; owns the state_dict
    entries `<physical>.weight` and `<physical>.momentum`."""

    def __init__(self, lookups: Sequence[TableGroupLookup]) -> None:
        super().__init__()
        self.lookups = nn.ModuleList(lookups)
        self.locations: dict[str, tuple[int, int]] = {}
        for g, lookup in enumerate(lookups):
            for t, table in enumerate(lookup.tables):
                self.locations[table.name] = (g, t)

    def table(self, name: str) -> PhysicalTable:
        group, t = self.locations[name]
        return self.lookups[group].tables[t]

    def weight(self, name: str) -> torch.Tensor:
        group, t = self.locations[name]
        return self.lookups[group].weight(t)

    def momentum(self, name: str) -> torch.Tensor | None:
        group, t = self.locations[name]
        return self.lookups[group].momentum(t)

    def take_touched_rows(self, name: str) -> torch.Tensor:
        group, t = self.locations[name]
        return self.lookups[group].take_touched_rows(t)

    def mark_touched(self, name: str, rows: torch.Tensor) -> None:
        group, t = self.locations[name]
        self.lookups[group].mark_touched(t, rows)

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name in self.locations:
            tensors[f"{name}.weight"] = self.weight(name)
            momentum = self.momentum(name)
            if momentum is not None:
                tensors[f"{name}.momentum"] = momentum
        return tensors

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for key, tensor in self._state_tensors().items():
            destination[prefix + key] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, torch.Tensor],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Checks every entry before writing any, so a bad state_dict leaves the tables as
        they were."""
        expected = self._state_tensors()
        ok = True
        for key, tensor in expected.items():
            if prefix + key not in state_dict:
                missing_keys.append(prefix + key)
                continue
            given = state_dict[prefix + key]
            if tuple(given.shape) != tuple(tensor.shape):
                error_msgs.append(
                    f"{prefix + key}: shape {tuple(given.shape)} in the state_dict, "
                    f"{tuple(tensor.shape)} in this collection"
                )
                ok = False
        for key in state_dict:
            if key.startswith(prefix) and key[len(prefix) :] not in expected:
                unexpected_keys.append(key)
        if not ok:
            return
        with torch.no_grad():
            for key, tensor in expected.items():
                if prefix + key in state_dict:
                    tensor.copy_(state_dict[prefix + key])


class EmbeddingCollection(nn.Module):
    """Pooled (and sequence) lookups of many features over compressed tables, KJT in.

    `tables`: the logical tables; `feature_to_table`: feature name -> table name (several
    features may share a table; a unified table is shared by the features of its group; the
    KeyedTensor follows this mapping's key order). `optimizer`: the fused sparse optimizer, or
    None for plain trainable parameters. `mappings`: graphhash table name -> GraphHashMapping.
    """

    def __init__(
        self,
        tables: Sequence[TableConfig],
        feature_to_table: Mapping[str, str],
        optimizer: SparseOptimizerConfig | None = None,
        device: torch.device | str | None = None,
        mappings: Mapping[str, GraphHashMappingLike] | None = None,
    ) -> None:
        super().__init__()
        self.device = torch.device("cpu" if device is None else device)
        self.optimizer_config = optimizer if optimizer and optimizer.kind else None
        self.configs = _check_tables(tables, feature_to_table, mappings or {})
        self.feature_to_table = dict(feature_to_table)
        self.graphhash_mappings = nn.ModuleDict()
        self._loose_mappings: dict[str, GraphHashMappingLike] = {}
        for name, mapping in (mappings or {}).items():
            self._store_mapping(name, mapping)
        self.plans = {
            name: plan_table(config, self._mapping_rows(name))
            for name, config in self.configs.items()
            if not config.method.self_managed
        }
        self.self_managed = nn.ModuleDict(
            {
                name: config.method.build_table(config, optimizer)
                for name, config in self.configs.items()
                if config.method.self_managed
            }
        )
        self._lookups: dict[str, _FeatureLookup] = {}
        self._transforms: dict[str, IndexTransform] = {}
        self._slot_features: list[list[str]] = []
        self._slot_lookups: list[list[int]] = []
        self._slot_columns: list[list[int]] = []
        self._batched_transforms: dict[int, BatchedTransform] = {}
        self._kernel_terms: dict[int, list[_KernelTerm] | None] = {}
        self._kernel_plans: dict[tuple[tuple[int, ...], tuple[str, ...]], _KernelPlan] = {}
        self.backend = lookup_backend(self.device.type)
        self._fused = self.backend == "triton"
        self.tables = PhysicalTables(self._build_lookups())

    # ---- public API -------------------------------------------------------------------------

    @property
    def feature_names(self) -> list[str]:
        return list(self.feature_to_table)

    def output_dim(self, feature: str) -> int:
        """Width of `feature`'s pooled row (and of its sequence rows)."""
        return self._feature_lookup(feature).output_dim

    def index_transform(self, feature: str) -> IndexTransform:
        """The pure ids -> physical rows function of a static feature (what serving reruns)."""
        lookup = self._feature_lookup(feature)
        if lookup.combine == "self_managed":
            raise ConfigError(
                f"feature {feature!r}: table {lookup.table!r} is self-managed "
                f"({self.configs[lookup.table].method.name}); it has no static index transform"
            )
        return self._transform(feature)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled rows of every feature: KeyedTensor [B, sum of output dims]."""
        batch = self._split(features)
        group_outputs = self._pooled_group_outputs(batch)
        pieces = [
            self._pooled_feature(lookup, batch, group_outputs) for lookup in self._lookups.values()
        ]
        return KeyedTensor(
            keys=self.feature_names,
            length_per_key=[lookup.output_dim for lookup in self._lookups.values()],
            values=self._concat_columns(pieces, group_outputs),
        )

    def sequence(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        """Unpooled rows of every feature: JaggedTensor values [N_f, output_dim], the KJT's
        lengths. Each table group is one TBE call in which every feature is padded to the
        longest feature's id count."""
        batch = self._split(features)
        group_rows: dict[int, list[torch.Tensor]] = {}
        combined_rows: dict[str, torch.Tensor] = {}  # per feature, already combined
        for group, kind in enumerate(self._group_kinds):
            if kind == "fused":
                combined_rows.update(self._fused_sequence(batch, group))
            elif self._combines_rows(group):
                combined_rows.update(self._row_combined(batch, group))
            else:
                group_rows[group] = self._group_rows(batch, group)
        result = {}
        for name, lookup in self._lookups.items():
            feature = batch.features[name]
            if lookup.combine == "self_managed":
                rows = self.self_managed[lookup.table].sequence(feature.ids)
            elif name in combined_rows:
                rows = combined_rows[name]
            else:
                rows = combine_rows(
                    lookup.combine, [group_rows[lookup.group][s] for s in lookup.slots]
                )
            result[name] = JaggedTensor(values=rows, lengths=feature.lengths)
        return result

    def physical_tables(self) -> list[PhysicalTable]:
        """Every physical table: static ones first (in group order), then self-managed."""
        static = [
            lookup.tables[t] for lookup in self.tables.lookups for t in range(len(lookup.tables))
        ]
        managed = [
            PhysicalTable(
                name=name,
                logical_table=name,
                num_rows=table.num_parameters() // self.configs[name].dim,
                dim=self.configs[name].dim,
                dtype=self.configs[name].dtype,
            )
            for name, table in self.self_managed.items()
        ]
        return static + managed

    def take_touched_rows(self) -> dict[str, torch.Tensor]:
        """Physical rows changed since the last call (by a backward or `load_rows`), per
        physical table; resets the record."""
        touched = {name: self.tables.take_touched_rows(name) for name in self.tables.locations}
        for name, table in self.self_managed.items():
            touched[name] = table.take_touched_rows()
        return touched

    def export_rows(
        self, physical_table: str, chunk_rows: int = 65536
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(row ids, rows) of a physical table in chunks of `chunk_rows`; rows are copies."""
        if chunk_rows < 1:
            raise ConfigError(f"chunk_rows must be >= 1, got {chunk_rows}")
        if physical_table in self.self_managed:
            yield from self.self_managed[physical_table].export_rows(chunk_rows)
            return
        weight = self._static_weight(physical_table)
        for start in range(0, weight.shape[0], chunk_rows):
            stop = min(start + chunk_rows, weight.shape[0])
            yield (
                torch.arange(start, stop, device=weight.device),
                weight[start:stop].detach().clone(),
            )

    def load_rows(self, physical_table: str, row_ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Write `rows` at `row_ids` of a physical table (the inverse of export_rows).
        Everything is checked before anything is written."""
        if physical_table in self.self_managed:
            self.self_managed[physical_table].load_rows(row_ids, rows)
            return
        weight = self._static_weight(physical_table)
        row_ids = check_id_dtype(row_ids, f"{physical_table} row_ids").to(weight.device)
        num_rows, dim = weight.shape
        if row_ids.dim() != 1 or tuple(rows.shape) != (row_ids.numel(), dim):
            raise EmbeddingTableError(
                f"physical table {physical_table!r}: load_rows takes row_ids [N] and rows "
                f"[N, {dim}], got {tuple(row_ids.shape)} and {tuple(rows.shape)}"
            )
        if not rows.is_floating_point():
            raise EmbeddingTableError(
                f"physical table {physical_table!r}: rows must be floating point, got {rows.dtype}"
            )
        if row_ids.numel() and (int(row_ids.min()) < 0 or int(row_ids.max()) >= num_rows):
            bad = int(row_ids.min()) if int(row_ids.min()) < 0 else int(row_ids.max())
            raise IdError(
                f"physical table {physical_table!r}: row id {bad} is outside [0, {num_rows})"
            )
        with torch.no_grad():
            weight.index_copy_(0, row_ids, rows.to(device=weight.device, dtype=weight.dtype))
        self.tables.mark_touched(physical_table, row_ids)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of weights allocated per logical table, and their sum under "total"
        (optimizer state not included for static tables)."""
        sizes = {name: 0 for name in self.configs}
        for table in self.physical_tables():
            if table.logical_table not in self.self_managed:
                sizes[table.logical_table] += table.memory_bytes
        for name, table in self.self_managed.items():
            sizes[name] = table.memory_bytes()
        sizes[TOTAL_KEY] = sum(sizes.values())
        return sizes

    def num_parameters(self) -> dict[str, int]:
        """Weights (rows * dim) allocated per logical table, and their sum under "total"."""
        counts = {name: 0 for name in self.configs}
        for table in self.physical_tables():
            if table.logical_table not in self.self_managed:
                counts[table.logical_table] += table.num_parameters
        for name, table in self.self_managed.items():
            counts[name] = table.num_parameters()
        counts[TOTAL_KEY] = sum(counts.values())
        return counts

    def set_learning_rate(self, lr: float) -> None:
        """Learning rate of the fused optimizer of every static table."""
        if self.optimizer_config is None:
            raise ConfigError("this collection has no fused optimizer (optimizer=None)")
        for lookup in self.tables.lookups:
            lookup.set_learning_rate(lr)

    def set_graphhash_mapping(self, table: str, mapping: GraphHashMappingLike) -> None:
        """Use `mapping` for graphhash table `table`; its rows must match the allocated rows."""
        config = self.configs.get(table)
        if config is None or not config.method.takes_mapping:
            mapped = [name for name, c in self.configs.items() if c.method.takes_mapping]
            raise ConfigError(
                f"set_graphhash_mapping: {table!r} is not a table of this collection that takes "
                f"a mapping (graphhash); such tables: {', '.join(mapped) or 'none'}"
            )
        allocated = self.plans[table].physical[0].num_rows
        if mapping.num_rows != allocated:
            raise ConfigError(
                f"table {table!r}: the mapping has {mapping.num_rows} rows but the table was "
                f"allocated {allocated} rows; build the collection with mappings= to size it"
            )
        new_transforms = {
            feature: transform_for(config, feature, mapping, self.plans[table])
            for feature, name in self.feature_to_table.items()
            if name == table
        }
        self._store_mapping(table, mapping)
        self._transforms.update(new_transforms)
        self._batched_transforms.clear()
        self._kernel_terms.clear()
        self._kernel_plans.clear()

    # ---- construction -------------------------------------------------------------------------

    def _store_mapping(self, table: str, mapping: GraphHashMappingLike) -> None:
        if isinstance(mapping, nn.Module):
            self.graphhash_mappings[table] = mapping
        else:
            self._loose_mappings[table] = mapping

    def _mapping(self, table: str) -> GraphHashMappingLike | None:
        if table in self.graphhash_mappings:
            return self.graphhash_mappings[table]
        return self._loose_mappings.get(table)

    def _mapping_rows(self, table: str) -> int | None:
        mapping = self._mapping(table)
        return None if mapping is None else mapping.num_rows

    def _build_lookups(self) -> list[TableGroupLookup]:
        """Group physical tables: one pooled group per dtype, one `rows` group per table whose
        combine precedes pooling (qr mult, a RowCombine); each table in one group, tables in
        order of first use. Every lookup of every feature gets a slot of its group, the slots
        sorted by table (fbgemm's CPU row-wise Adagrad needs a table's slots adjacent). With the
        fused kernels, every static table of a dtype is in one `fused` group, whatever its
        combine, but a RowCombine's (the kernels do not run it)."""
        groups: dict[tuple[str, str], _GroupLayout] = {}  # (kind, dtype or table) -> layout
        for feature, table_name in self.feature_to_table.items():
            config = self.configs[table_name]
            lookup = _FeatureLookup(
                feature, table_name, "self_managed", config.dim, config.pooling == "mean"
            )
            if not config.method.self_managed:
                plan = self.plans[table_name]
                # A table combined before pooling gets a lookup of its own: its unpooled
                # output then holds only its lookups side by side, so the combine reads
                # nearby memory.
                if self._fused and not isinstance(plan.combine, RowCombine):
                    key = ("fused", config.dtype)
                elif not pools_per_lookup(plan.combine):
                    key = ("rows", table_name)
                else:
                    key = ("pooled", config.dtype)
                layout = groups.setdefault(key, _GroupLayout(len(groups), key[0]))
                transform = self._transform_or_none(config, feature, plan)
                tables = (
                    transform.tables
                    if transform
                    else config.method.lookup_tables(config, plan, feature)
                )
                layout.add(feature, plan.physical, tables)
                lookup = replace(
                    lookup,
                    combine=plan.combine,
                    output_dim=config.method.output_dim(config, feature),
                    group=layout.index,
                )
            self._lookups[feature] = lookup
        self._group_kinds = [layout.kind for layout in groups.values()]
        lookups: list[TableGroupLookup] = []
        for layout in groups.values():
            slots = sorted(layout.slots, key=lambda slot: slot[0])
            for feature in layout.features:
                positions = sorted(
                    (p for p, (_, f, _) in enumerate(slots) if f == feature),
                    key=lambda p: slots[p][2],
                )
                self._lookups[feature] = replace(self._lookups[feature], slots=tuple(positions))
            slot_tables = [table for table, _, _ in slots]
            self._slot_features.append([feature for _, feature, _ in slots])
            self._slot_lookups.append([j for _, _, j in slots])
            dims = [layout.tables[t].dim for t in slot_tables]
            self._slot_columns.append([sum(dims[:s]) for s in range(len(dims) + 1)])
            if layout.kind == "fused":
                lookups.append(self._fused_group(layout))
            elif self.optimizer_config is None or self.backend != "fbgemm":
                lookups.append(
                    TorchLookup(layout.tables, slot_tables, self.optimizer_config, self.device)
                )
            else:
                lookups.append(
                    TableBatchedLookup(
                        layout.tables, slot_tables, self.optimizer_config, self.device
                    )
                )
        return lookups

    def _fused_group(self, layout: _GroupLayout) -> TableGroupLookup:
        """The FusedTableGroup of a `fused` group layout; records each feature's columns."""
        from embedding_tables.kernels.group import FusedTableGroup
        from embedding_tables.kernels.layout import feature_spec

        specs = []
        column = 0
        for feature in layout.features:
            config = self.configs[self.feature_to_table[feature]]
            plan = self.plans[config.name]
            spec = feature_spec(
                feature,
                plan,
                self._transforms.get(feature),
                config.method.lookup_tables(config, plan, feature),
            )
            specs.append(spec)
            self._lookups[feature] = replace(
                self._lookups[feature], fused_columns=(column, column + spec.output_dim)
            )
            column += spec.output_dim
        return FusedTableGroup(layout.tables, specs, self.optimizer_config, self.device)

    def _transform_or_none(
        self, config: TableConfig, feature: str, plan: TablePlan
    ) -> IndexTransform | None:
        """Build and keep the feature's transform; None for a table that takes a mapping
        (graphhash) and has none yet."""
        mapping = self._mapping(config.name)
        if config.method.takes_mapping and mapping is None:
            return None
        transform = transform_for(config, feature, mapping, plan)
        self._transforms[feature] = transform
        return transform

    # ---- forward steps ------------------------------------------------------------------------

    def _feature_lookup(self, feature: str) -> _FeatureLookup:
        if feature not in self._lookups:
            raise FeatureError(
                f"unknown feature {feature!r}; configured features: {', '.join(self._lookups)}"
            )
        return self._lookups[feature]

    def _transform(self, feature: str) -> IndexTransform:
        if feature not in self._transforms:
            table = self.feature_to_table[feature]
            raise ConfigError(
                f"feature {feature!r}: graphhash table {table!r} has no mapping yet; pass "
                f"mappings={{{table!r}: mapping}} or call ec.set_graphhash_mapping"
            )
        return self._transforms[feature]

    def _batched_transform(self, group: int) -> BatchedTransform:
        if group not in self._batched_transforms:
            self._batched_transforms[group] = BatchedTransform(
                [
                    (self._transform(feature), j)
                    for feature, j in zip(
                        self._slot_features[group], self._slot_lookups[group], strict=True
                    )
                ]
            )
        return self._batched_transforms[group]

    def _split(self, features: KeyedJaggedTensor) -> _Batch:
        """Check the KJT against the configured features and cut it per feature; its layout
        too unless it is a CheckedKJT (`embedding_tables.checked`), checked where it entered."""
        keys = features.keys()
        missing = [f for f in self.feature_to_table if f not in keys]
        unknown = [k for k in keys if k not in self.feature_to_table]
        if missing or unknown:
            problems = []
            if missing:
                problems.append(f"missing {', '.join(map(repr, missing))}")
            if unknown:
                problems.append(f"unknown {', '.join(map(repr, unknown))}")
            raise FeatureError(
                f"KeyedJaggedTensor features do not match the collection: {'; '.join(problems)}"
                f"; configured: {', '.join(self.feature_to_table)}"
            )
        checked = isinstance(features, CheckedKJT)
        if not checked and features.variable_stride_per_key():
            raise FeatureError("KeyedJaggedTensor with a batch size per feature is not supported")
        values = features.values()
        lengths = features.lengths()
        weights = features.weights_or_none()
        if checked:
            counts = features.length_per_key()
        else:
            counts = check_layout(keys, features.stride(), values, lengths, weights)
        values = values.to(device=self.device, dtype=torch.int64)
        lengths = lengths.to(device=self.device, dtype=torch.int64)
        weights = None if weights is None else weights.to(self.device, torch.float32)
        ids = values.split(counts)
        per_key_lengths = lengths.view(len(keys), features.stride())
        per_key_weights = weights.split(counts) if weights is not None else [None] * len(keys)
        return _Batch(
            keys=list(keys),
            values=values,
            lengths=lengths,
            weights=weights,
            features={
                key: _FeatureBatch(ids[i], per_key_lengths[i], per_key_weights[i])
                for i, key in enumerate(keys)
            },
            counts=list(counts),
            batch_size=features.stride(),
        )

    def _group_indices(self, batch: _Batch, group: int) -> tuple[torch.Tensor, list[int], bool]:
        """Step 1, the index transform, for every slot of a group: (physical rows in slot order,
        ids per slot, whether the slots are exactly the KJT's features in its order)."""
        slot_features = self._slot_features[group]
        slot_ids = [batch.features[feature].ids for feature in slot_features]
        same_layout = slot_features == batch.keys
        indices = self._batched_transform(group)(slot_ids, batch.values if same_layout else None)
        return indices, [ids.numel() for ids in slot_ids], same_layout

    def _pooling_weights(
        self, lookup: _FeatureLookup, feature: _FeatureBatch
    ) -> torch.Tensor | None:
        """Per-id weights of a pooled lookup: the KJT's weights, divided by the bag length for
        mean pooling; None when plain summing is what is asked."""
        if not lookup.mean:
            return feature.weights
        bag_sizes = feature.lengths.repeat_interleave(feature.lengths)
        weights = 1.0 / bag_sizes.to(torch.float32)
        return weights if feature.weights is None else feature.weights * weights

    def _group_weights(self, batch: _Batch, group: int, same_layout: bool) -> torch.Tensor | None:
        slot_features = self._slot_features[group]
        if not any(self._lookups[f].mean for f in slot_features):
            if batch.weights is None:
                return None
            if same_layout:
                return batch.weights
        weights = {
            f: self._pooling_weights(self._lookups[f], batch.features[f])
            for f in set(slot_features)
        }
        return torch.cat(
            [
                weights[f]
                if weights[f] is not None
                else torch.ones(batch.features[f].ids.numel(), device=self.device)
                for f in slot_features
            ]
        )

    def _pooled_group_outputs(self, batch: _Batch) -> dict[int | str, torch.Tensor]:
        """Steps 1 and 2 of every group: [B, slot columns] keyed by group for pooled groups; for
        `rows` groups (qr mult, a RowCombine: pooled after the combine) each feature's [B, dim]
        keyed by name."""
        outputs: dict[int | str, torch.Tensor] = {}
        kernels = self._forward_kernels()
        kernel_groups = tuple(
            group
            for group in range(len(self._group_kinds))
            if kernels is not None and self._group_kernel_terms(group) is not None
        )
        if kernel_groups:
            outputs.update(self._kernel_outputs(kernels, batch, kernel_groups))
        for group, kind in enumerate(self._group_kinds):
            if group in kernel_groups:
                continue
            if kind == "rows":
                outputs.update(self._rows_pooled(batch, group))
                continue
            if kind == "fused":
                fused = self.tables.lookups[group]
                outputs[group] = fused.pooled(
                    batch.values,
                    bag_offsets(batch.lengths),
                    batch.batch_size,
                    batch.weights,
                    *self._fused_inputs(batch, group),
                )
                continue
            indices, counts, same_layout = self._group_indices(batch, group)
            lengths = (
                batch.lengths
                if same_layout
                else torch.cat([batch.features[f].lengths for f in self._slot_features[group]])
            )
            weights = self._group_weights(batch, group, same_layout)
            outputs[group] = self.tables.lookups[group].pooled(indices, lengths, weights, counts)
        return outputs

    def _forward_kernels(self) -> CpuKernels | None:
        """The CPU kernels, for a forward that needs no gradient on CPU (inference); None
        otherwise (training keeps the table-batched lookups and their fused backward)."""
        if self.device.type != "cpu" or torch.is_grad_enabled():
            return None
        return library()

    def _group_kernel_terms(self, group: int) -> list[_KernelTerm] | None:
        """The kernel terms of a `pooled` or `rows` group of fp32 tables; None for groups the
        kernels do not run (fused groups, graphhash, fp16)."""
        if group in self._kernel_terms:
            return self._kernel_terms[group]
        terms: list[_KernelTerm] | None = []
        lookup = self.tables.lookups[group]
        kind = self._group_kinds[group]
        rules = self._batched_transform(group).rules
        columns = self._slot_columns[group]
        if kind == "pooled":
            for s, rule in enumerate(rules):
                transform = kernel_transform_of([rule])
                if transform is None:
                    terms = None
                    break
                terms.append(
                    _KernelTerm(
                        rule.feature,
                        transform,
                        (lookup.slot_tables[s],),
                        (columns[s], columns[s + 1]),
                    )
                )
        elif kind == "rows" and all(
            self._lookups[name].combine == "mult" for name in self._slot_features[group]
        ):
            for name in dict.fromkeys(self._slot_features[group]):
                slots = self._lookups[name].slots
                transform = kernel_transform_of([rules[s] for s in slots])
                if transform is None or transform.parts > MAX_PARTS:
                    terms = None
                    break
                terms.append(
                    _KernelTerm(name, transform, tuple(lookup.slot_tables[s] for s in slots), None)
                )
        else:
            terms = None
        if terms is not None and any(table.dtype != "fp32" for table in lookup.tables):
            terms = None
        self._kernel_terms[group] = terms
        return terms

    def _kernel_outputs(
        self, kernels: CpuKernels, batch: _Batch, groups: tuple[int, ...]
    ) -> dict[int | str, torch.Tensor]:
        """Steps 1 to 3 of `groups` in one call of the CPU kernels, one pass per term over its
        ids: each pooled group's [B, slot columns], each qr mult feature's [B, dim] (columns of
        one output shared by the mult features in feature order, so that a collection of
        only those returns it without a copy)."""
        plan = self._kernel_plan(groups, tuple(batch.keys))
        tables = [[lookup.weight(t) for t in refs] for lookup, refs in plan.tables]
        if plan.terms.tables_moved(tables):
            plan = self._kernel_plans[plan.key] = self._new_kernel_plan(*plan.key)
        batch_size = batch.batch_size
        outputs = [torch.empty(batch_size, width) for width in plan.terms.widths]
        failure = kernels.pooled(
            plan.terms,
            batch.values,
            batch.lengths,
            self._kernel_weights(batch),
            outputs,
        )
        if failure is not None:
            term = plan.entries[failure[0]][1]
            value = int(batch.values[failure[1]])
            raise out_of_range_error(term.feature, value, term.transform.limit)
        results: dict[int | str, torch.Tensor] = dict(zip(plan.groups, outputs, strict=False))
        for feature, start, end in plan.mult_columns:
            results[feature] = outputs[-1][:, start:end]
        return results

    def _kernel_plan(self, groups: tuple[int, ...], keys: tuple[str, ...]) -> _KernelPlan:
        key = (groups, keys)
        if key not in self._kernel_plans:
            self._kernel_plans[key] = self._new_kernel_plan(groups, keys)
        return self._kernel_plans[key]

    def _new_kernel_plan(self, groups: tuple[int, ...], keys: tuple[str, ...]) -> _KernelPlan:
        """The kernel terms of `groups` for a KJT with `keys`: output k < len(pooled groups) is
        pooled group k's, the last (if any term is a qr mult feature) the mult features'."""
        entries = [(g, term) for g in groups for term in self._group_kernel_terms(g) or ()]
        terms = PooledTerms([term.transform for _, term in entries])
        pooled_groups = tuple(g for g in groups if self._group_kinds[g] == "pooled")
        mult = sorted(
            (term.feature for _, term in entries if term.columns is None),
            key=self.feature_names.index,
        )
        mult_start = {}
        width = 0
        for feature in mult:
            mult_start[feature] = width
            width += self._lookups[feature].output_dim
        position = {name: i for i, name in enumerate(keys)}
        refs = []
        for k, (group, term) in enumerate(entries):
            lookup = self.tables.lookups[group]
            tables = [lookup.weight(t) for t in term.tables]
            if term.columns is None:
                output, column = len(pooled_groups), mult_start[term.feature]
            else:
                output, column = pooled_groups.index(group), term.columns[0]
            terms.set_term(k, position[term.feature], tables, output, column)
            refs.append((lookup, term.tables))
        mult_columns = [
            (f, mult_start[f], mult_start[f] + self._lookups[f].output_dim) for f in mult
        ]
        return _KernelPlan((groups, keys), entries, terms, pooled_groups, mult_columns, refs)

    def _kernel_weights(self, batch: _Batch) -> torch.Tensor | None:
        """Per-id pooling weights of the whole KJT, as `_pooling_weights` gives them feature by
        feature (the KJT's weights, over the bag length for mean pooling); None for plain
        sums."""
        means = [self._lookups[key].mean for key in batch.keys]
        if not any(means):
            return None if batch.weights is None else batch.weights.contiguous()
        flags = torch.tensor(means, device=self.device).repeat_interleave(batch.batch_size)
        per_bag = torch.where(flags, 1.0 / batch.lengths.to(torch.float32), 1.0)
        per_id = per_bag.repeat_interleave(batch.lengths, output_size=batch.values.numel())
        return per_id if batch.weights is None else batch.weights * per_id

    def _rows_pooled(self, batch: _Batch, group: int) -> dict[str, torch.Tensor]:
        """Steps 2 and 3 of a `rows` group: unpooled lookup, then combine and pooling of every
        feature (qr mult: in one autograd Function; a RowCombine: torch ops); keyed by
        feature."""
        names = sorted(set(self._slot_features[group]), key=self.feature_names.index)
        if self._combines_rows(group):
            combined = self._row_combined(batch, group)
            return {
                name: pool_rows(
                    combined[name],
                    batch.features[name].lengths,
                    self._pooling_weights(self._lookups[name], batch.features[name]),
                )
                for name in names
            }
        indices, counts, _ = self._group_indices(batch, group)
        rows = self.tables.lookups[group].rows_output(indices, counts)
        columns = self._slot_columns[group]
        features = []
        for name in names:
            lookup, feature = self._lookups[name], batch.features[name]
            features.append(
                UnpooledFeature(
                    columns=tuple((columns[s], columns[s + 1]) for s in lookup.slots),
                    count=feature.ids.numel(),
                    lengths=feature.lengths,
                    weights=self._pooling_weights(lookup, feature),
                )
            )
        return dict(zip(names, mult_pool(rows, features), strict=True))

    def _row_combined(self, batch: _Batch, group: int) -> dict[str, torch.Tensor]:
        """Steps 1 to 3 of a RowCombine group, unpooled: each feature's [N_f, output_dim],
        combined once per distinct id and gathered back (a batch repeats ids: MovieLens'
        history reads a few thousand items tens of times each, and ttrec's core rows are wide);
        keyed by feature."""
        slot_features = self._slot_features[group]
        distinct = {
            name: torch.unique(batch.features[name].ids, return_inverse=True)
            for name in dict.fromkeys(slot_features)
        }
        slot_ids = [distinct[name][0] for name in slot_features]
        indices = self._batched_transform(group)(slot_ids, None)
        rows = self.tables.lookups[group].rows(indices, [ids.numel() for ids in slot_ids])
        combined = {}
        for name, (_, inverse) in distinct.items():
            lookup = self._lookups[name]
            values = combine_rows(lookup.combine, [rows[s] for s in lookup.slots])
            combined[name] = values.index_select(0, inverse)
        return combined

    def _combines_rows(self, group: int) -> bool:
        """Whether a group's features are combined by a RowCombine (its table's)."""
        first = self._lookups[self._slot_features[group][0]]
        return isinstance(first.combine, RowCombine)

    def _fused_inputs(
        self, batch: _Batch, group: int
    ) -> tuple[list[int], list[int], dict[int, torch.Tensor]]:
        """A fused group's inputs beyond the KJT: each of its features' position among the
        KJT's keys, the ids per key, and the rows of its features whose transforms the kernels
        do not run (graphhash mappings: run as torch ops)."""
        fused = self.tables.lookups[group]
        names = [spec.name for spec in fused.layout.features]
        given = {}
        for f, spec in enumerate(fused.layout.features):
            if spec.given_rows:
                rows = self._transform(spec.name)(batch.features[spec.name].ids)
                given[f] = torch.stack(rows, dim=1)
        return [batch.keys.index(name) for name in names], batch.counts, given

    def _fused_sequence(self, batch: _Batch, group: int) -> dict[str, torch.Tensor]:
        """Unpooled rows of a fused group's features, keyed by feature."""
        fused = self.tables.lookups[group]
        features, counts, given = self._fused_inputs(batch, group)
        rows = fused.sequence(batch.values, counts, features, given)
        return {spec.name: r for spec, r in zip(fused.layout.features, rows, strict=True)}

    def _group_rows(self, batch: _Batch, group: int) -> list[torch.Tensor]:
        """Steps 1 and 2 unpooled: the rows of every slot of a group."""
        indices, counts, _ = self._group_indices(batch, group)
        return self.tables.lookups[group].rows(indices, counts)

    def _pooled_feature(
        self,
        lookup: _FeatureLookup,
        batch: _Batch,
        group_outputs: dict[int | str, torch.Tensor],
    ) -> torch.Tensor | tuple[int, int, int]:
        """Step 3 for one feature: its pooled [B, output_dim], or (group, first column, end
        column) when it is a plain column range of a group's output (so it need not be
        copied)."""
        feature = batch.features[lookup.feature]
        if lookup.combine == "self_managed":
            # The table applies its config's pooling (sum or mean) itself.
            return self.self_managed[lookup.table].pooled(
                feature.ids, bag_offsets(feature.lengths), feature.weights
            )
        if self._group_kinds[lookup.group] == "fused":
            return (lookup.group, *lookup.fused_columns)
        if not pools_per_lookup(lookup.combine):
            return group_outputs[lookup.feature]
        output = group_outputs[lookup.group]
        columns = self._slot_columns[lookup.group]
        if lookup.combine == "add":
            return sum(output[:, columns[s] : columns[s + 1]] for s in lookup.slots)
        if all(b == a + 1 for a, b in zip(lookup.slots, lookup.slots[1:], strict=False)):
            return (lookup.group, columns[lookup.slots[0]], columns[lookup.slots[-1] + 1])
        return torch.cat([output[:, columns[s] : columns[s + 1]] for s in lookup.slots], dim=1)

    def _concat_columns(
        self,
        pieces: list[torch.Tensor | tuple[int, int, int]],
        group_outputs: dict[int | str, torch.Tensor],
    ) -> torch.Tensor:
        """[B, sum of output dims]; a group's output itself when it already is exactly that."""
        if all(isinstance(p, tuple) for p in pieces) and len({p[0] for p in pieces}) == 1:
            output = group_outputs[pieces[0][0]]
            spans = [(p[1], p[2]) for p in pieces]
            contiguous = all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
            if contiguous and spans[0][0] == 0 and spans[-1][1] == output.shape[1]:
                return output
        tensors = [
            group_outputs[p[0]][:, p[1] : p[2]] if isinstance(p, tuple) else p for p in pieces
        ]
        whole = _side_by_side(tensors)
        return torch.cat(tensors, dim=1) if whole is None else whole

    def _static_weight(self, physical_table: str) -> torch.Tensor:
        if physical_table not in self.tables.locations:
            names = [t.name for t in self.physical_tables()]
            raise ConfigError(
                f"unknown physical table {physical_table!r}; physical tables: {', '.join(names)}"
            )
        return self.tables.weight(physical_table)


def _side_by_side(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The [B, all columns] tensor that `tensors` are the columns of, in order, when they are
    exactly that (views side by side in one buffer, none needing a gradient); else None."""
    first = tensors[0]
    rows, total = first.shape[0], sum(t.shape[1] for t in tensors)
    at = first.data_ptr()
    storage = first.untyped_storage().data_ptr()
    for t in tensors:
        if (
            t.requires_grad
            or t.dim() != 2
            or t.dtype != first.dtype
            or t.shape[0] != rows
            or t.stride() != (total, 1)
            or t.data_ptr() != at
            or t.untyped_storage().data_ptr() != storage
        ):
            return None
        at += t.shape[1] * t.element_size()
    return first.as_strided((rows, total), (total, 1))


def _check_tables(
    tables: Sequence[TableConfig],
    feature_to_table: Mapping[str, str],
    mappings: Mapping[str, GraphHashMappingLike],
) -> dict[str, TableConfig]:
    configs: dict[str, TableConfig] = {}
    for config in tables:
        if config.name in configs:
            raise ConfigError(f"two tables are named {config.name!r}; table names must be unique")
        if config.name == TOTAL_KEY:
            raise ConfigError(
                f"a table may not be named {TOTAL_KEY!r}: memory_bytes() reports the sum under it"
            )
        configs[config.name] = config
    if not feature_to_table:
        raise ConfigError("feature_to_table is empty; map at least one feature to a table")
    for feature, table in feature_to_table.items():
        if table not in configs:
            raise ConfigError(
                f"feature {feature!r} maps to unknown table {table!r}; tables: {', '.join(configs)}"
            )
    for name, config in configs.items():
        features = [f for f, t in feature_to_table.items() if t == name]
        if not features:
            raise ConfigError(f"table {name!r} has no feature mapped to it in feature_to_table")
        config.method.check(config, features)
        if config.dtype not in TORCH_DTYPES:
            raise ConfigError(f"table {name!r}: unsupported dtype {config.dtype!r}")
    for name in mappings:
        if name not in configs or not configs[name].method.takes_mapping:
            raise ConfigError(
                f"mappings names {name!r}, which is not a table that takes a mapping (graphhash)"
            )
    return configs
