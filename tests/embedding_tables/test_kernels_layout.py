"""The fused kernels' host side, without Triton: the multiply-high division the kernels use for
every modulus, and the layout and per-call metadata they read."""

from __future__ import annotations

import random

import pytest

from embedding_tables.errors import ConfigError
from embedding_tables.kernels.layout import (
    KIND_ARITH,
    KIND_HASH,
    LOOKUP_CALL_FIELDS,
    LOOKUP_FIELDS,
    SEGMENT_CALL_FIELDS,
    SEGMENT_FIELDS,
    GroupLayout,
    division_magic,
    feature_specs,
    plan_call,
)
from tests.embedding_tables.helpers import method_case

LOW63 = (1 << 63) - 1


def divide_like_the_kernel(n: int, divisor: int) -> int:
    magic, shift = division_magic(divisor)
    if divisor == 1:
        return n
    return ((n * (magic & ((1 << 64) - 1))) >> 64) >> shift


def divisors() -> list[int]:
    chosen = set(range(1, 300))
    for bits in range(1, 63):
        chosen.update({(1 << bits) - 1, 1 << bits, (1 << bits) + 1})
    chosen.update({3163, 1000003, 10131227, 2**62 + 1, LOW63})
    generator = random.Random(0)
    chosen.update(generator.randrange(2, 1 << generator.randrange(2, 63)) for _ in range(300))
    return sorted(chosen)


def test_division_magic_is_exact_for_63_bit_numerators() -> None:
    generator = random.Random(1)
    for divisor in divisors():
        numerators = {0, 1, divisor - 1, divisor, divisor + 1, LOW63, LOW63 - 1}
        for multiple in (2, 3, LOW63 // divisor):
            numerators.update({multiple * divisor - 1, multiple * divisor})
        numerators.update(generator.randrange(0, 1 << 63) for _ in range(40))
        for n in numerators:
            if 0 <= n <= LOW63:
                assert divide_like_the_kernel(n, divisor) == n // divisor, (n, divisor)
        magic, shift = division_magic(divisor)
        assert -(2**63) <= magic < 2**63 and 0 <= shift < 63


def test_division_magic_refuses_zero() -> None:
    with pytest.raises(ConfigError, match="divisor >= 1"):
        division_magic(0)


def test_layout_cuts_features_into_segments_and_columns() -> None:
    tables, feature_to_table = method_case("mixed")
    specs, physical = feature_specs(tables, feature_to_table)
    layout = GroupLayout(specs, physical)
    names = [spec.name for spec in layout.features]
    assert names == list(feature_to_table)
    widths = [spec.output_dim for spec in layout.features]
    assert layout.feature_columns == [sum(widths[:i]) for i in range(len(widths))]
    assert layout.total_columns == sum(widths)
    # unified g0 has 2 chunks: 2 concat segments; qr mult/add: one segment of 2 lookups.
    g0 = names.index("g0")
    assert len(layout.feature_segments[g0]) == 2
    for name in ("qm", "qa"):
        (segment,) = (layout.segments[s] for s in layout.feature_segments[names.index(name)])
        assert segment.end_lookup - segment.first_lookup == 2
        assert segment.is_mult == (name == "qm")
    kinds = {layout.rules[lookup].kind for lookup in range(layout.num_lookups)}
    assert kinds == {KIND_ARITH, KIND_HASH}
    assert layout.segment_meta().shape == (layout.num_segments, len(SEGMENT_FIELDS))
    assert layout.lookup_meta().shape == (layout.num_lookups, len(LOOKUP_FIELDS))
    offsets = layout.table_offsets + [layout.total_elements]
    assert all(offsets[t + 1] - offsets[t] == t_.num_rows * t_.dim for t, t_ in enumerate(physical))


def test_call_plan_places_bags_ids_outputs_and_saved_entries() -> None:
    tables, feature_to_table = method_case("unified")  # f0: 3 chunks, f2: 2, f1 and f3: 1
    specs, physical = feature_specs(tables, feature_to_table)
    layout = GroupLayout(specs, physical)
    counts = [4, 0, 6, 2]  # ids per input feature, in input order = layout order
    pooled = plan_call(layout, True, 3, sum(counts), [0, 1, 2, 3], counts)
    field = SEGMENT_CALL_FIELDS.index
    assert pooled.output_numel == 3 * layout.total_columns
    assert pooled.num_entries == 4 * 3 + 0 * 1 + 6 * 2 + 2 * 1
    for f in range(len(layout.features)):
        for s in layout.feature_segments[f]:
            row = pooled.segment_call[s].tolist()
            assert row[field("bag_start")] == f * 3 and row[field("num_bags")] == 3
            assert row[field("out_stride")] == layout.total_columns
            start = sum(counts[:f])
            assert (row[field("id_start")], row[field("id_end")]) == (start, start + counts[f])
    # Entries of the lookups follow one another: shift + first id position = running total.
    shift = LOOKUP_CALL_FIELDS.index("entry_shift")
    running = 0
    for lookup, f in enumerate(layout.lookup_features):
        assert pooled.lookup_call[lookup, shift] + sum(counts[:f]) == running
        running += counts[f]

    sequence = plan_call(layout, False, 0, sum(counts), [0, 1, 2, 3], counts)
    assert sequence.output_numel == sum(
        c * s.output_dim for c, s in zip(counts, specs, strict=True)
    )
    assert sequence.most_bags == max(counts)
    reordered = plan_call(layout, True, 3, sum(counts), [3, 2, 1, 0], counts[::-1])
    first = reordered.segment_call[layout.feature_segments[0][0]].tolist()
    assert first[field("bag_start")] == 9 and first[field("id_start")] == sum(counts[1:])
