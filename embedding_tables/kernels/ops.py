"""Launchers of the fused kernels: block sizes, per-call metadata, the backward's segment step,
and the typed errors the kernels' flags stand for.

`fused_forward` runs the one forward launch of a group; `fused_backward` sorts the saved
(row, id) entries by row with torch ops (the segment step), then runs the reduce pass and, when
needed, the update pass. Both take the group's flat weight buffer, so one launch serves every
table of the group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from embedding_tables.errors import IdError, OffsetsError
from embedding_tables.hashing import seed_key
from embedding_tables.kernels import triton_kernels as kernels
from embedding_tables.kernels.layout import (
    ERROR_FIELDS,
    KIND_ARITH,
    OPTIMIZER_CODES,
    SEGMENT_CALL_FIELDS,
    CallPlan,
    GroupLayout,
    division_magic,
)
from embedding_tables.transforms import out_of_range_error

# Elements a program keeps in flight: enough rows per program to cover memory latency, few
# enough to stay in registers (the backward's tiles carry more per element).
TILE_ELEMENTS = 4096
BACKWARD_TILE_ELEMENTS = 2048
# Most entries of one row that one backward item sums (longer runs are split, then re-summed).
ITEM_ENTRIES = 1024


@dataclass(frozen=True)
class ForwardBlocks:
    """Forward tile: bags per program, ids per bag per step, columns, warps."""

    bags: int
    ids: int
    d: int
    num_warps: int


@dataclass(frozen=True)
class BackwardBlocks:
    """Backward tiles: items per program and entries per item per step (pass 1); runs per
    program and partials per run per step (pass 2); most entries per item; warps."""

    items: int
    entries: int
    runs: int
    partials: int
    item_entries: int
    num_warps: int


def _pow2_at_least(value: float) -> int:
    return triton.next_power_of_2(max(1, math.ceil(value)))


def _check_tiles(tiles: ForwardBlocks | BackwardBlocks, sizes: tuple[int, ...], dim: int) -> None:
    if any(size < 1 or size & (size - 1) for size in sizes) or (
        isinstance(tiles, ForwardBlocks) and tiles.d < dim
    ):
        raise ValueError(
            f"{tiles}: tile sizes must be powers of two, and d >= the widest row {dim}"
        )


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def forward_blocks(
    layout: GroupLayout, pooled: bool, mean_bag: float, most_bags: int
) -> ForwardBlocks:
    """Block sizes for a forward launch: ids per step near the mean bag (at most 32), then as many
    bags as fill TILE_ELEMENTS."""
    block_d = _pow2_at_least(layout.max_dim)
    block_ids = _clamp(_pow2_at_least(mean_bag), 1, 32) if pooled else 1
    block_bags = _clamp(TILE_ELEMENTS // (block_ids * block_d), 1, 256)
    block_bags = min(block_bags, _pow2_at_least(most_bags))
    tile = block_bags * block_ids * block_d
    return ForwardBlocks(block_bags, block_ids, block_d, 8 if tile >= 4096 else 4)


def backward_blocks(layout: GroupLayout, mean_item: float) -> BackwardBlocks:
    """Block sizes for the backward: entries per step near the mean item (at most 16), then as
    many items as fill TILE_ELEMENTS."""
    block_d = _pow2_at_least(layout.max_dim)
    entries = _clamp(_pow2_at_least(mean_item), 1, 16)
    items = _clamp(BACKWARD_TILE_ELEMENTS // (entries * block_d), 1, 64)
    partials = 8
    runs = _clamp(BACKWARD_TILE_ELEMENTS // (partials * block_d), 1, 64)
    tile = items * entries * block_d
    return BackwardBlocks(items, entries, runs, partials, ITEM_ENTRIES, 8 if tile >= 2048 else 4)


class DeviceLayout:
    """A GroupLayout with its static metadata on the group's device, the forward's error flags
    and one-element stand-ins for pointer arguments a launch does not use."""

    def __init__(self, layout: GroupLayout, device: torch.device) -> None:
        self.layout = layout
        self.device = device
        self.segment_meta = layout.segment_meta().to(device)
        self.lookup_meta = layout.lookup_meta().to(device)
        self.errors = torch.zeros(len(ERROR_FIELDS), dtype=torch.int32, device=device)
        self.no_index = torch.zeros(1, dtype=torch.int64, device=device)
        self.no_float = torch.zeros(1, dtype=torch.float32, device=device)


@dataclass(frozen=True)
class DeviceCall:
    """A CallPlan with its metadata tables on the device (reusable by calls of the same shape)."""

    plan: CallPlan
    segment_call: torch.Tensor
    lookup_call: torch.Tensor

    @classmethod
    def of(cls, plan: CallPlan, device: torch.device) -> DeviceCall:
        return cls(plan, plan.segment_call.to(device), plan.lookup_call.to(device))


@dataclass
class SavedForBackward:
    """What a training forward leaves for its backward: the call and, per (lookup, id) entry,
    its global row (int32 when every row number fits) and packed (id position, lookup); per id
    position, its output row (int32) and pooling scale (None when every scale is 1)."""

    call: DeviceCall
    entry_rows: torch.Tensor
    entry_refs: torch.Tensor
    position_rows: torch.Tensor
    position_scales: torch.Tensor | None


def fused_forward(
    device_layout: DeviceLayout,
    weights: torch.Tensor,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    call: DeviceCall,
    pooled: bool,
    sample_weights: torch.Tensor | None = None,
    given_rows: torch.Tensor | None = None,
    save: bool = False,
    out: torch.Tensor | None = None,
    blocks: ForwardBlocks | None = None,
    check: bool = True,
) -> tuple[torch.Tensor, SavedForBackward | None]:
    """One launch: every segment's bags (pooled) or ids (sequence) of the group.

    Returns the flat output (pooled: [B * total columns], row-major [B, total columns];
    sequence: every feature's [N_f, output dim] block, at `plan.output_offsets`) and, with
    `save`, what the backward needs. `ids` int64 [N]; `offsets` int64 [F_in * B + 1];
    `sample_weights` fp32 [N] or None. With `check`, reads the kernel's error flags (one
    device-to-host copy) and raises IdError / OffsetsError as the CPU path would."""
    layout = device_layout.layout
    device = weights.device
    plan = call.plan
    num_ids = ids.numel()
    if save and plan.feature_counts is None:
        raise ValueError("saving for backward needs the per-feature id counts in the plan")
    if layout.has_given and given_rows is None:
        raise ValueError("this group has graphhash lookups: pass their given rows")
    if sample_weights is not None and sample_weights.numel() != num_ids:
        raise ValueError(f"{sample_weights.numel()} per-sample weights for {num_ids} ids")
    if out is None:
        out = torch.empty(plan.output_numel, dtype=torch.float32, device=device)
    elif out.numel() != plan.output_numel or not out.is_contiguous():
        raise ValueError(f"out must be contiguous with {plan.output_numel} elements")
    errors = device_layout.errors.zero_()
    no_index, no_float = device_layout.no_index, device_layout.no_float
    save_scales = save and (sample_weights is not None or layout.has_mean)
    if save:
        # Global rows as int32 when they fit: the backward's radix sort then does half the work.
        row_dtype = torch.int32 if layout.total_rows < 2**31 else torch.int64
        entry_rows = torch.empty(plan.num_entries, dtype=row_dtype, device=device)
        entry_refs = torch.empty(plan.num_entries, dtype=torch.int64, device=device)
        position_rows = torch.empty(num_ids, dtype=torch.int32, device=device)
        position_scales = (
            torch.empty(num_ids, dtype=torch.float32, device=device) if save_scales else None
        )
    if blocks is None:
        bags_in_input = max(1, offsets.numel() - 1)
        blocks = forward_blocks(layout, pooled, num_ids / bags_in_input, plan.most_bags)
    _check_tiles(blocks, (blocks.bags, blocks.ids, blocks.d), layout.max_dim)
    grid = (triton.cdiv(max(plan.most_bags, 1), blocks.bags), layout.num_segments)
    kernels.fused_lookup_kernel[grid](
        _or(ids, no_index),
        offsets,
        _or(sample_weights, no_float),
        _or(given_rows, no_index),
        weights,
        _or(out, no_float),
        _or(entry_rows if save else None, no_index),
        _or(entry_refs if save else None, no_index),
        _or(position_rows if save else None, no_index),
        _or(position_scales if save_scales else None, no_float),
        errors,
        device_layout.segment_meta,
        device_layout.lookup_meta,
        call.segment_call,
        call.lookup_call,
        num_ids,
        offsets.numel(),
        POOLED=pooled,
        HAS_SAMPLE_WEIGHTS=sample_weights is not None,
        HAS_GIVEN=given_rows is not None,
        SAVE=save,
        SAVE_SCALES=save_scales,
        EVEN_D=layout.even_dims and blocks.d == layout.max_dim,
        ROW_ALIGN=layout.row_alignment,
        BLOCK_BAGS=blocks.bags,
        BLOCK_IDS=blocks.ids,
        BLOCK_D=blocks.d,
        num_warps=blocks.num_warps,
    )
    if check:
        raise_for_errors(errors, layout, ids, offsets, plan)
    saved = None
    if save:
        saved = SavedForBackward(
            call,
            entry_rows,
            entry_refs,
            position_rows,
            position_scales,
        )
    return out, saved


def _or(tensor: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """`tensor`, or the placeholder when it is absent or empty (an empty CUDA tensor has no
    address to pass; the kernel reads nothing of it then)."""
    return placeholder if tensor is None or tensor.numel() == 0 else tensor


def raise_for_errors(
    errors: torch.Tensor,
    layout: GroupLayout,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    plan: CallPlan,
) -> None:
    """The typed error of the first flag the forward kernel set (none: return)."""
    flags = dict(zip(ERROR_FIELDS, errors.tolist(), strict=True))
    if flags["offsets_ends"] or flags["bag_offsets"]:
        first, last = offsets[0].item(), offsets[-1].item()
        raise OffsetsError(
            f"bag offsets do not describe the {ids.numel()} ids: offsets must start at 0, never "
            f"decrease, stay within each feature's ids and end at len(ids) = {ids.numel()} "
            f"(got first {first}, last {last}"
            + (", and a decreasing or out-of-range bag" if flags["bag_offsets"] else "")
            + ")"
        )
    if flags["id_out_of_range"]:
        raise _out_of_range_ids(layout, ids, offsets, plan)


def _out_of_range_ids(
    layout: GroupLayout, ids: torch.Tensor, offsets: torch.Tensor, plan: CallPlan
) -> IdError:
    """The CPU path's IdError naming the first feature (and its id) outside its table."""
    field = SEGMENT_CALL_FIELDS.index
    for f in layout.checked_features():
        segment = plan.segment_call[layout.feature_segments[f][0]].tolist()
        if plan.feature_counts is not None:
            start, end = segment[field("id_start")], segment[field("id_end")]
        else:
            bag_start = segment[field("bag_start")]
            start = int(offsets[bag_start])
            end = int(offsets[bag_start + segment[field("num_bags")]])
        feature_ids = ids[start:end]
        limit = next(
            rule.limit
            for lf, rule in zip(layout.lookup_features, layout.rules, strict=True)
            if lf == f and rule.kind == KIND_ARITH
        )
        outside = (feature_ids < 0) | (feature_ids >= limit)
        if bool(outside.any()):
            value = int(feature_ids[outside.nonzero()[0, 0]])
            return out_of_range_error(layout.features[f].name, value, limit)
    return IdError("an id is outside its table's range (the kernel flagged it)")


@dataclass(frozen=True)
class RowRuns:
    """The segment step: saved entries sorted by global row (stable), cut into runs (one per
    row) and items (at most `item_entries` entries of one run each)."""

    sorted_rows: torch.Tensor
    order: torch.Tensor
    is_head: torch.Tensor
    item_starts: torch.Tensor  # [num_items + 1]: sorted position of each item, then the end
    num_items: int
    num_runs: int
    num_long_runs: int  # runs of more than one item


def sort_entries_by_row(entry_rows: torch.Tensor, item_entries: int) -> RowRuns:
    """Sort the entries by row and find runs and items with torch ops; one device sync (the
    three counts)."""
    num_entries = entry_rows.numel()
    device = entry_rows.device
    sorted_rows, order = torch.sort(entry_rows, stable=True)
    positions = torch.arange(num_entries, device=device)
    is_head = torch.ones(num_entries, dtype=torch.bool, device=device)
    torch.ne(sorted_rows[1:], sorted_rows[:-1], out=is_head[1:])
    heads = torch.cummax(torch.where(is_head, positions, 0), dim=0).values
    offset_in_run = positions - heads
    item_start = offset_in_run % item_entries == 0
    counts = torch.stack([item_start.sum(), is_head.sum(), (offset_in_run == item_entries).sum()])
    num_items, num_runs, num_long_runs = counts.tolist()
    item_starts = torch.empty(num_items + 1, dtype=torch.int64, device=device)
    item_starts[:num_items] = _nonzero(item_start, num_items)
    item_starts[num_items] = num_entries
    return RowRuns(sorted_rows, order, is_head, item_starts, num_items, num_runs, num_long_runs)


def runs_for_pass_2(runs: RowRuns, only_long: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(first item, item count) of the runs pass 2 must finish: every run, or with `only_long`
    (pass 1 already updated single-item runs) the runs of several items."""
    device = runs.sorted_rows.device
    item_is_head = runs.is_head[runs.item_starts[: runs.num_items]]
    first_items = _nonzero(item_is_head, runs.num_runs)
    item_counts = torch.diff(
        first_items, append=torch.tensor([runs.num_items], dtype=torch.int64, device=device)
    )
    if not only_long:
        return first_items, item_counts, runs.num_runs
    long_runs = _nonzero(item_counts > 1, runs.num_long_runs)
    return first_items[long_runs], item_counts[long_runs], runs.num_long_runs


def fused_backward(
    device_layout: DeviceLayout,
    weights: torch.Tensor,
    momentum: torch.Tensor | None,
    dense_grad: torch.Tensor | None,
    touched: torch.Tensor,
    grad_output: torch.Tensor,
    saved: SavedForBackward,
    optimizer: str,
    learning_rate: float,
    eps: float,
    blocks: BackwardBlocks | None = None,
) -> None:
    """Apply `optimizer` ("rowwise_adagrad", "sgd", or "dense": write `dense_grad`) to every row
    the saved forward read, given the output's gradient; flag those rows in `touched`.

    Steps: the segment step (`sort_entries_by_row`), pass 1 (`reduce_row_gradients_kernel`:
    per item, its gradient; a whole-run item is applied at once unless qr mult partners are
    read in this pass), pass 2 when needed (`apply_row_updates_kernel`)."""
    layout = device_layout.layout
    num_entries = saved.call.plan.num_entries
    if num_entries == 0:
        return
    grad_output = grad_output.contiguous()
    item_entries = ITEM_ENTRIES if blocks is None else blocks.item_entries
    runs = sort_entries_by_row(saved.entry_rows, item_entries)
    if blocks is None:
        blocks = backward_blocks(layout, num_entries / runs.num_items)
    _check_tiles(blocks, (blocks.items, blocks.entries, blocks.runs, blocks.partials), 0)
    fuse = not layout.has_mult and optimizer != "dense"
    needs_pass_2 = not fuse or runs.num_long_runs > 0
    block_d = _pow2_at_least(layout.max_dim)
    device = weights.device
    partials = (
        torch.empty(runs.num_items, block_d, dtype=torch.float32, device=device)
        if needs_pass_2
        else device_layout.no_float
    )
    momentum = device_layout.no_float if momentum is None else momentum
    dense_grad = device_layout.no_float if dense_grad is None else dense_grad
    even_d = layout.even_dims and block_d == layout.max_dim
    code = OPTIMIZER_CODES[optimizer]
    kernels.reduce_row_gradients_kernel[(triton.cdiv(runs.num_items, blocks.items),)](
        grad_output,
        runs.sorted_rows,
        runs.order,
        runs.item_starts,
        saved.entry_rows,
        saved.entry_refs,
        saved.position_rows,
        device_layout.no_float if saved.position_scales is None else saved.position_scales,
        weights,
        momentum,
        dense_grad,
        partials,
        touched,
        device_layout.segment_meta,
        device_layout.lookup_meta,
        saved.call.segment_call,
        saved.call.lookup_call,
        runs.num_items,
        num_entries,
        layout.max_lookups_per_segment,
        learning_rate,
        eps,
        HAS_SCALES=saved.position_scales is not None,
        HAS_MULT=layout.has_mult,
        FUSE_UPDATE=fuse,
        OPTIMIZER=code,
        EVEN_D=even_d,
        ROW_ALIGN=layout.row_alignment,
        BLOCK_ITEMS=blocks.items,
        BLOCK_ENTRIES=blocks.entries,
        BLOCK_D=block_d,
        num_warps=blocks.num_warps,
    )
    if not needs_pass_2:
        return
    first_items, item_counts, num_runs = runs_for_pass_2(runs, only_long=fuse)
    kernels.apply_row_updates_kernel[(triton.cdiv(num_runs, blocks.runs),)](
        partials,
        first_items,
        item_counts,
        runs.item_starts,
        runs.sorted_rows,
        runs.order,
        saved.entry_refs,
        device_layout.lookup_meta,
        weights,
        momentum,
        dense_grad,
        num_runs,
        learning_rate,
        eps,
        OPTIMIZER=code,
        EVEN_D=even_d,
        ROW_ALIGN=layout.row_alignment,
        BLOCK_RUNS=blocks.runs,
        BLOCK_PARTIALS=blocks.partials,
        BLOCK_D=block_d,
        num_warps=4,
    )


def _nonzero(flags: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the set flags, whose number the caller already knows (no device sync where
    torch has nonzero_static for the device)."""
    try:
        return torch.nonzero_static(flags, size=count).flatten()
    except (AttributeError, NotImplementedError):
        return flags.nonzero().flatten()


def bucket(ids: torch.Tensor, seed: int, num_rows: int, block: int = 1024) -> torch.Tensor:
    """hashing.bucket(ids, seed, num_rows) computed by the Triton hash (int64 ids)."""
    ids = ids.contiguous()
    out = torch.empty_like(ids)
    values = [seed_key(seed), num_rows, *division_magic(num_rows)]
    params = torch.tensor(values, dtype=torch.int64, device=ids.device)
    grid = (triton.cdiv(max(ids.numel(), 1), block),)
    kernels.bucket_kernel[grid](ids, out, params, ids.numel(), BLOCK=block)
    return out
