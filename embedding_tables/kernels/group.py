"""FusedTableGroup: physical tables of one dtype in one flat buffer, looked up by the fused
Triton kernels (one launch for every table and feature of the group) with the sparse optimizer
fused into backward.

It has the interface of `embedding_tables.lookup`'s lookups that the collection relies on
(`weight`, `momentum`, `mark_touched`, `take_touched_rows`, `set_learning_rate`, no state_dict
entries of its own) but takes raw ids: the index transform runs inside the kernel.

- With a fused optimizer (`SparseOptimizerConfig` with a kind), the weights are plain tensors,
  never nn.Parameters, updated by backward (row-wise Adagrad or SGD on the touched rows).
- With `optimizer=None`, every table is an nn.Parameter viewing the flat buffer, and backward
  returns each table's dense gradient for a dense optimizer (which must update in place, as
  torch's optimizers do).

Per-sample weights scale the pooled rows; they get no gradient.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from embedding_tables.errors import ConfigError, FeatureError, OffsetsError
from embedding_tables.kernels import ops
from embedding_tables.kernels.layout import (
    KIND_GIVEN,
    FeatureSpec,
    GroupLayout,
    plan_call,
)
from embedding_tables.lookup import init_weights_
from embedding_tables.optimizer import SparseOptimizerConfig
from embedding_tables.planning import PhysicalTable

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Call metadata kept on the device for this many recent batch shapes.
CALL_CACHE_SIZE = 16


@dataclass(frozen=True)
class _Call:
    """One lookup call: the inputs and the metadata of where things are in this batch."""

    ids: torch.Tensor
    offsets: torch.Tensor
    device_call: ops.DeviceCall
    pooled: bool
    sample_weights: torch.Tensor | None
    given_rows: torch.Tensor | None
    save: bool


class FusedTableGroup(nn.Module):
    """Tables and features of one fused lookup; see the module docstring."""

    def __init__(
        self,
        tables: Sequence[PhysicalTable],
        features: Sequence[FeatureSpec],
        optimizer: SparseOptimizerConfig | None,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.device = torch.device(device)
        layout = GroupLayout(features, tables)
        self.layout = layout
        self.device_layout = ops.DeviceLayout(layout, self.device)
        self.tables = layout.tables
        self.optimizer = optimizer if optimizer is not None and optimizer.kind else None
        self.learning_rate = self.optimizer.lr if self.optimizer else 0.0
        self.check_inputs = True
        self.forward_blocks: ops.ForwardBlocks | None = None
        self.backward_blocks: ops.BackwardBlocks | None = None
        self._calls: OrderedDict[tuple, ops.DeviceCall] = OrderedDict()
        dtype = TORCH_DTYPES[layout.dtype]
        flat = torch.empty(layout.total_elements, dtype=dtype, device=self.device)
        with torch.no_grad():
            for t, table in enumerate(self.tables):
                init_weights_(self._table_view(flat, t), table)
        self._flat = flat
        self._momentum = None
        if self.optimizer is None:
            for t in range(len(self.tables)):
                self.register_parameter(f"table_{t}", nn.Parameter(self._table_view(flat, t)))
        elif self.optimizer.kind == "rowwise_adagrad":
            self._momentum = torch.full(
                (layout.total_rows,),
                self.optimizer.initial_accumulator_value,
                dtype=torch.float32,
                device=self.device,
            )
        # One flag per row of every table: set when the row gets an update.
        self._touched = torch.zeros(layout.total_rows, dtype=torch.uint8, device=self.device)
        # Makes the output require grad when the weights are not parameters (fused optimizer).
        self._anchor = torch.zeros(0, device=self.device, requires_grad=True)

    @property
    def flat_weights(self) -> torch.Tensor:
        """The one buffer holding every table's rows (table t at layout.table_offsets[t])."""
        return self._flat

    # ---- the lookup interface the collection uses -------------------------------------------

    def weight(self, table: int) -> torch.Tensor:
        if self.optimizer is None:
            return getattr(self, f"table_{table}")
        return self._table_view(self._flat, table)

    def momentum(self, table: int) -> torch.Tensor | None:
        """The row-wise Adagrad accumulator of `table` (a view), or None if there is none."""
        if self._momentum is None:
            return None
        start = self.layout.table_row_starts[table]
        return self._momentum[start : start + self.tables[table].num_rows]

    def mark_touched(self, table: int, rows: torch.Tensor) -> None:
        self._touched.index_fill_(0, rows + self.layout.table_row_starts[table], 1)

    def take_touched_rows(self, table: int) -> torch.Tensor:
        """Rows of `table` that got a gradient (or were loaded) since the last call; resets."""
        start = self.layout.table_row_starts[table]
        flags = self._touched[start : start + self.tables[table].num_rows]
        rows = flags.nonzero().flatten()
        flags.zero_()
        return rows

    def set_learning_rate(self, lr: float) -> None:
        if self.optimizer is None:
            raise ConfigError("this table group has no fused optimizer (optimizer=None)")
        self.learning_rate = lr

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """Saved by the owner under the physical table names, not here."""

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        """Loaded by the owner under the physical table names, not here."""

    # ---- lookups -----------------------------------------------------------------------------

    def pooled(
        self,
        ids: torch.Tensor,
        offsets: torch.Tensor,
        batch_size: int,
        sample_weights: torch.Tensor | None = None,
        input_features: Sequence[int] | None = None,
        input_counts: Sequence[int] | None = None,
        given: Mapping[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """[B, layout.total_columns]: every feature's pooled rows, side by side in layout order.

        `ids` int64 [N] and `offsets` int64 [F_in * B + 1] are the jagged bags of F_in input
        features (torchrec's KJT layout: feature-major); layout feature f is input feature
        `input_features[f]` (default: f). `input_counts`: ids per input feature, if the caller
        knows them (else read from `offsets` when needed: one device sync). `given`: per layout
        feature with graphhash lookups, its rows [N_f, lookups]."""
        features = self._input_features(input_features)
        if batch_size == 0:
            return torch.zeros(0, self.layout.total_columns, device=self.device)
        expected = self._num_inputs(features) * batch_size + 1
        if offsets.numel() < expected:
            raise FeatureError(
                f"offsets has {offsets.numel()} entries; {batch_size} bags of each input feature "
                f"need at least {expected}"
            )
        save = self._needs_backward()
        if input_counts is None and (save or self.layout.has_given):
            input_counts = _counts_from_offsets(offsets, batch_size)
        if input_counts is not None:
            _check_counts(input_counts, ids.numel())
        call = self._device_call(True, batch_size, ids.numel(), features, input_counts)
        output = self._run(ids, offsets, call, True, sample_weights, given, save)
        return output.view(batch_size, self.layout.total_columns)

    def sequence(
        self,
        ids: torch.Tensor,
        input_counts: Sequence[int],
        input_features: Sequence[int] | None = None,
        given: Mapping[int, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Unpooled rows of every layout feature, [N_f, output dim], from the ids of the input
        features (counts `input_counts`, concatenated)."""
        features = self._input_features(input_features)
        _check_counts(input_counts, ids.numel())
        save = self._needs_backward()
        call = self._device_call(False, 0, ids.numel(), features, input_counts)
        output = self._run(ids, self.device_layout.no_index, call, False, None, given, save)
        plan = call.plan
        pieces = []
        for f, spec in enumerate(self.layout.features):
            start = plan.output_offsets[f]
            count = plan.feature_counts[f] * spec.output_dim
            pieces.append(output[start : start + count].view(-1, spec.output_dim))
        return pieces

    # ---- internals ---------------------------------------------------------------------------

    def _table_view(self, flat: torch.Tensor, table: int) -> torch.Tensor:
        start = self.layout.table_offsets[table]
        rows, dim = self.tables[table].num_rows, self.tables[table].dim
        return flat[start : start + rows * dim].view(rows, dim)

    def _parameters_in_place(self) -> list[torch.Tensor]:
        """The dense-mode table parameters, checked to still view the flat buffer."""
        parameters = [getattr(self, f"table_{t}") for t in range(len(self.tables))]
        for t, parameter in enumerate(parameters):
            expected = self._table_view(self._flat, t)
            if parameter.data_ptr() != expected.data_ptr() or parameter.dtype != expected.dtype:
                raise ConfigError(
                    f"physical table {self.tables[t].name!r}: its parameter no longer views the "
                    "group's buffer (was .data replaced or the dtype changed?); update tables in "
                    "place (copy_, load_state_dict)"
                )
        return parameters

    def _needs_backward(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        if self.optimizer is None:
            return any(parameter.requires_grad for parameter in self.parameters())
        return True

    def _input_features(self, input_features: Sequence[int] | None) -> list[int]:
        if input_features is None:
            return list(range(len(self.layout.features)))
        if len(input_features) != len(self.layout.features):
            raise FeatureError(
                f"input_features names {len(input_features)} features; the group has "
                f"{len(self.layout.features)}"
            )
        return list(input_features)

    @staticmethod
    def _num_inputs(features: Sequence[int]) -> int:
        return max(features) + 1

    def _device_call(
        self,
        pooled: bool,
        batch_size: int,
        num_ids: int,
        features: Sequence[int],
        counts: Sequence[int] | None,
    ) -> ops.DeviceCall:
        """The call's metadata on the device, reused while batches keep their shape."""
        key = (
            pooled,
            batch_size,
            num_ids,
            tuple(features),
            None if counts is None else tuple(counts),
        )
        call = self._calls.get(key)
        if call is None:
            plan = plan_call(self.layout, pooled, batch_size, num_ids, features, counts)
            call = ops.DeviceCall.of(plan, self.device)
            self._calls[key] = call
            if len(self._calls) > CALL_CACHE_SIZE:
                self._calls.popitem(last=False)
        else:
            self._calls.move_to_end(key)
        return call

    def _given_rows(self, given: Mapping[int, torch.Tensor] | None) -> torch.Tensor | None:
        """Given rows of every KIND_GIVEN lookup, concatenated in lookup order."""
        if not self.layout.has_given:
            return None
        pieces = []
        seen: dict[int, int] = {}
        for lookup, f in enumerate(self.layout.lookup_features):
            if self.layout.rules[lookup].kind != KIND_GIVEN:
                continue
            if given is None or f not in given:
                raise ConfigError(
                    f"feature {self.layout.features[f].name!r}: its graphhash rows were not given"
                )
            j = seen.get(f, 0)
            seen[f] = j + 1
            pieces.append(given[f][:, j].to(device=self.device, dtype=torch.int64))
        return torch.cat(pieces)

    def _run(
        self,
        ids: torch.Tensor,
        offsets: torch.Tensor,
        device_call: ops.DeviceCall,
        pooled: bool,
        sample_weights: torch.Tensor | None,
        given: Mapping[int, torch.Tensor] | None,
        save: bool,
    ) -> torch.Tensor:
        ids = ids.to(device=self.device, dtype=torch.int64).contiguous()
        offsets = offsets.to(device=self.device, dtype=torch.int64).contiguous()
        if sample_weights is not None:
            sample_weights = sample_weights.to(device=self.device, dtype=torch.float32)
            sample_weights = sample_weights.contiguous()
        call = _Call(
            ids, offsets, device_call, pooled, sample_weights, self._given_rows(given), save
        )
        parameters = self._parameters_in_place() if self.optimizer is None else []
        return _FusedLookup.apply(self, call, self._anchor, *parameters)


class _FusedLookup(torch.autograd.Function):
    """The group's forward launch; backward applies the fused optimizer (or returns the
    tables' dense gradients when they are parameters)."""

    @staticmethod
    def forward(ctx, group: FusedTableGroup, call: _Call, anchor, *parameters):  # type: ignore[override]
        output, saved = ops.fused_forward(
            group.device_layout,
            group._flat,
            call.ids,
            call.offsets,
            call.device_call,
            call.pooled,
            sample_weights=call.sample_weights,
            given_rows=call.given_rows,
            save=call.save,
            blocks=group.forward_blocks,
            check=group.check_inputs,
        )
        ctx.group = group
        ctx.saved = saved
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        group: FusedTableGroup = ctx.group
        saved: ops.SavedForBackward | None = ctx.saved
        num_parameters = 0 if group.optimizer is not None else len(group.tables)
        if saved is None:
            return (None, None, None) + (None,) * num_parameters
        if group.optimizer is None:
            dense = torch.zeros(group.layout.total_elements, device=group.device)
            ops.fused_backward(
                group.device_layout,
                group._flat,
                None,
                dense,
                group._touched,
                grad_output,
                saved,
                "dense",
                0.0,
                0.0,
                blocks=group.backward_blocks,
            )
            grads = tuple(
                group._table_view(dense, t).to(group._flat.dtype) for t in range(num_parameters)
            )
            return (None, None, None, *grads)
        ops.fused_backward(
            group.device_layout,
            group._flat,
            group._momentum,
            None,
            group._touched,
            grad_output,
            saved,
            group.optimizer.kind,
            group.learning_rate,
            group.optimizer.eps,
            blocks=group.backward_blocks,
        )
        return None, None, None


def _counts_from_offsets(offsets: torch.Tensor, batch_size: int) -> list[int]:
    """Ids per input feature, read from the offsets at feature boundaries (one device sync)."""
    values = offsets[::batch_size].tolist()
    return [b - a for a, b in zip(values, values[1:], strict=False)]


def _check_counts(counts: Sequence[int], num_ids: int) -> None:
    if any(count < 0 for count in counts) or sum(counts) != num_ids:
        raise OffsetsError(
            f"the ids per feature ({list(counts)}) do not describe the {num_ids} ids: each must "
            "be >= 0 and they must sum to len(ids); the offsets decrease or do not end at "
            "len(ids)"
        )
