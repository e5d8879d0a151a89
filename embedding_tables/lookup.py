"""Table-batched lookups of plain physical tables: the step after the index transform.

A lookup module owns a group of physical tables and a list of *slots*: slot s reads table
`slot_tables[s]` (several slots may read one table: unified chunks, features sharing a table).
`pooled` takes one row tensor per slot plus bag lengths and returns [B, sum of slot dims], the
slots side by side; `rows` returns the unpooled rows of every slot.

- `TableBatchedLookup`: fbgemm's SplitTableBatchedEmbeddingBagsCodegen (one call for all slots)
  with the sparse optimizer fused into its backward. Its weights are *not* nn.Parameters of this
  module: no dense optimizer can pick them up.
- `embedding_tables.torch_lookup.TorchLookup`: the same interface in torch ops, for any device,
  with the same sparse optimizer or none (dense gradients).

Both record the rows that received a gradient (`take_touched_rows`), for delta sync.
Neither writes its own state_dict entries: the owning `PhysicalTables` names them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
    BoundsCheckMode,
    EmbeddingLocation,
    PoolingMode,
)
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from torch import nn

from embedding_tables.optimizer import SparseOptimizerConfig
from embedding_tables.planning import PhysicalTable

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
_FBGEMM_PRECISION = {"fp32": SparseType.FP32, "fp16": SparseType.FP16}
_FBGEMM_OPTIMIZER = {
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "sgd": EmbOptimType.EXACT_SGD,
}


# fbgemm's TBE forward; registered for CUDA only by fbgemm-gpu's CUDA build.
_TBE_FORWARD_OP = "fbgemm::split_embedding_codegen_forward_unweighted_pt2_wrapper"
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def fbgemm_has_kernels(device_type: str) -> bool:
    """Whether fbgemm's TBE has kernels for `device_type` devices in this install: CPU in every
    build, CUDA only in fbgemm-gpu's CUDA build (the pinned fbgemm-gpu-cpu has none)."""
    key = _DISPATCH_KEYS.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(_TBE_FORWARD_OP, key)


def bag_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """[0, cumsum(lengths)...]: offsets with the last one included, as fbgemm and torch take
    (torch ops, so that every device has them)."""
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return offsets


def init_bound(num_rows: int) -> float:
    """Half-width of the uniform init: sqrt(1 / rows), torchrec's default for its tables."""
    return math.sqrt(1.0 / num_rows)


def init_weights_(weight: torch.Tensor, table: PhysicalTable) -> torch.Tensor:
    """Fill `weight` with `table`'s initial rows, in place: N(0, init_std) where its method set
    one, else uniform in ±init_bound."""
    if table.init_std is not None:
        return weight.normal_(0.0, table.init_std)
    bound = init_bound(table.num_rows)
    return weight.uniform_(-bound, bound)


class _Lookup(nn.Module):
    """What both lookups share: slots, the touched-row bitmap, no state_dict entries of their
    own. Inputs are concatenated in slot order: `indices` (rows), `lengths` ([S * B] bag
    lengths, pooled only), `weights` (per index, or None) and `slot_counts` (indices per slot)."""

    def __init__(
        self, tables: Sequence[PhysicalTable], slot_tables: Sequence[int], device: torch.device
    ) -> None:
        super().__init__()
        self.tables = tuple(tables)
        self.slot_tables = tuple(slot_tables)
        self.slot_dims = tuple(self.tables[t].dim for t in self.slot_tables)
        self.device = device
        starts = [0]
        for table in self.tables:
            starts.append(starts[-1] + table.num_rows)
        self._table_starts = starts
        self._slot_starts = torch.tensor([starts[t] for t in self.slot_tables], device=device)
        # One flag per row of every table of the group: set when the row gets an update.
        self._touched = torch.zeros(starts[-1], dtype=torch.bool, device=device)

    def weight(self, table: int) -> torch.Tensor:
        raise NotImplementedError

    def momentum(self, table: int) -> torch.Tensor | None:
        """The row-wise Adagrad accumulator of `table` (a view), or None if there is none."""
        return None

    def mark_touched(self, table: int, rows: torch.Tensor) -> None:
        self._touched.index_fill_(0, rows + self._table_starts[table], True)

    def take_touched_rows(self, table: int) -> torch.Tensor:
        """Rows of `table` that got a gradient (or were loaded) since the last call; resets."""
        flags = self._touched[self._table_starts[table] : self._table_starts[table + 1]]
        rows = flags.nonzero().flatten()
        flags.zero_()
        return rows

    def _record_touched_in_backward(
        self, output: torch.Tensor, indices: torch.Tensor, slot_counts: Sequence[int]
    ) -> None:
        """Flag the rows read by `indices` when `output` gets its gradient (the update follows
        in the same backward); a forward without backward flags nothing."""
        if not output.requires_grad:
            return

        def record(grad: torch.Tensor) -> None:
            starts = torch.repeat_interleave(
                self._slot_starts,
                torch.tensor(slot_counts, device=self.device),
                output_size=indices.numel(),
            )
            self._touched.index_fill_(0, indices + starts, True)

        output.register_hook(record)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """Saved by PhysicalTables under the physical table names, not here."""

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        """Loaded by PhysicalTables under the physical table names, not here."""


class TableBatchedLookup(_Lookup):
    """All tables of a group in one fbgemm TBE; row-wise Adagrad / SGD fused into backward.

    fbgemm's CPU row-wise Adagrad needs the slots of one table adjacent and tables in order,
    so `slot_tables` must be non-decreasing (the collection sorts its slots that way).
    """

    def __init__(
        self,
        tables: Sequence[PhysicalTable],
        slot_tables: Sequence[int],
        optimizer: SparseOptimizerConfig,
        device: torch.device,
    ) -> None:
        super().__init__(tables, slot_tables, device)
        if list(slot_tables) != sorted(slot_tables):
            raise ValueError(f"slot_tables must be non-decreasing, got {list(slot_tables)}")
        if optimizer.kind is None:
            raise ValueError("TableBatchedLookup needs a fused optimizer kind")
        on_cpu = device.type == "cpu"
        location = EmbeddingLocation.HOST if on_cpu else EmbeddingLocation.DEVICE
        compute = ComputeDevice.CPU if on_cpu else ComputeDevice.CUDA
        dtypes = {table.dtype for table in tables}
        if len(dtypes) != 1:
            raise ValueError(f"one TableBatchedLookup holds one dtype, got {sorted(dtypes)}")
        dtype = dtypes.pop()
        self.optimizer = optimizer
        tbe = SplitTableBatchedEmbeddingBagsCodegen(
            [(table.num_rows, table.dim, location, compute) for table in tables],
            feature_table_map=list(slot_tables),
            optimizer=_FBGEMM_OPTIMIZER[optimizer.kind],
            learning_rate=optimizer.lr,
            eps=optimizer.eps,
            weights_precision=_FBGEMM_PRECISION[dtype],
            output_dtype=SparseType.FP32,
            stochastic_rounding=False,
            pooling_mode=PoolingMode.SUM,
            bounds_check_mode=BoundsCheckMode.NONE,
            device=device,
            table_names=[table.name for table in tables],
        )
        # Kept out of the module tree: its weights must not reach .parameters() or state_dict.
        self._tbe = (tbe,)
        self._weights = tbe.split_embedding_weights()
        self._momenta = (
            [states[0] for states in tbe.split_optimizer_states()]
            if optimizer.kind == "rowwise_adagrad"
            else None
        )
        with torch.no_grad():
            for table, weight in zip(tables, self._weights, strict=True):
                init_weights_(weight, table)
            for momentum in self._momenta or ():
                momentum.fill_(optimizer.initial_accumulator_value)

    @property
    def tbe(self) -> SplitTableBatchedEmbeddingBagsCodegen:
        return self._tbe[0]

    def weight(self, table: int) -> torch.Tensor:
        return self._weights[table]

    def momentum(self, table: int) -> torch.Tensor | None:
        return None if self._momenta is None else self._momenta[table]

    def set_learning_rate(self, lr: float) -> None:
        self.tbe.set_learning_rate(lr)

    def pooled(
        self,
        indices: torch.Tensor,
        lengths: torch.Tensor,
        weights: torch.Tensor | None,
        slot_counts: Sequence[int],
    ) -> torch.Tensor:
        """[B, sum of slot dims]: every slot's bags pooled, slots side by side."""
        batch = lengths.numel() // len(self.slot_tables)
        if batch == 0:
            return torch.zeros(0, sum(self.slot_dims), device=self.device)
        output = self.tbe(indices, bag_offsets(lengths), weights)
        self._record_touched_in_backward(output, indices, slot_counts)
        return output

    def rows_output(self, indices: torch.Tensor, slot_counts: Sequence[int]) -> torch.Tensor:
        """Unpooled rows of every slot side by side, [longest count, sum of slot dims] (slot s
        fills its first counts[s] rows): one pooled call in which every index is a bag of its
        own (fbgemm's CPU backward is far faster so than with PoolingMode.NONE)."""
        longest = max(slot_counts)
        if longest == 0:
            return torch.zeros(0, sum(self.slot_dims), device=self.device)
        if min(slot_counts) == longest:
            offsets = torch.arange(indices.numel() + 1, device=self.device)
        else:
            lengths = (
                torch.arange(longest, device=self.device)
                < torch.tensor(slot_counts, device=self.device).unsqueeze(1)
            ).flatten()
            offsets = bag_offsets(lengths.to(torch.int64))
        output = self.tbe(indices, offsets)
        self._record_touched_in_backward(output, indices, slot_counts)
        return output

    def rows(self, indices: torch.Tensor, slot_counts: Sequence[int]) -> list[torch.Tensor]:
        """Unpooled rows per slot, [count, dim]."""
        output = self.rows_output(indices, slot_counts)
        columns = output.split(list(self.slot_dims), dim=1)
        return [column[:count] for column, count in zip(columns, slot_counts, strict=True)]
