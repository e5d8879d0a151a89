"""The Triton kernels of a fused table group, in named steps.

Forward (`fused_lookup_kernel`, one launch for every table and feature of a group): per program
a block of bags of one segment; per chunk of ids: index transform (`index_transform`), gather
(`gather_rows`), combine (sum or product over the segment's lookups), pooling (sum, weighted, mean
at the end). Sequence lookups are the same kernel with every id a bag of its own.

Backward (`reduce_row_gradients_kernel`, then `apply_row_updates_kernel` when needed): the saved
(row, id) entries sorted by row are cut into items of at most `chunk` entries of one row; pass 1
sums each item's gradient (the output gradient of the id's bag, times its pooling scale, times
the other partitions' rows for qr mult) and, when the item is its row's whole run and nothing
else reads rows in this pass, applies the optimizer there (`apply_row_updates`); otherwise it
writes the item's partial sum, and pass 2 sums a run's partials and applies the optimizer.
No dense gradient is formed (except for `OPTIMIZER_DENSE`, which writes one for a dense
optimizer).

The hash is `hashing.bucket` bit for bit: splitmix64 in uint64 lanes (wrapping multiplies,
logical shifts), the low 63 bits, mod the row count (by multiply-high with a precomputed magic
number, exact for 63-bit numerators). All offsets are int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

from embedding_tables.hashing import GOLDEN_GAMMA, MIX_MULTIPLIER_1, MIX_MULTIPLIER_2
from embedding_tables.kernels.layout import (
    ERROR_FIELDS,
    KIND_ARITH,
    KIND_HASH,
    LOOKUP_BITS,
    LOOKUP_CALL_FIELDS,
    LOOKUP_FIELDS,
    OPTIMIZER_CODES,
    SEGMENT_CALL_FIELDS,
    SEGMENT_FIELDS,
)

# The splitmix64 constants the kernels inline must be the ones of embedding_tables.hashing.
assert (GOLDEN_GAMMA, MIX_MULTIPLIER_1, MIX_MULTIPLIER_2) == (
    0x9E3779B97F4A7C15,
    0xBF58476D1CE4E5B9,
    0x94D049BB133111EB,
)

SEGMENT_WIDTH = tl.constexpr(len(SEGMENT_FIELDS))
SEG_DIM = tl.constexpr(SEGMENT_FIELDS.index("dim"))
SEG_FIRST_LOOKUP = tl.constexpr(SEGMENT_FIELDS.index("first_lookup"))
SEG_END_LOOKUP = tl.constexpr(SEGMENT_FIELDS.index("end_lookup"))
SEG_IS_MULT = tl.constexpr(SEGMENT_FIELDS.index("is_mult"))
SEG_IS_MEAN = tl.constexpr(SEGMENT_FIELDS.index("is_mean"))
SEG_OWNS_POSITIONS = tl.constexpr(SEGMENT_FIELDS.index("owns_positions"))

LOOKUP_WIDTH = tl.constexpr(len(LOOKUP_FIELDS))
LK_SEGMENT = tl.constexpr(LOOKUP_FIELDS.index("segment"))
LK_KIND = tl.constexpr(LOOKUP_FIELDS.index("kind"))
LK_TABLE_OFFSET = tl.constexpr(LOOKUP_FIELDS.index("table_offset"))
LK_TABLE_ROW_START = tl.constexpr(LOOKUP_FIELDS.index("table_row_start"))
LK_DIM = tl.constexpr(LOOKUP_FIELDS.index("dim"))
LK_KEY = tl.constexpr(LOOKUP_FIELDS.index("key"))
LK_DIVISOR = tl.constexpr(LOOKUP_FIELDS.index("divisor"))
LK_MODULUS = tl.constexpr(LOOKUP_FIELDS.index("modulus"))
LK_LIMIT = tl.constexpr(LOOKUP_FIELDS.index("limit"))
LK_OUT_OF_RANGE_HASH = tl.constexpr(LOOKUP_FIELDS.index("out_of_range_hash"))
LK_RANGE_KEY = tl.constexpr(LOOKUP_FIELDS.index("range_key"))
LK_MODULUS_MAGIC = tl.constexpr(LOOKUP_FIELDS.index("modulus_magic"))
LK_MODULUS_SHIFT = tl.constexpr(LOOKUP_FIELDS.index("modulus_shift"))
LK_DIVISOR_MAGIC = tl.constexpr(LOOKUP_FIELDS.index("divisor_magic"))
LK_DIVISOR_SHIFT = tl.constexpr(LOOKUP_FIELDS.index("divisor_shift"))
LK_LIMIT_MAGIC = tl.constexpr(LOOKUP_FIELDS.index("limit_magic"))
LK_LIMIT_SHIFT = tl.constexpr(LOOKUP_FIELDS.index("limit_shift"))

SEGMENT_CALL_WIDTH = tl.constexpr(len(SEGMENT_CALL_FIELDS))
SC_BAG_START = tl.constexpr(SEGMENT_CALL_FIELDS.index("bag_start"))
SC_NUM_BAGS = tl.constexpr(SEGMENT_CALL_FIELDS.index("num_bags"))
SC_OUT_BASE = tl.constexpr(SEGMENT_CALL_FIELDS.index("out_base"))
SC_OUT_STRIDE = tl.constexpr(SEGMENT_CALL_FIELDS.index("out_stride"))
SC_ID_START = tl.constexpr(SEGMENT_CALL_FIELDS.index("id_start"))
SC_ID_END = tl.constexpr(SEGMENT_CALL_FIELDS.index("id_end"))

LOOKUP_CALL_WIDTH = tl.constexpr(len(LOOKUP_CALL_FIELDS))
LC_ENTRY_SHIFT = tl.constexpr(LOOKUP_CALL_FIELDS.index("entry_shift"))
LC_GIVEN_SHIFT = tl.constexpr(LOOKUP_CALL_FIELDS.index("given_shift"))

ERROR_ID_OUT_OF_RANGE = tl.constexpr(ERROR_FIELDS.index("id_out_of_range"))
ERROR_BAG_OFFSETS = tl.constexpr(ERROR_FIELDS.index("bag_offsets"))
ERROR_OFFSETS_ENDS = tl.constexpr(ERROR_FIELDS.index("offsets_ends"))

KIND_HASH_CODE = tl.constexpr(KIND_HASH)
KIND_ARITH_CODE = tl.constexpr(KIND_ARITH)
ENTRY_LOOKUP_BITS = tl.constexpr(LOOKUP_BITS)
ENTRY_LOOKUP_MASK = tl.constexpr((1 << LOOKUP_BITS) - 1)
OPTIMIZER_DENSE = tl.constexpr(OPTIMIZER_CODES["dense"])
OPTIMIZER_ADAGRAD = tl.constexpr(OPTIMIZER_CODES["rowwise_adagrad"])


# ---- step 1: index transform -----------------------------------------------------------------


@triton.jit
def splitmix64_mix(z):
    """splitmix64's finaliser on uint64 lanes: xor-shift-multiply twice, xor-shift."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def divide(n, divisor, magic, shift):
    """floor(n / divisor) for int64 0 <= n < 2**63 by one multiply-high, with the divisor's
    (magic, shift) from layout.division_magic (a 64-bit division is a ~70-instruction routine
    on the GPU)."""
    high = tl.umulhi(n.to(tl.uint64, bitcast=True), magic.to(tl.uint64, bitcast=True))
    quotient = (high >> shift.to(tl.uint64)).to(tl.int64, bitcast=True)
    return tl.where(divisor == 1, n, quotient)


@triton.jit
def bucket_rows(ids, key, num_rows, magic, shift):
    """hashing.bucket_keyed: (splitmix64(id + key) & (2**63 - 1)) % num_rows, as int64."""
    z = ids.to(tl.uint64, bitcast=True) + key.to(tl.uint64, bitcast=True)
    low63 = (splitmix64_mix(z) & 0x7FFFFFFFFFFFFFFF).to(tl.int64, bitcast=True)
    return low63 - divide(low63, num_rows, magic, shift) * num_rows


@triton.jit
def aligned(offsets, ALIGN: tl.constexpr):
    """`offsets`, multiples of ALIGN, written so that the compiler can prove it (gathered rows
    then load as 16-byte vectors, masks hold per vector)."""
    return (offsets // ALIGN) * ALIGN


@triton.jit
def any_set_2d(flags):
    """Whether any lane of a 2-D boolean tile is set (a scalar)."""
    return tl.max(tl.max(flags.to(tl.int32), axis=1), axis=0) > 0


@triton.jit
def index_transform(
    ids,
    positions,
    id_mask,
    lookup_meta_ptr,
    lookup_call_ptr,
    given_rows_ptr,
    errors_ptr,
    lookup,
    HAS_GIVEN: tl.constexpr,
):
    """Physical rows of lookup `lookup` for a tile of ids, as `transforms` computes them.

    Out-of-range ids of a full/qr lookup that refuses them read row 0 and set the error flag:
    the launcher raises the IdError after the kernel, and no address is ever out of bounds."""
    meta = lookup_meta_ptr + lookup * LOOKUP_WIDTH
    kind = tl.load(meta + LK_KIND)
    modulus = tl.load(meta + LK_MODULUS)
    modulus_magic = tl.load(meta + LK_MODULUS_MAGIC)
    modulus_shift = tl.load(meta + LK_MODULUS_SHIFT)
    if kind == KIND_HASH_CODE:
        key = tl.load(meta + LK_KEY)
        rows = bucket_rows(ids, key, modulus, modulus_magic, modulus_shift)
    elif kind == KIND_ARITH_CODE:
        limit = tl.load(meta + LK_LIMIT)
        outside = (ids < 0) | (ids >= limit)
        if tl.load(meta + LK_OUT_OF_RANGE_HASH) != 0:
            range_key = tl.load(meta + LK_RANGE_KEY)
            limit_magic = tl.load(meta + LK_LIMIT_MAGIC)
            limit_shift = tl.load(meta + LK_LIMIT_SHIFT)
            hashed = bucket_rows(ids, range_key, limit, limit_magic, limit_shift)
            in_range = tl.where(outside, hashed, ids)
        else:
            if any_set_2d(outside & id_mask):
                tl.store(errors_ptr + ERROR_ID_OUT_OF_RANGE, 1)
            in_range = tl.where(outside, 0, ids)
        divisor = tl.load(meta + LK_DIVISOR)
        digits = divide(
            in_range, divisor, tl.load(meta + LK_DIVISOR_MAGIC), tl.load(meta + LK_DIVISOR_SHIFT)
        )
        rows = digits - divide(digits, modulus, modulus_magic, modulus_shift) * modulus
    else:
        if HAS_GIVEN:
            shift = tl.load(lookup_call_ptr + lookup * LOOKUP_CALL_WIDTH + LC_GIVEN_SHIFT)
            rows = tl.load(given_rows_ptr + positions + shift, mask=id_mask, other=0)
        else:
            rows = ids * 0
    return rows


# ---- step 2: gather, combine, pool -----------------------------------------------------------


@triton.jit
def bag_bounds(offsets_ptr, bag_index, bag_mask, id_start, id_end, errors_ptr):
    """[start, end) of each bag's ids. A bag whose offsets decrease or leave its feature's ids
    [id_start, id_end) is flagged and read as empty, so bad offsets never address memory."""
    starts = tl.load(offsets_ptr + bag_index, mask=bag_mask, other=0)
    ends = tl.load(offsets_ptr + bag_index + 1, mask=bag_mask, other=0)
    valid = bag_mask & (starts >= id_start) & (ends >= starts) & (ends <= id_end)
    if tl.sum(bag_mask.to(tl.int32), axis=0) != tl.sum(valid.to(tl.int32), axis=0):
        tl.store(errors_ptr + ERROR_BAG_OFFSETS, 1)
    return tl.where(valid, starts, 0), tl.where(valid, ends, 0)


@triton.jit
def gather_rows(weights_ptr, table_offset, rows, dim, id_mask, d, d_mask):
    """Rows of one table for a [bags, ids] tile of row numbers, as fp32 [bags, ids, BLOCK_D];
    masked ids read nothing (0)."""
    row_starts = table_offset + rows * dim
    pointers = weights_ptr + row_starts[:, :, None] + d[None, None, :]
    mask = id_mask[:, :, None] & d_mask[None, None, :]
    return tl.load(pointers, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def fused_lookup_kernel(
    ids_ptr,
    offsets_ptr,
    sample_weights_ptr,
    given_rows_ptr,
    weights_ptr,
    out_ptr,
    entry_rows_ptr,
    entry_refs_ptr,
    position_rows_ptr,
    position_scales_ptr,
    errors_ptr,
    segment_meta_ptr,
    lookup_meta_ptr,
    segment_call_ptr,
    lookup_call_ptr,
    num_ids,
    num_offsets,
    POOLED: tl.constexpr,
    HAS_SAMPLE_WEIGHTS: tl.constexpr,
    HAS_GIVEN: tl.constexpr,
    SAVE: tl.constexpr,
    SAVE_SCALES: tl.constexpr,
    EVEN_D: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    BLOCK_BAGS: tl.constexpr,
    BLOCK_IDS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (bag blocks, segments): transform, gather, combine and pool BLOCK_BAGS bags of one
    segment, BLOCK_IDS ids of each at a time; write their [BLOCK_BAGS, dim] output block.
    With SAVE, also write what the backward needs: per (lookup, id) entry its global row and
    (id position, lookup); per id position its output row and pooling scale."""
    segment = tl.program_id(1)
    segment_meta = segment_meta_ptr + segment * SEGMENT_WIDTH
    segment_call = segment_call_ptr + segment * SEGMENT_CALL_WIDTH
    dim = tl.multiple_of(tl.load(segment_meta + SEG_DIM), ROW_ALIGN)
    first_lookup = tl.load(segment_meta + SEG_FIRST_LOOKUP)
    end_lookup = tl.load(segment_meta + SEG_END_LOOKUP)
    is_mult = tl.load(segment_meta + SEG_IS_MULT) != 0
    is_mean = tl.load(segment_meta + SEG_IS_MEAN) != 0
    owns_positions = tl.load(segment_meta + SEG_OWNS_POSITIONS) != 0
    bag_start = tl.load(segment_call + SC_BAG_START)
    num_bags = tl.load(segment_call + SC_NUM_BAGS)
    out_base = tl.multiple_of(tl.load(segment_call + SC_OUT_BASE), ROW_ALIGN)
    out_stride = tl.multiple_of(tl.load(segment_call + SC_OUT_STRIDE), ROW_ALIGN)

    bags = tl.program_id(0).to(tl.int64) * BLOCK_BAGS + tl.arange(0, BLOCK_BAGS)
    bag_mask = bags < num_bags
    if POOLED:
        if (tl.program_id(0) == 0) & (segment == 0):
            first = tl.load(offsets_ptr)
            last = tl.load(offsets_ptr + num_offsets - 1)
            if (first != 0) | (last != num_ids):
                tl.store(errors_ptr + ERROR_OFFSETS_ENDS, 1)
        id_start = tl.load(segment_call + SC_ID_START)
        id_end = tl.load(segment_call + SC_ID_END)
        starts, ends = bag_bounds(
            offsets_ptr, bag_start + bags, bag_mask, id_start, id_end, errors_ptr
        )
    else:
        starts = tl.where(bag_mask, bag_start + bags, 0)
        ends = tl.where(bag_mask, starts + 1, 0)
    lengths = ends - starts
    longest = tl.max(lengths, axis=0)

    d = tl.arange(0, BLOCK_D)
    d_mask = d < BLOCK_D if EVEN_D else aligned(d, ROW_ALIGN) < dim
    pooled = tl.zeros([BLOCK_BAGS, BLOCK_D], dtype=tl.float32)
    for chunk in range(0, longest, BLOCK_IDS):
        positions = starts[:, None] + chunk + tl.arange(0, BLOCK_IDS)[None, :]
        id_mask = positions < ends[:, None]
        ids = tl.load(ids_ptr + positions, mask=id_mask, other=0)
        # Combine: the product (mult) or sum (single, add) of the segment's lookups' rows.
        values = tl.zeros([BLOCK_BAGS, BLOCK_IDS, BLOCK_D], dtype=tl.float32) + is_mult.to(
            tl.float32
        )
        for lookup in range(first_lookup, end_lookup):
            rows = index_transform(
                ids,
                positions,
                id_mask,
                lookup_meta_ptr,
                lookup_call_ptr,
                given_rows_ptr,
                errors_ptr,
                lookup,
                HAS_GIVEN,
            )
            lookup_meta = lookup_meta_ptr + lookup * LOOKUP_WIDTH
            table_offset = tl.multiple_of(tl.load(lookup_meta + LK_TABLE_OFFSET), ROW_ALIGN)
            tile = gather_rows(weights_ptr, table_offset, rows, dim, id_mask, d, d_mask)
            values = tl.where(is_mult, values * tile, values + tile)
            if SAVE:
                shift = tl.load(lookup_call_ptr + lookup * LOOKUP_CALL_WIDTH + LC_ENTRY_SHIFT)
                row_start = tl.load(lookup_meta + LK_TABLE_ROW_START)
                tl.store(entry_rows_ptr + positions + shift, rows + row_start, mask=id_mask)
                refs = (positions << ENTRY_LOOKUP_BITS) + lookup
                tl.store(entry_refs_ptr + positions + shift, refs, mask=id_mask)
        if HAS_SAMPLE_WEIGHTS:
            samples = tl.load(sample_weights_ptr + positions, mask=id_mask, other=0.0)
            values = values * samples[:, :, None]
        pooled += tl.sum(values, axis=1)
        # Nested: Triton cannot `and` a constexpr with a runtime scalar.
        if SAVE:  # noqa: SIM102
            if owns_positions:
                out_rows = bags[:, None] + tl.zeros([BLOCK_BAGS, BLOCK_IDS], dtype=tl.int64)
                tl.store(position_rows_ptr + positions, out_rows, mask=id_mask)
                if SAVE_SCALES:
                    scales = tl.zeros([BLOCK_BAGS, BLOCK_IDS], dtype=tl.float32) + 1.0
                    if HAS_SAMPLE_WEIGHTS:
                        scales = samples
                    if is_mean:
                        scales = scales / tl.maximum(lengths, 1).to(tl.float32)[:, None]
                    tl.store(position_scales_ptr + positions, scales, mask=id_mask)
    if is_mean:
        pooled = pooled / tl.maximum(lengths, 1).to(tl.float32)[:, None]
    out_pointers = out_ptr + out_base + bags[:, None] * out_stride + d[None, :]
    tl.store(
        out_pointers,
        pooled.to(out_ptr.dtype.element_ty),
        mask=bag_mask[:, None] & d_mask[None, :],
    )


# ---- backward: gradient per row, then the optimizer ------------------------------------------


@triton.jit
def partner_product(
    weights_ptr,
    entry_rows_ptr,
    segment_meta_ptr,
    lookup_meta_ptr,
    lookup_call_ptr,
    segments,
    lookups,
    positions,
    entry_mask,
    d,
    d_mask,
    max_partners,
    ROW_ALIGN: tl.constexpr,
    BLOCK_ITEMS: tl.constexpr,
    BLOCK_ENTRIES: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """d(product of a segment's rows) / d(row of `lookups`) for a [items, entries] tile: the
    product of the same id's rows in the segment's other lookups (1 outside mult segments).
    Reads rows nobody writes during this pass."""
    segment_meta = segment_meta_ptr + segments * SEGMENT_WIDTH
    first = tl.load(segment_meta + SEG_FIRST_LOOKUP, mask=entry_mask, other=0)
    end = tl.load(segment_meta + SEG_END_LOOKUP, mask=entry_mask, other=0)
    is_mult = tl.load(segment_meta + SEG_IS_MULT, mask=entry_mask, other=0) != 0
    product = tl.zeros([BLOCK_ITEMS, BLOCK_ENTRIES, BLOCK_D], dtype=tl.float32) + 1.0
    for j in range(0, max_partners):
        partner = first + j
        valid = entry_mask & is_mult & (partner < end) & (partner != lookups)
        partner_meta = lookup_meta_ptr + partner * LOOKUP_WIDTH
        shift = tl.load(
            lookup_call_ptr + partner * LOOKUP_CALL_WIDTH + LC_ENTRY_SHIFT, mask=valid, other=0
        )
        global_rows = tl.load(entry_rows_ptr + positions + shift, mask=valid, other=0)
        table_offset = tl.load(partner_meta + LK_TABLE_OFFSET, mask=valid, other=0)
        row_start = tl.load(partner_meta + LK_TABLE_ROW_START, mask=valid, other=0)
        dim = tl.load(partner_meta + LK_DIM, mask=valid, other=0)
        row_starts = aligned(table_offset + (global_rows - row_start) * dim, ROW_ALIGN)
        pointers = weights_ptr + row_starts[:, :, None] + d[None, None, :]
        mask = valid[:, :, None] & d_mask[:, None, :]
        product = product * tl.load(pointers, mask=mask, other=1.0).to(tl.float32)
    return product


@triton.jit
def apply_row_updates(
    weights_ptr,
    momentum_ptr,
    dense_grad_ptr,
    row_offsets,
    global_rows,
    grad,
    row_mask,
    d,
    d_mask,
    dims,
    learning_rate,
    eps,
    OPTIMIZER: tl.constexpr,
):
    """The optimizer on a block of rows given each row's summed gradient [rows, BLOCK_D]:
    row-wise Adagrad (acc += mean(g^2); w -= lr * g / (sqrt(acc) + eps)), SGD (w -= lr * g), or,
    for a dense optimizer, the gradient written into the dense gradient buffer."""
    mask = row_mask[:, None] & d_mask
    pointers = row_offsets[:, None] + d[None, :]
    if OPTIMIZER == OPTIMIZER_DENSE:
        tl.store(dense_grad_ptr + pointers, grad, mask=mask)
    else:
        weight = tl.load(weights_ptr + pointers, mask=mask, other=0.0).to(tl.float32)
        if OPTIMIZER == OPTIMIZER_ADAGRAD:
            accumulator = tl.load(momentum_ptr + global_rows, mask=row_mask, other=0.0)
            accumulator += tl.sum(grad * grad, axis=1) / dims.to(tl.float32)
            tl.store(momentum_ptr + global_rows, accumulator, mask=row_mask)
            weight -= learning_rate * grad / (tl.sqrt(accumulator) + eps)[:, None]
        else:
            weight -= learning_rate * grad
        tl.store(weights_ptr + pointers, weight.to(weights_ptr.dtype.element_ty), mask=mask)


@triton.jit
def row_tables(
    sorted_rows_ptr,
    order_ptr,
    entry_refs_ptr,
    lookup_meta_ptr,
    first_positions,
    row_mask,
    ROW_ALIGN: tl.constexpr,
):
    """For rows given by a sorted position of one of their entries: global row, element offset
    of the row in the flat buffer, and row width."""
    global_rows = tl.load(sorted_rows_ptr + first_positions, mask=row_mask, other=0)
    first_entries = tl.load(order_ptr + first_positions, mask=row_mask, other=0)
    lookups = tl.load(entry_refs_ptr + first_entries, mask=row_mask, other=0) & ENTRY_LOOKUP_MASK
    meta = lookup_meta_ptr + lookups * LOOKUP_WIDTH
    table_offset = tl.load(meta + LK_TABLE_OFFSET, mask=row_mask, other=0)
    row_start = tl.load(meta + LK_TABLE_ROW_START, mask=row_mask, other=0)
    dims = tl.load(meta + LK_DIM, mask=row_mask, other=1)
    row_offsets = aligned(table_offset + (global_rows - row_start) * dims, ROW_ALIGN)
    return global_rows, row_offsets, dims


@triton.jit
def reduce_row_gradients_kernel(
    grad_ptr,
    sorted_rows_ptr,
    order_ptr,
    item_starts_ptr,
    entry_rows_ptr,
    entry_refs_ptr,
    position_rows_ptr,
    position_scales_ptr,
    weights_ptr,
    momentum_ptr,
    dense_grad_ptr,
    partials_ptr,
    touched_ptr,
    segment_meta_ptr,
    lookup_meta_ptr,
    segment_call_ptr,
    lookup_call_ptr,
    num_items,
    num_entries,
    max_partners,
    learning_rate,
    eps,
    HAS_SCALES: tl.constexpr,
    HAS_MULT: tl.constexpr,
    FUSE_UPDATE: tl.constexpr,
    OPTIMIZER: tl.constexpr,
    EVEN_D: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    BLOCK_ITEMS: tl.constexpr,
    BLOCK_ENTRIES: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Pass 1, grid (item blocks,): each item's gradient, the sum over its entries of the output
    gradient of the entry's bag row times the id's scale (times the partner rows for mult).
    With FUSE_UPDATE, an item that is its row's whole run is applied to the row here; every
    other item's sum goes to `partials` [items, BLOCK_D] for pass 2."""
    items = tl.program_id(0).to(tl.int64) * BLOCK_ITEMS + tl.arange(0, BLOCK_ITEMS)
    item_mask = items < num_items
    starts = tl.load(item_starts_ptr + items, mask=item_mask, other=0)
    ends = tl.load(item_starts_ptr + items + 1, mask=item_mask, other=0)
    global_rows, row_offsets, dims = row_tables(
        sorted_rows_ptr, order_ptr, entry_refs_ptr, lookup_meta_ptr, starts, item_mask, ROW_ALIGN
    )
    d = tl.arange(0, BLOCK_D)
    if EVEN_D:
        d_mask = (d < BLOCK_D)[None, :] & item_mask[:, None]
    else:
        d_mask = aligned(d, ROW_ALIGN)[None, :] < dims[:, None]
    grad = tl.zeros([BLOCK_ITEMS, BLOCK_D], dtype=tl.float32)
    longest = tl.max(ends - starts, axis=0)
    for chunk in range(0, longest, BLOCK_ENTRIES):
        index = starts[:, None] + chunk + tl.arange(0, BLOCK_ENTRIES)[None, :]
        entry_mask = index < ends[:, None]
        entries = tl.load(order_ptr + index, mask=entry_mask, other=0)
        refs = tl.load(entry_refs_ptr + entries, mask=entry_mask, other=0)
        positions = refs >> ENTRY_LOOKUP_BITS
        lookups = refs & ENTRY_LOOKUP_MASK
        segments = tl.load(
            lookup_meta_ptr + lookups * LOOKUP_WIDTH + LK_SEGMENT, mask=entry_mask, other=0
        )
        segment_call = segment_call_ptr + segments * SEGMENT_CALL_WIDTH
        out_base = tl.load(segment_call + SC_OUT_BASE, mask=entry_mask, other=0)
        out_stride = tl.load(segment_call + SC_OUT_STRIDE, mask=entry_mask, other=0)
        out_rows = tl.load(position_rows_ptr + positions, mask=entry_mask, other=0)
        grad_starts = aligned(out_base + out_rows * out_stride, ROW_ALIGN)
        mask = entry_mask[:, :, None] & d_mask[:, None, :]
        pointers = grad_ptr + grad_starts[:, :, None] + d[None, None, :]
        contributions = tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALES:
            scales = tl.load(position_scales_ptr + positions, mask=entry_mask, other=0.0)
            contributions = contributions * scales[:, :, None]
        if HAS_MULT:
            contributions = contributions * partner_product(
                weights_ptr,
                entry_rows_ptr,
                segment_meta_ptr,
                lookup_meta_ptr,
                lookup_call_ptr,
                segments,
                lookups,
                positions,
                entry_mask,
                d,
                d_mask,
                max_partners,
                ROW_ALIGN,
                BLOCK_ITEMS,
                BLOCK_ENTRIES,
                BLOCK_D,
            )
        grad += tl.sum(contributions, axis=1)
    tl.store(touched_ptr + global_rows, 1, mask=item_mask)
    if FUSE_UPDATE:
        previous = tl.load(sorted_rows_ptr + starts - 1, mask=item_mask & (starts > 0), other=-1)
        following = tl.load(sorted_rows_ptr + ends, mask=item_mask & (ends < num_entries), other=-1)
        whole = (previous != global_rows) & (following != global_rows)
        apply_row_updates(
            weights_ptr,
            momentum_ptr,
            dense_grad_ptr,
            row_offsets,
            global_rows,
            grad,
            item_mask & whole,
            d,
            d_mask,
            dims,
            learning_rate,
            eps,
            OPTIMIZER,
        )
        partial_mask = item_mask & (whole == 0)
    else:
        partial_mask = item_mask
    partial_pointers = partials_ptr + items[:, None] * BLOCK_D + d[None, :]
    tl.store(partial_pointers, grad, mask=partial_mask[:, None] & (d < BLOCK_D)[None, :])


@triton.jit
def apply_row_updates_kernel(
    partials_ptr,
    run_first_items_ptr,
    run_item_counts_ptr,
    item_starts_ptr,
    sorted_rows_ptr,
    order_ptr,
    entry_refs_ptr,
    lookup_meta_ptr,
    weights_ptr,
    momentum_ptr,
    dense_grad_ptr,
    num_runs,
    learning_rate,
    eps,
    OPTIMIZER: tl.constexpr,
    EVEN_D: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    BLOCK_RUNS: tl.constexpr,
    BLOCK_PARTIALS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Pass 2, grid (run blocks,): sum each listed run's item partials and apply the optimizer
    to its row."""
    runs = tl.program_id(0).to(tl.int64) * BLOCK_RUNS + tl.arange(0, BLOCK_RUNS)
    run_mask = runs < num_runs
    first_items = tl.load(run_first_items_ptr + runs, mask=run_mask, other=0)
    counts = tl.load(run_item_counts_ptr + runs, mask=run_mask, other=0)
    d = tl.arange(0, BLOCK_D)
    grad = tl.zeros([BLOCK_RUNS, BLOCK_D], dtype=tl.float32)
    longest = tl.max(counts, axis=0)
    for chunk in range(0, longest, BLOCK_PARTIALS):
        k = chunk + tl.arange(0, BLOCK_PARTIALS)
        mask = k[None, :] < counts[:, None]
        pointers = partials_ptr + (first_items[:, None] + k[None, :])[:, :, None] * BLOCK_D
        tile = tl.load(pointers + d[None, None, :], mask=mask[:, :, None], other=0.0)
        grad += tl.sum(tile, axis=1)
    first_positions = tl.load(item_starts_ptr + first_items, mask=run_mask, other=0)
    global_rows, row_offsets, dims = row_tables(
        sorted_rows_ptr,
        order_ptr,
        entry_refs_ptr,
        lookup_meta_ptr,
        first_positions,
        run_mask,
        ROW_ALIGN,
    )
    if EVEN_D:
        d_mask = (d < BLOCK_D)[None, :] & run_mask[:, None]
    else:
        d_mask = aligned(d, ROW_ALIGN)[None, :] < dims[:, None]
    apply_row_updates(
        weights_ptr,
        momentum_ptr,
        dense_grad_ptr,
        row_offsets,
        global_rows,
        grad,
        run_mask,
        d,
        d_mask,
        dims,
        learning_rate,
        eps,
        OPTIMIZER,
    )


# ---- the hash alone --------------------------------------------------------------------------


@triton.jit
def bucket_kernel(ids_ptr, out_ptr, params_ptr, num_ids, BLOCK: tl.constexpr):
    """out = hashing.bucket_keyed(ids, key, num_rows) with params = (key, num_rows, and the
    row count's division magic and shift)."""
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < num_ids
    ids = tl.load(ids_ptr + index, mask=mask, other=0)
    key, num_rows = tl.load(params_ptr), tl.load(params_ptr + 1)
    rows = bucket_rows(ids, key, num_rows, tl.load(params_ptr + 2), tl.load(params_ptr + 3))
    tl.store(out_ptr + index, rows, mask=mask)
