"""Table-batched lookups of plain physical tables: the step after the index transform.

A lookup module owns a group of physical tables and a list of *slots*: slot s reads table
`slot_tables[s]` (several slots may read one table: unified chunks, features sharing a table).
`pooled` takes one row tensor per slot plus bag lengths and returns [B, sum of slot dims], the
slots side by side; `rows` returns the unpooled rows of every slot.

- `TableBatchedLookup`: fbgemm's SplitTableBatchedEmbeddingBagsCodegen (one call for all slots)
  with the sparse optimizer fused into its backward. Its weights are *not* nn.Parameters of this
  module: no dense optimizer can pick them up.
- `TorchLookup`: plain nn.Parameters and torch.nn.functional.embedding_bag, for training with
  a dense optimizer (`optimizer=None`).

Both record the rows that received a gradient (`take_touched`), for delta sync.
Neither writes its own state_dict entries: the owning `PhysicalTables` names them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
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


def bag_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """[0, cumsum(lengths)...]: offsets with the last one included, as fbgemm and torch take."""
    return torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)


def init_bound(num_rows: int) -> float:
    """Half-width of the uniform init: sqrt(1 / rows), torchrec's default for its tables."""
    return math.sqrt(1.0 / num_rows)


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

    def take_touched(self, table: int) -> torch.Tensor:
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
                bound = init_bound(table.num_rows)
                weight.uniform_(-bound, bound)
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


class TorchLookup(_Lookup):
    """Plain nn.Parameters looked up with torch ops: gradients land in `.grad` for a dense
    optimizer (dense gradients, as torchrec's EmbeddingBagCollection gives)."""

    def __init__(
        self, tables: Sequence[PhysicalTable], slot_tables: Sequence[int], device: torch.device
    ) -> None:
        super().__init__(tables, slot_tables, device)
        for t, table in enumerate(tables):
            bound = init_bound(table.num_rows)
            weight = torch.empty(
                table.num_rows, table.dim, dtype=TORCH_DTYPES[table.dtype], device=device
            ).uniform_(-bound, bound)
            self.register_parameter(f"table_{t}", nn.Parameter(weight))

    def weight(self, table: int) -> torch.Tensor:
        return getattr(self, f"table_{table}")

    def pooled(
        self,
        indices: torch.Tensor,
        lengths: torch.Tensor,
        weights: torch.Tensor | None,
        slot_counts: Sequence[int],
    ) -> torch.Tensor:
        """[B, sum of slot dims]: every slot's bags pooled, slots side by side."""
        slot_indices = indices.split(list(slot_counts))
        slot_lengths = lengths.view(len(self.slot_tables), -1)
        slot_weights = (
            weights.split(list(slot_counts)) if weights is not None else [None] * len(slot_counts)
        )
        outputs = []
        for s, table in enumerate(self.slot_tables):
            weight = self.weight(table)
            per_sample = slot_weights[s]
            pooled = F.embedding_bag(
                slot_indices[s],
                weight,
                bag_offsets(slot_lengths[s]),
                mode="sum",
                per_sample_weights=None if per_sample is None else per_sample.to(weight.dtype),
                include_last_offset=True,
            )
            outputs.append(pooled.float())
        output = torch.cat(outputs, dim=1)
        self._record_touched_in_backward(output, indices, slot_counts)
        return output

    def rows(self, indices: torch.Tensor, slot_counts: Sequence[int]) -> list[torch.Tensor]:
        """Unpooled rows per slot, [count, dim]."""
        outputs = []
        for table, slot_indices in zip(
            self.slot_tables, indices.split(list(slot_counts)), strict=True
        ):
            output = F.embedding(slot_indices, self.weight(table)).float()
            if output.requires_grad:
                output.register_hook(
                    lambda grad, table=table, rows=slot_indices: self.mark_touched(table, rows)
                )
            outputs.append(output)
        return outputs

    def rows_output(self, indices: torch.Tensor, slot_counts: Sequence[int]) -> torch.Tensor:
        """Unpooled rows of every slot side by side, [longest count, sum of slot dims]."""
        longest = max(slot_counts)
        padded = [
            F.pad(rows, (0, 0, 0, longest - rows.shape[0]))
            for rows in self.rows(indices, slot_counts)
        ]
        return torch.cat(padded, dim=1)
