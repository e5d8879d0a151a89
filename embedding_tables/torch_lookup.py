"""TorchLookup: a group's plain physical tables looked up with torch ops, on any device.

The `torch` backend (`embedding_tables.backend`): the CUDA default where fbgemm-gpu's CUDA build
is missing, every device's lookup with EMBTAB_LOOKUP=torch, and every lookup with
`optimizer=None` outside the Triton path. It has `lookup.TableBatchedLookup`'s interface (slots,
inputs, fp32 outputs, touched rows) and its state: per table a weight [rows, dim] and, for
row-wise Adagrad, a momentum [rows] fp32, so state_dicts move between the two unchanged.

- With a sparse optimizer the weights are plain tensors, never nn.Parameters. Each lookup call
  is one autograd Function: forward is `embedding_bag` / `embedding` on the weights; backward
  gives every index its gradient, then `optimizer.sparse_step` sums them per row of each table
  over the whole call and updates those rows only, as fbgemm's fused backward does.
  Per-sample weights get their gradient (from the rows before the update), as in fbgemm.
- With `optimizer=None` the tables are nn.Parameters and autograd gives dense gradients, for a
  dense optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from embedding_tables.errors import ConfigError
from embedding_tables.lookup import TORCH_DTYPES, _Lookup, bag_offsets, init_weights_
from embedding_tables.optimizer import SparseOptimizerConfig, sparse_step
from embedding_tables.planning import PhysicalTable


class TorchLookup(_Lookup):
    """Tables of a group in torch ops; see the module docstring."""

    def __init__(
        self,
        tables: Sequence[PhysicalTable],
        slot_tables: Sequence[int],
        optimizer: SparseOptimizerConfig | None,
        device: torch.device,
    ) -> None:
        super().__init__(tables, slot_tables, device)
        self.optimizer = optimizer if optimizer is not None and optimizer.kind else None
        self.learning_rate = self.optimizer.lr if self.optimizer else 0.0
        self.slot_columns = [0]
        for dim in self.slot_dims:
            self.slot_columns.append(self.slot_columns[-1] + dim)
        # Slots of each table, for the per-table update.
        self.table_slots = {
            t: [s for s, table in enumerate(self.slot_tables) if table == t]
            for t in sorted(set(self.slot_tables))
        }
        weights = []
        for table in tables:
            weights.append(
                init_weights_(
                    torch.empty(
                        table.num_rows, table.dim, dtype=TORCH_DTYPES[table.dtype], device=device
                    ),
                    table,
                )
            )
        self._weights: list[torch.Tensor] | None = None
        self._momenta: list[torch.Tensor] | None = None
        if self.optimizer is None:
            for t, weight in enumerate(weights):
                self.register_parameter(f"table_{t}", nn.Parameter(weight))
        else:
            self._weights = weights
            if self.optimizer.kind == "rowwise_adagrad":
                self._momenta = [
                    torch.full(
                        (table.num_rows,),
                        self.optimizer.initial_accumulator_value,
                        dtype=torch.float32,
                        device=device,
                    )
                    for table in tables
                ]
        # Makes the output require grad when the weights are not parameters (sparse optimizer).
        self._anchor = torch.zeros(0, device=device, requires_grad=True)

    def weight(self, table: int) -> torch.Tensor:
        if self._weights is None:
            return getattr(self, f"table_{table}")
        return self._weights[table]

    def momentum(self, table: int) -> torch.Tensor | None:
        return None if self._momenta is None else self._momenta[table]

    def set_learning_rate(self, lr: float) -> None:
        if self.optimizer is None:
            raise ConfigError("this table group has no sparse optimizer (optimizer=None)")
        self.learning_rate = lr

    # ---- lookups ----------------------------------------------------------------------------

    def pooled(
        self,
        indices: torch.Tensor,
        lengths: torch.Tensor,
        weights: torch.Tensor | None,
        slot_counts: Sequence[int],
    ) -> torch.Tensor:
        """[B, sum of slot dims]: every slot's bags pooled, slots side by side."""
        if self.optimizer is None:
            output = self.pool(indices, lengths, weights, slot_counts)
        else:
            output = _PooledStep.apply(
                self._anchor, self, indices, lengths, weights, tuple(slot_counts)
            )
        self._record_touched_in_backward(output, indices, slot_counts)
        return output

    def rows(self, indices: torch.Tensor, slot_counts: Sequence[int]) -> list[torch.Tensor]:
        """Unpooled rows per slot, [count, dim]."""
        slot_indices = indices.split(list(slot_counts))
        if self.optimizer is None:
            outputs = self.gather(slot_indices)
        else:
            outputs = _RowsStep.apply(self._anchor, self, *slot_indices)
        for table, rows, output in zip(self.slot_tables, slot_indices, outputs, strict=True):
            if output.requires_grad:
                output.register_hook(
                    lambda grad, table=table, rows=rows: self.mark_touched(table, rows)
                )
        return list(outputs)

    def rows_output(self, indices: torch.Tensor, slot_counts: Sequence[int]) -> torch.Tensor:
        """Unpooled rows of every slot side by side, [longest count, sum of slot dims]."""
        longest = max(slot_counts)
        padded = [
            F.pad(rows, (0, 0, 0, longest - rows.shape[0]))
            for rows in self.rows(indices, slot_counts)
        ]
        return torch.cat(padded, dim=1)

    # ---- the steps: gather + pool, per-index gradients, the update ---------------------------

    def pool(
        self,
        indices: torch.Tensor,
        lengths: torch.Tensor,
        weights: torch.Tensor | None,
        slot_counts: Sequence[int],
    ) -> torch.Tensor:
        """The pooled forward: one `embedding_bag` (sum) per slot, fp32 out."""
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
        return torch.cat(outputs, dim=1)

    def gather(self, slot_indices: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The unpooled forward: each slot's rows, fp32."""
        return [
            F.embedding(indices, self.weight(table)).float()
            for table, indices in zip(self.slot_tables, slot_indices, strict=True)
        ]

    def update(
        self, slot_indices: Sequence[torch.Tensor], slot_grads: Sequence[torch.Tensor | None]
    ) -> None:
        """The sparse optimizer step of one lookup call: per table, the indices of all its slots
        and their gradients (None: the slot's output got no gradient) in one `sparse_step`."""
        for table, slots in self.table_slots.items():
            used = [s for s in slots if slot_grads[s] is not None]
            if not used:
                continue
            sparse_step(
                self.weight(table),
                self.momentum(table),
                torch.cat([slot_indices[s] for s in used]),
                torch.cat([slot_grads[s] for s in used]),
                self.optimizer,
                self.learning_rate,
            )


class _PooledStep(torch.autograd.Function):
    """A pooled lookup whose backward is the sparse optimizer step (no weight gradient)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        anchor: torch.Tensor,
        lookup: TorchLookup,
        indices: torch.Tensor,
        lengths: torch.Tensor,
        weights: torch.Tensor | None,
        slot_counts: tuple[int, ...],
    ) -> torch.Tensor:
        ctx.lookup = lookup
        ctx.slot_counts = slot_counts
        ctx.save_for_backward(indices, lengths, weights)
        return lookup.pool(indices, lengths, weights, slot_counts)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor) -> tuple:
        indices, lengths, weights = ctx.saved_tensors
        lookup: TorchLookup = ctx.lookup
        grad_output = grad_output.float()
        slot_indices = indices.split(list(ctx.slot_counts))
        slot_lengths = lengths.view(len(ctx.slot_counts), -1)
        slot_weights = weights.split(list(ctx.slot_counts)) if weights is not None else None
        bags = torch.arange(slot_lengths.shape[1], device=grad_output.device)
        grads, weight_grads = [], []
        for s, table in enumerate(lookup.slot_tables):
            bag_of_index = torch.repeat_interleave(
                bags, slot_lengths[s], output_size=slot_indices[s].numel()
            )
            columns = slice(lookup.slot_columns[s], lookup.slot_columns[s + 1])
            grad = grad_output[:, columns].index_select(0, bag_of_index)
            if slot_weights is not None:
                if ctx.needs_input_grad[4]:
                    rows = lookup.weight(table).index_select(0, slot_indices[s]).float()
                    weight_grads.append((grad * rows).sum(dim=1).to(weights.dtype))
                grad = grad * slot_weights[s].float().unsqueeze(1)
            grads.append(grad)
        weights_grad = torch.cat(weight_grads) if ctx.needs_input_grad[4] else None
        lookup.update(slot_indices, grads)
        return None, None, None, None, weights_grad, None


class _RowsStep(torch.autograd.Function):
    """An unpooled lookup (one output per slot) whose backward is the sparse optimizer step."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        anchor: torch.Tensor,
        lookup: TorchLookup,
        *slot_indices: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        ctx.lookup = lookup
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*slot_indices)
        return tuple(lookup.gather(slot_indices))

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor | None) -> tuple:
        ctx.lookup.update(ctx.saved_tensors, grads)
        return (None, None) + (None,) * len(grads)
