"""Index transforms: ids of one feature -> physical rows, one tensor per lookup. Pure functions.

Every static method is an index transform followed by a table-batched lookup of plain physical
tables (and, for qr and graphhash double, a combine of the looked-up rows). Each method defines
its transform in its module (`embedding_tables.methods`); a transform depends only on the
TableConfig (and, for graphhash, its mapping), so serving rebuilds it with
`transform_for(config, feature)` and gets bit-identical rows. This module holds what the
transforms share and the batched form that runs many of them at once.

A transform is called on a 1-D integer tensor and returns a list of int64 row tensors of the
same length, one per lookup; `tables` names the physical table of each lookup.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from embedding_tables.cpu_kernels import CpuKernels, KernelTransform, library
from embedding_tables.errors import IdError
from embedding_tables.hashing import bucket, bucket_keyed, low63_, mix64_, seed_key
from embedding_tables.planning import TablePlan, plan_table

if TYPE_CHECKING:
    from embedding_tables.config import TableConfig

INTEGER_DTYPES = (torch.int64, torch.int32)


class IndexTransform(Protocol):
    """ids -> one row tensor per lookup; `tables[j]` is the physical table of lookup j.

    `slot_rule(j)` says how lookup j runs batched with other transforms' lookups: as a hash or
    digit formula the batched transform and the kernels evaluate themselves, or (kind
    `mapping`) by calling the transform."""

    feature: str
    tables: tuple[str, ...]

    def __call__(self, ids: torch.Tensor) -> list[torch.Tensor]: ...

    def slot_rule(self, lookup: int) -> SlotRule: ...


class GraphHashMappingLike(Protocol):
    """What the collection needs of embedding_tables.graphhash.GraphHashMapping."""

    num_rows: int

    def transform_all(self, ids: torch.Tensor) -> torch.Tensor: ...


def check_id_dtype(ids: torch.Tensor, feature: str) -> torch.Tensor:
    """`ids` as int64; IdError naming the feature and the dtype if they are not integers."""
    if ids.dtype not in INTEGER_DTYPES:
        raise IdError(
            f"feature {feature!r}: ids must be integers (int64 or int32), got dtype {ids.dtype}"
        )
    return ids.to(torch.int64)


def out_of_range_error(feature: str, value: int, num_embeddings: int) -> IdError:
    return IdError(
        f"feature {feature!r}: id {value} is outside [0, {num_embeddings}); this table accepts "
        "ids in that range (set out_of_range='hash' to hash the others into it)"
    )


def in_range_rows(
    ids: torch.Tensor, feature: str, num_embeddings: int, out_of_range: str, seed: int
) -> torch.Tensor:
    """ids in [0, num_embeddings) unchanged; the others an IdError (`error`) or hashed in."""
    if ids.numel() == 0:
        return ids
    low, high = torch.aminmax(ids)
    if low >= 0 and high < num_embeddings:
        return ids
    if out_of_range == "error":
        raise out_of_range_error(feature, int(low) if low < 0 else int(high), num_embeddings)
    outside = (ids < 0) | (ids >= num_embeddings)
    rows = ids.clone()
    rows[outside] = bucket(ids[outside], seed, num_embeddings)
    return rows


def transform_for(
    config: TableConfig,
    feature: str,
    mapping: GraphHashMappingLike | None = None,
    plan: TablePlan | None = None,
) -> IndexTransform:
    """The index transform of `feature` looked up in the static table `config`."""
    if plan is None:
        plan = plan_table(config, None if mapping is None else mapping.num_rows)
    return config.method.transform(config, feature, plan, mapping)


@dataclass(frozen=True)
class SlotRule:
    """Lookup `lookup` of `transform`, as the parameters of one whole-batch formula:
    `hash`: bucket_keyed(ids, key, modulus); `arith`: range check against `limit`, then
    (ids // divisor) % modulus; `mapping`: the transform itself."""

    transform: IndexTransform
    lookup: int
    kind: str
    key: int = 0
    divisor: int = 1
    modulus: int = 1
    limit: int = 0
    out_of_range: str = "error"
    range_key: int = 0

    @property
    def feature(self) -> str:
        return self.transform.feature

    @property
    def is_identity(self) -> bool:
        return self.kind == "arith" and self.divisor == 1 and self.modulus >= self.limit

    def kernel_transform(self) -> KernelTransform:
        """This lookup as the CPU kernels take it (not for `mapping` rules)."""
        if self.kind == "hash":
            return KernelTransform("hash", (self.modulus,), key=self.key)
        return KernelTransform(
            "arith",
            (self.modulus,),
            divisors=(self.divisor,),
            limit=self.limit,
            out_of_range=self.out_of_range,
            range_key=self.range_key,
        )


def kernel_transform_of(rules: Sequence[SlotRule]) -> KernelTransform | None:
    """The lookups of one id (one rule, or a qr table's partitions in order) as one kernel
    transform; None for rules the kernels do not run (graphhash mappings)."""
    if any(rule.kind == "mapping" for rule in rules):
        return None
    if len(rules) == 1:
        return rules[0].kernel_transform()
    first = rules[0]
    if any(rule.kind != "arith" or rule.transform is not first.transform for rule in rules):
        return None
    return KernelTransform(
        "arith",
        tuple(rule.modulus for rule in rules),
        divisors=tuple(rule.divisor for rule in rules),
        limit=first.limit,
        out_of_range=first.out_of_range,
        range_key=first.range_key,
    )


def arith_rule(transform: IndexTransform, lookup: int, radices: Sequence[int]) -> SlotRule:
    """Lookup `lookup` of a range-checked transform (`num_embeddings`, `out_of_range`, `seed`)
    whose rows are the mixed-radix digits of the id (one digit, the id itself, for `full`)."""
    return SlotRule(
        transform,
        lookup,
        "arith",
        divisor=math.prod(radices[:lookup]),
        modulus=radices[lookup],
        limit=transform.num_embeddings,
        out_of_range=transform.out_of_range,
        range_key=seed_key(transform.seed),
    )


class BatchedTransform:
    """The index transforms of many lookups ("slots"), run as a few whole-batch tensor ops.

    Slot s is lookup `j` of a feature's transform; calling it with each slot's ids returns the
    rows of all slots concatenated in slot order: slot by slot the same rows as the per-feature
    transforms (which stay the specification), in ~15 tensor ops instead of ~15 per feature.
    On CPU the hash and arith slots run in one pass per run of slots in the CPU kernels
    (`embedding_tables.cpu_kernels`) when they are built.
    """

    def __init__(self, slots: Sequence[tuple[IndexTransform, int]]) -> None:
        self.rules = [transform.slot_rule(j) for transform, j in slots]
        self._kinds = sorted({rule.kind for rule in self.rules})

    def __call__(
        self, slot_ids: Sequence[torch.Tensor], concatenated: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows of every slot, concatenated; `concatenated` may pass torch.cat(slot_ids)."""
        counts = [ids.numel() for ids in slot_ids]
        if len(self._kinds) == 1:
            ids = torch.cat(list(slot_ids)) if concatenated is None else concatenated
            return self._apply(self._kinds[0], range(len(slot_ids)), ids, counts)
        pieces: list[torch.Tensor] = [torch.empty(0)] * len(slot_ids)
        for kind in self._kinds:
            members = [s for s, rule in enumerate(self.rules) if rule.kind == kind]
            ids = torch.cat([slot_ids[s] for s in members])
            member_counts = [counts[s] for s in members]
            rows = self._apply(kind, members, ids, member_counts).split(member_counts)
            for s, piece in zip(members, rows, strict=True):
                pieces[s] = piece
        return torch.cat(pieces)

    def _apply(
        self, kind: str, members: Sequence[int], ids: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        rules = [self.rules[s] for s in members]
        if kind == "mapping":
            return torch.cat(
                [
                    rule.transform(piece)[rule.lookup]
                    for rule, piece in zip(rules, ids.split(counts), strict=True)
                ]
            )
        ids = ids.to(torch.int64)
        kernels = library() if ids.device.type == "cpu" else None
        if kernels is not None:
            return self._kernel_rows(kernels, rules, ids.contiguous(), counts)
        if kind == "hash":
            return self._hash_rows(rules, ids, counts)
        ids = self._in_range(rules, ids, counts)
        if all(rule.is_identity for rule in rules):
            return ids
        rows = ids.clone()
        for start, end, divisor in _runs([rule.divisor for rule in rules], counts):
            if divisor != 1:
                rows[start:end].div_(divisor, rounding_mode="floor")
        for start, end, modulus in _runs([rule.modulus for rule in rules], counts):
            rows[start:end].remainder_(modulus)
        return rows

    @staticmethod
    def _kernel_rows(
        kernels: CpuKernels, rules: Sequence[SlotRule], ids: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        """The rows of hash or arith slots by the CPU kernels, one pass per run of slots with
        one formula."""
        rows = torch.empty_like(ids)
        transforms = [rule.kernel_transform() for rule in rules]
        for start, end, index in _runs(_first_indices(transforms), counts):
            transform, piece = transforms[index], ids[start:end]
            if transform.kind == "hash":
                kernels.bucket_into(piece, transform.key, transform.moduli[0], rows[start:end])
                continue
            result = kernels.transform(transform, piece)
            if isinstance(result, int):
                slot_starts = [0]
                for count in counts:
                    slot_starts.append(slot_starts[-1] + count)
                rule = rules[bisect.bisect_right(slot_starts, start + result) - 1]
                raise out_of_range_error(rule.feature, int(piece[result]), rule.limit)
            rows[start:end] = result[0]
        return rows

    @staticmethod
    def _hash_rows(rules: Sequence[SlotRule], ids: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """bucket of every slot's ids with its seed and row count: one mix over all slots; the
        per-slot key and modulus applied in place on each run of slots sharing them."""
        keys = _runs([rule.key for rule in rules], counts)
        if len(keys) == 1:
            hashes = ids + keys[0][2]
        else:
            hashes = ids.clone()
            for start, end, key in keys:
                hashes[start:end] += key
        low63_(mix64_(hashes))
        for start, end, modulus in _runs([rule.modulus for rule in rules], counts):
            hashes[start:end].remainder_(modulus)
        return hashes

    def _in_range(
        self, rules: Sequence[SlotRule], ids: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        """ids of full/qr slots checked against their table's range (error or hashed in)."""
        limits = _per_id([rule.limit for rule in rules], counts, ids.device)
        outside = (ids < 0) | (ids >= limits)
        if ids.numel() == 0 or not bool(outside.any()):
            return ids
        starts = [0]
        for count in counts:
            starts.append(starts[-1] + count)
        for position in outside.nonzero().flatten().tolist():
            rule = rules[bisect.bisect_right(starts, position) - 1]
            if rule.out_of_range == "error":
                raise out_of_range_error(rule.feature, int(ids[position]), rule.limit)
        keys = _per_id([rule.range_key for rule in rules], counts, ids.device)
        limits = torch.as_tensor(limits, device=ids.device).expand_as(ids)
        keys = torch.as_tensor(keys, device=ids.device).expand_as(ids)
        ids = ids.clone()
        ids[outside] = bucket_keyed(ids[outside], keys[outside], limits[outside])
        return ids


def _per_id(values: list[int], counts: list[int], device: torch.device) -> torch.Tensor | int:
    """One value per id (slot s's value repeated counts[s] times), or the value if all agree."""
    if len(set(values)) == 1:
        return values[0]
    return torch.repeat_interleave(
        torch.tensor(values, device=device),
        torch.tensor(counts, device=device),
        output_size=sum(counts),
    )


def _first_indices(values: Sequence[object]) -> list[int]:
    """For each value, the index of the first value equal to it (so equal values share it)."""
    first: dict[object, int] = {}
    return [first.setdefault(value, i) for i, value in enumerate(values)]


def _runs(values: list[int], counts: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, value) over the concatenated ids, one per run of slots sharing a value."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for value, count in zip(values, counts, strict=True):
        if runs and runs[-1][2] == value:
            runs[-1] = (runs[-1][0], start + count, value)
        else:
            runs.append((start, start + count, value))
        start += count
    return runs
