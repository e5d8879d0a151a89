"""Where a fused table group's rows live and what its kernels read about each lookup. Torch only.

A group holds physical tables of one dtype in one flat buffer (`table_offsets[t]` elements in)
and is looked up by features. Each feature is cut into *segments*: the column blocks of its
output that pool independently. A `single`, `add` or `mult` feature is one segment over all its
lookups (their rows are summed or multiplied per id before pooling); a `concat` feature (unified
chunks, qr concat) is one segment per lookup, side by side. Each lookup is one index transform
(`transforms.SlotRule`: hash, arithmetic digit of a range-checked id, or rows given by the
caller for graphhash) into one table.

The kernels read two static int64 tables, `segment_meta` [S, len(SEGMENT_FIELDS)] and
`lookup_meta` [L, len(LOOKUP_FIELDS)], and two built per call (`CallPlan`), which say where each
segment's bags, ids and output are in this batch and where each lookup's saved rows go.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from embedding_tables.config import TableConfig
from embedding_tables.errors import ConfigError
from embedding_tables.planning import ELEMENT_BYTES, PhysicalTable, TablePlan, plan_table
from embedding_tables.transforms import IndexTransform, transform_for

SEGMENT_FIELDS = ("dim", "first_lookup", "end_lookup", "is_mult", "is_mean", "owns_positions")
LOOKUP_FIELDS = (
    "segment",
    "kind",
    "table_offset",
    "table_row_start",
    "dim",
    "key",
    "divisor",
    "modulus",
    "limit",
    "out_of_range_hash",
    "range_key",
    "modulus_magic",
    "modulus_shift",
    "divisor_magic",
    "divisor_shift",
    "limit_magic",
    "limit_shift",
)
SEGMENT_CALL_FIELDS = ("bag_start", "num_bags", "out_base", "out_stride", "id_start", "id_end")
LOOKUP_CALL_FIELDS = ("entry_shift", "given_shift")

# Lookup kinds, as the kernels branch on them.
KIND_ARITH = 0  # full / qr: range check (error or hash in), then (id // divisor) % modulus
KIND_HASH = 1  # hash / unified: bucket(id, key, modulus)
KIND_GIVEN = 2  # graphhash: rows computed by the mapping, passed in per id
_KINDS = {"arith": KIND_ARITH, "hash": KIND_HASH, "mapping": KIND_GIVEN}

# What the forward kernel flags in its int32 error slots (nonzero: the input was bad).
ERROR_FIELDS = ("id_out_of_range", "bag_offsets", "offsets_ends")
# How the backward applies a row's summed gradient.
OPTIMIZER_CODES = {"dense": 0, "sgd": 1, "rowwise_adagrad": 2}

# Saved entries pack (id position, lookup) into one int64: position << LOOKUP_BITS | lookup.
LOOKUP_BITS = 16
MAX_LOOKUPS = 1 << LOOKUP_BITS
# Largest vector the kernels ask for: 16 bytes.
VECTOR_BYTES = 16


@dataclass(frozen=True)
class LookupRule:
    """One lookup's index transform as the parameters the kernel evaluates (see
    `transforms.SlotRule`): kind, hash key and row count, or divisor/modulus after a range check
    against `limit` (out-of-range ids an error, or hashed in with `range_key`)."""

    kind: int
    key: int = 0
    divisor: int = 1
    modulus: int = 1
    limit: int = 0
    out_of_range_hash: bool = False
    range_key: int = 0


@dataclass(frozen=True)
class FeatureSpec:
    """One feature looked up in the group: its table's plan, the physical table and rule of each
    of its lookups (in lookup order), and whether it mean-pools."""

    name: str
    plan: TablePlan
    lookup_tables: tuple[str, ...]
    rules: tuple[LookupRule, ...]
    mean: bool

    @property
    def given_rows(self) -> bool:
        """Whether the kernels take this feature's rows as given (transforms they cannot run:
        graphhash mappings, plug-in methods without a formula)."""
        return any(rule.kind == KIND_GIVEN for rule in self.rules)

    @property
    def output_dim(self) -> int:
        if self.plan.combine == "concat":
            dims = {table.name: table.dim for table in self.plan.physical}
            return sum(dims[name] for name in self.lookup_tables)
        return self.plan.config.dim


def lookup_rules(transform: IndexTransform) -> tuple[LookupRule, ...]:
    """The kernel parameters of every lookup of a static transform."""
    rules = []
    for j in range(len(transform.tables)):
        rule = transform.slot_rule(j)
        rules.append(
            LookupRule(
                kind=_KINDS[rule.kind],
                key=rule.key,
                divisor=rule.divisor,
                modulus=rule.modulus,
                limit=rule.limit,
                out_of_range_hash=rule.out_of_range == "hash",
                range_key=rule.range_key,
            )
        )
    return tuple(rules)


def feature_spec(
    name: str, plan: TablePlan, transform: IndexTransform | None, lookup_tables: Sequence[str]
) -> FeatureSpec:
    """A feature's spec from its transform; a feature of a table that takes a mapping
    (graphhash) may have none yet (its rows are given per call), then `lookup_tables` names its
    lookups' tables."""
    if transform is None:
        if not plan.config.method.takes_mapping:
            raise ConfigError(
                f"feature {name!r}: only lookups of tables that take a mapping (graphhash) may "
                "have no transform"
            )
        rules = tuple(LookupRule(KIND_GIVEN) for _ in lookup_tables)
        tables = tuple(lookup_tables)
    else:
        rules = lookup_rules(transform)
        tables = tuple(transform.tables)
    return FeatureSpec(name, plan, tables, rules, plan.config.pooling == "mean")


def feature_specs(
    tables: Sequence[TableConfig], feature_to_table: Mapping[str, str]
) -> tuple[list[FeatureSpec], list[PhysicalTable]]:
    """Specs of static features (full, hash, unified, qr) and their physical tables in order of
    first use: what a FusedTableGroup is built from outside an EmbeddingCollection."""
    configs = {config.name: config for config in tables}
    plans = {name: plan_table(config) for name, config in configs.items()}
    specs, physical = [], []
    for feature, table in feature_to_table.items():
        plan = plans[table]
        transform = transform_for(configs[table], feature, plan=plan)
        specs.append(feature_spec(feature, plan, transform, transform.tables))
        physical.extend(t for t in plan.physical if t not in physical)
    return specs, physical


@dataclass(frozen=True)
class Segment:
    """A column block of one feature's output pooled on its own, over lookups
    [first_lookup, end_lookup) combined by `mult` (product) or sum."""

    feature: int
    column: int
    dim: int
    first_lookup: int
    end_lookup: int
    is_mult: bool


class GroupLayout:
    """Flat-buffer placement of a group's tables and the kernels' static metadata."""

    def __init__(self, features: Sequence[FeatureSpec], tables: Sequence[PhysicalTable]) -> None:
        if not features:
            raise ConfigError("a fused table group needs at least one feature")
        dtypes = {table.dtype for table in tables}
        if len(dtypes) != 1:
            raise ConfigError(f"a fused table group holds one dtype, got {sorted(dtypes)}")
        self.dtype = dtypes.pop()
        self.tables = tuple(tables)
        self.features = tuple(features)
        names = [table.name for table in self.tables]
        self.table_offsets: list[int] = []
        self.table_row_starts: list[int] = []
        elements = rows = 0
        for table in self.tables:
            self.table_offsets.append(elements)
            self.table_row_starts.append(rows)
            elements += table.num_rows * table.dim
            rows += table.num_rows
        self.total_elements = elements
        self.total_rows = rows

        self.segments: list[Segment] = []
        self.lookup_tables: list[int] = []
        self.lookup_segments: list[int] = []
        self.lookup_features: list[int] = []
        self.rules: list[LookupRule] = []
        self.feature_columns: list[int] = []
        self.feature_segments: list[range] = []
        column = 0
        for f, spec in enumerate(self.features):
            missing = [name for name in spec.lookup_tables if name not in names]
            if missing:
                raise ConfigError(
                    f"feature {spec.name!r} looks up {missing}, not tables of this group"
                )
            self.feature_columns.append(column)
            first_segment = len(self.segments)
            lookups = [
                (names.index(name), rule)
                for name, rule in zip(spec.lookup_tables, spec.rules, strict=True)
            ]
            groups = (
                [[lookup] for lookup in lookups] if spec.plan.combine == "concat" else [lookups]
            )
            within = 0
            for members in groups:
                dim = self.tables[members[0][0]].dim
                if any(self.tables[t].dim != dim for t, _ in members):
                    raise ConfigError(
                        f"feature {spec.name!r}: lookups combined by {spec.plan.combine} must "
                        "read tables of one dim"
                    )
                first = len(self.rules)
                for t, rule in members:
                    self.lookup_tables.append(t)
                    self.lookup_segments.append(len(self.segments))
                    self.lookup_features.append(f)
                    self.rules.append(rule)
                self.segments.append(
                    Segment(
                        feature=f,
                        column=within,
                        dim=dim,
                        first_lookup=first,
                        end_lookup=len(self.rules),
                        is_mult=spec.plan.combine == "mult",
                    )
                )
                within += dim
            if within != spec.output_dim:
                raise ConfigError(f"feature {spec.name!r}: segments cover {within} columns")
            self.feature_segments.append(range(first_segment, len(self.segments)))
            column += within
        self.total_columns = column
        if len(self.rules) >= MAX_LOOKUPS:
            raise ConfigError(
                f"a fused table group takes fewer than {MAX_LOOKUPS} lookups, got {len(self.rules)}"
            )
        self.max_dim = max(segment.dim for segment in self.segments)
        self.even_dims = all(segment.dim == self.max_dim for segment in self.segments)
        self.has_mult = any(segment.is_mult for segment in self.segments)
        self.has_mean = any(spec.mean for spec in self.features)
        self.has_given = any(rule.kind == KIND_GIVEN for rule in self.rules)
        self.max_lookups_per_segment = max(s.end_lookup - s.first_lookup for s in self.segments)
        self.row_alignment = _row_alignment(
            [table.dim for table in self.tables] + self.table_offsets, self.dtype
        )

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    @property
    def num_lookups(self) -> int:
        return len(self.rules)

    def segment_meta(self) -> torch.Tensor:
        """[S, len(SEGMENT_FIELDS)] int64."""
        rows = []
        for s, segment in enumerate(self.segments):
            spec = self.features[segment.feature]
            rows.append(
                [
                    segment.dim,
                    segment.first_lookup,
                    segment.end_lookup,
                    int(segment.is_mult),
                    int(spec.mean),
                    int(s == self.feature_segments[segment.feature][0]),
                ]
            )
        return torch.tensor(rows, dtype=torch.int64)

    def lookup_meta(self) -> torch.Tensor:
        """[L, len(LOOKUP_FIELDS)] int64."""
        rows = []
        for table, segment, rule in zip(
            self.lookup_tables, self.lookup_segments, self.rules, strict=True
        ):
            rows.append(
                [
                    segment,
                    rule.kind,
                    self.table_offsets[table],
                    self.table_row_starts[table],
                    self.tables[table].dim,
                    rule.key,
                    rule.divisor,
                    rule.modulus,
                    rule.limit,
                    int(rule.out_of_range_hash),
                    rule.range_key,
                    *division_magic(rule.modulus),
                    *division_magic(rule.divisor),
                    *division_magic(max(rule.limit, 1)),
                ]
            )
        return torch.tensor(rows, dtype=torch.int64)

    def checked_features(self) -> list[int]:
        """Features with a lookup whose out-of-range ids are an error."""
        return sorted(
            {
                f
                for f, rule in zip(self.lookup_features, self.rules, strict=True)
                if rule.kind == KIND_ARITH and not rule.out_of_range_hash
            }
        )


@dataclass(frozen=True)
class CallPlan:
    """Where one call's data is: per segment its bags, ids and output; per lookup where its
    saved rows and given rows start; sizes of what the kernels write."""

    segment_call: torch.Tensor  # [S, len(SEGMENT_CALL_FIELDS)] int64 (host)
    lookup_call: torch.Tensor  # [L, len(LOOKUP_CALL_FIELDS)] int64 (host)
    num_entries: int
    output_numel: int
    most_bags: int
    feature_counts: tuple[int, ...] | None
    output_offsets: tuple[int, ...]


def plan_call(
    layout: GroupLayout,
    pooled: bool,
    batch_size: int,
    num_ids: int,
    input_features: Sequence[int],
    input_counts: Sequence[int] | None,
) -> CallPlan:
    """The per-call metadata. `input_features[f]`: position of layout feature f among the input's
    features (its bags are [i * B, (i + 1) * B)); `input_counts`: ids per input feature, needed
    for sequence lookups, given rows and saving rows (None: pooled, nothing saved).

    Saved rows: lookup l's entry for the id at position p is `p + entry_shift[l]`, lookups one
    after another. Given rows (graphhash): lookup l's row for position p is at
    `p + given_shift[l]` in the given rows of every KIND_GIVEN lookup, concatenated in order."""
    starts = None
    if input_counts is not None:
        starts = [0]
        for count in input_counts:
            starts.append(starts[-1] + count)
    bounds = [
        (0, num_ids) if starts is None else (starts[i], starts[i + 1]) for i in input_features
    ]
    segment_rows = []
    output_offsets = []
    output_numel = 0
    for f, spec in enumerate(layout.features):
        id_start, id_end = bounds[f]
        if pooled:
            output_offsets.append(layout.feature_columns[f])
        else:
            output_offsets.append(output_numel)
            output_numel += (id_end - id_start) * spec.output_dim
        for s in layout.feature_segments[f]:
            column = layout.segments[s].column
            if pooled:
                bag_start, num_bags = input_features[f] * batch_size, batch_size
                stride = layout.total_columns
            else:
                bag_start, num_bags = id_start, id_end - id_start
                stride = spec.output_dim
            out_base = output_offsets[f] + column
            segment_rows.append([bag_start, num_bags, out_base, stride, id_start, id_end])
    if pooled:
        output_numel = batch_size * layout.total_columns
    lookup_rows = []
    entries = given = 0
    for lookup, f in enumerate(layout.lookup_features):
        id_start, id_end = bounds[f]
        count = 0 if starts is None else id_end - id_start
        given_shift = 0
        if layout.rules[lookup].kind == KIND_GIVEN:
            given_shift = given - id_start
            given += count
        lookup_rows.append([entries - id_start, given_shift])
        entries += count
    return CallPlan(
        segment_call=torch.tensor(segment_rows, dtype=torch.int64),
        lookup_call=torch.tensor(lookup_rows, dtype=torch.int64),
        num_entries=entries,
        output_numel=output_numel,
        most_bags=max(row[1] for row in segment_rows),
        feature_counts=None if starts is None else tuple(hi - lo for lo, hi in bounds),
        output_offsets=tuple(output_offsets),
    )


def division_magic(divisor: int) -> tuple[int, int]:
    """(magic, shift) such that floor(n / divisor) == ((n * magic) >> 64) >> shift for every
    0 <= n < 2**63, magic read as unsigned (returned as the int64 of its bits): the kernels
    divide by a table's row count with one multiply-high instead of a 64-bit division routine.

    Granlund & Montgomery (1994), theorem 4.2 with 63-bit numerators: l = ceil(log2 divisor),
    magic = ceil(2**(63 + l) / divisor) < 2**64 and magic * divisor - 2**(63 + l) < 2**l make
    the quotient exact. Divisor 1 has no such magic: (0, 0), which the kernels special-case."""
    if divisor < 1:
        raise ConfigError(f"division_magic needs a divisor >= 1, got {divisor}")
    if divisor == 1:
        return 0, 0
    bits = (divisor - 1).bit_length()
    magic = -(-(1 << (63 + bits)) // divisor)
    return _signed64(magic), bits - 1


def _signed64(value: int) -> int:
    """The int64 with the same 64 bits as the unsigned `value`."""
    return value - (1 << 64) if value >> 63 else value


def _row_alignment(values: Sequence[int], dtype: str) -> int:
    """Largest power of two (in elements, at most one 16-byte vector) dividing every row width
    and table offset: the alignment the kernels may promise the compiler."""
    common = 0
    for value in values:
        common = math.gcd(common, value)
    limit = VECTOR_BYTES // ELEMENT_BYTES.get(dtype, 2)
    alignment = 1
    while alignment < limit and common % (alignment * 2) == 0:
        alignment *= 2
    return alignment
