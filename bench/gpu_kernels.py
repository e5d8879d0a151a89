"""GPU benchmark of the fused Triton kernels (embedding_tables.kernels): checks, then times.

Cases (sum pooling, no per-sample weights):

- A: 2 tables of 1e7 rows, dim 128 and 256, fp32 and fp16, batch 65536, bag 32, Zipf ids;
  methods hash, unified (2 chunks of dim/2 per feature in one shared table), qr mult, full.
- C: 26 hash tables with the Criteo Kaggle cardinalities, dim 16, bag 1, batch 16384.
- D: 8 hash (and qr mult) tables of 1e6 rows, dim 64, bags of 20-100 ids, batch 16384.
- E: serving: C's tables, batches 1-512, forward only, p50/p99 wall-clock latency per call.

Per case: the kernels' forward, and forward + backward + fused update (SGD; row-wise Adagrad),
against nn.EmbeddingBag (per table, on the same rows: forward, dense grad + SGD, sparse grad +
SGD) and against the same method composed of torch ops (whole-tensor transform, embedding_bag
or embedding + product + pooling; sparse grad + SGD), all in the same run on the same weights.
Times are CUDA-event medians over >= 100 iterations after warm-up. GB/s follow fbgemm's
convention: rows read + output written (training adds the output gradient read per id and the
updated rows read and written), over the time; % of the measured device-to-device copy.

Before timing, every case is checked on fresh random inputs: the kernels' output against the
plain-torch reference of the method (`embedding_tables.reference`, per id) and against the
torch-composed version, with the output poisoned (NaN) first; one fused SGD / Adagrad step
against the torch-composed step; bad ids and offsets raise typed errors.

Needs torch with CUDA and Triton; not torchrec or fbgemm-gpu. Refuses to write results without
a CUDA device, and stops at once without Triton. It builds `FusedTableGroup` itself, so it times
the Triton kernels whatever EMBTAB_LOOKUP says: that switch (auto by default) chooses only
EmbeddingCollection's backend, which the bench does not build. See bench/GPU_NOTES.md.

    python bench/gpu_kernels.py [--out bench/results/gpu_kernels.json] [--cases A,C,D,E]
        [--budget-s 500] [--iters 100]
    python bench/gpu_kernels.py --smoke --out /tmp/smoke.json  # 1% sizes: compile + checks
    TRITON_INTERPRET=1 python bench/gpu_kernels.py --dry-run   # the logic on CPU, tiny shapes

The results file is rewritten after every case ("complete": false until the end), so a run
cut short keeps what it measured; cases beyond --budget-s are listed under "skipped".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedding_tables import IdError, OffsetsError, SparseOptimizerConfig  # noqa: E402
from embedding_tables.config import TableConfig  # noqa: E402
from embedding_tables.hashing import MIX_MULTIPLIER_1, MIX_MULTIPLIER_2  # noqa: E402
from embedding_tables.kernels import triton_available  # noqa: E402
from embedding_tables.kernels.layout import (  # noqa: E402
    KIND_ARITH,
    KIND_HASH,
    GroupLayout,
    feature_specs,
    plan_call,
)
from embedding_tables.methods import Unified
from embedding_tables.reference import reference_embedding  # noqa: E402

RESULT = Path(__file__).parent / "results" / "gpu_kernels.json"
CRITEO_CARDINALITIES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]  # fmt: skip
ZIPF_EXPONENT = 1.05
SERVING_BATCHES = (1, 4, 16, 64, 256, 512)
LR = 0.01
# Targets of the issue, stated for an H100.
TARGET_HASH_FWD_TBPS = 2.5
TARGET_QR_MULT_VS_TORCH = 3.0
TARGET_FWD_BWD_VS_EMBEDDINGBAG = 2.0
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
ELEMENT_BYTES = {"fp32": 4, "fp16": 2}
_LOW63 = (1 << 63) - 1
T = TypeVar("T")


def _as_int64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


# ---- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One timed setup: tables of one method, a batch shape, an id distribution."""

    name: str
    method: str
    tables: tuple[TableConfig, ...]
    feature_to_table: dict[str, str]
    batch: int
    bag: tuple[int, int]  # min, max ids per bag (equal: fixed)
    zipf: bool
    dtype: str


def case_a(method: str, dim: int, dtype: str, scale: float) -> Case:
    rows = max(64, int(1e7 * scale))
    names = ["f0", "f1"]
    if method == "unified":
        table = TableConfig(
            "u", 2 * rows, dim // 2, Unified(feature_chunks=dict.fromkeys(names, 2)), dtype=dtype
        )
        tables, mapping = (table,), dict.fromkeys(names, "u")
    else:
        tables = tuple(TableConfig(f"t{i}", rows, dim, method, dtype=dtype) for i in range(2))
        mapping = {name: f"t{i}" for i, name in enumerate(names)}
    label = "qr_mult" if method == "qr" else method
    batch = max(8, int(65536 * scale))
    return Case(f"A/{label}/d{dim}/{dtype}", label, tables, mapping, batch, (32, 32), True, dtype)


def case_c(scale: float, batch: int | None = None, name: str = "C/hash/d16/fp32") -> Case:
    tables = tuple(
        TableConfig(f"c{i}", max(2, int(n * min(1.0, scale * 10))), 16, "hash")
        for i, n in enumerate(CRITEO_CARDINALITIES)
    )
    mapping = {f"cat_{i}": f"c{i}" for i in range(len(tables))}
    batch = batch if batch is not None else max(8, int(16384 * scale))
    return Case(name, "hash", tables, mapping, batch, (1, 1), False, "fp32")


def case_d(method: str, scale: float) -> Case:
    rows = max(64, int(1e6 * scale * 10))
    tables = tuple(TableConfig(f"d{i}", rows, 64, method) for i in range(8))
    mapping = {f"seq_{i}": f"d{i}" for i in range(8)}
    label = "qr_mult" if method == "qr" else method
    batch = max(8, int(16384 * scale))
    return Case(f"D/{label}/d64/fp32", label, tables, mapping, batch, (20, 100), False, "fp32")


@dataclass
class Batch:
    """A KJT-shaped batch: ids (feature-major), offsets, ids per feature, per-feature offsets."""

    ids: torch.Tensor
    offsets: torch.Tensor
    counts: list[int]
    batch: int
    feature_ids: list[torch.Tensor]
    feature_offsets: list[torch.Tensor]


def id_spaces(case: Case) -> dict[str, int]:
    """Ids of a feature span its table's logical ids, split among the features sharing it."""
    logical = {t.name: t.num_embeddings for t in case.tables}
    sharing = {t: list(case.feature_to_table.values()).count(t) for t in logical}
    return {f: logical[t] // sharing[t] for f, t in case.feature_to_table.items()}


def make_batch(case: Case, device: torch.device, seed: int, batch: int | None = None) -> Batch:
    batch = case.batch if batch is None else batch
    generator = torch.Generator(device=device).manual_seed(seed)
    spaces = id_spaces(case)
    feature_ids, feature_offsets = [], []
    low, high = case.bag
    for feature in case.feature_to_table:
        if low == high:
            lengths = torch.full((batch,), low, dtype=torch.int64, device=device)
        else:
            lengths = torch.randint(low, high + 1, (batch,), generator=generator, device=device)
        count = int(lengths.sum())
        n = spaces[feature]
        if case.zipf:
            ids = zipf_ids(count, n, generator, device)
        else:
            ids = torch.randint(0, n, (count,), generator=generator, device=device)
        feature_ids.append(ids)
        offsets = torch.zeros(batch + 1, dtype=torch.int64, device=device)
        torch.cumsum(lengths, 0, out=offsets[1:])
        feature_offsets.append(offsets)
    counts = [ids.numel() for ids in feature_ids]
    lengths = torch.cat([o[1:] - o[:-1] for o in feature_offsets])
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return Batch(torch.cat(feature_ids), offsets, counts, batch, feature_ids, feature_offsets)


def zipf_ids(
    count: int, num_ids: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Zipf(ZIPF_EXPONENT) ranks over num_ids, spread over the id space by an affine bijection."""
    ranks = torch.arange(1, num_ids + 1, dtype=torch.float64, device=device)
    cdf = ranks.pow_(-ZIPF_EXPONENT).cumsum_(0)
    cdf /= cdf[-1].clone()
    uniform = torch.rand(count, dtype=torch.float64, generator=generator, device=device)
    rank = torch.searchsorted(cdf, uniform).clamp_(max=num_ids - 1)
    del cdf, ranks
    multiplier = 2654435761  # prime: coprime with every num_ids below it
    return (rank * (multiplier % num_ids) + 12345) % num_ids


# ---- the candidates --------------------------------------------------------------------------


def build_group(case: Case, device: torch.device, optimizer: SparseOptimizerConfig | None):
    from embedding_tables.kernels.group import FusedTableGroup

    specs, physical = feature_specs(list(case.tables), case.feature_to_table)
    return FusedTableGroup(physical, specs, optimizer, device)


def torch_bucket(ids: torch.Tensor, key: int, num_rows: int) -> torch.Tensor:
    """hashing.bucket_keyed as whole-tensor torch ops (the torch-composed transform)."""
    z = ids + key
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _as_int64(MIX_MULTIPLIER_1)
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _as_int64(MIX_MULTIPLIER_2)
    z = z ^ ((z >> 31) & ((1 << 33) - 1))
    return (z & _LOW63) % num_rows


def torch_rows(layout: GroupLayout, lookup: int, ids: torch.Tensor) -> torch.Tensor:
    """The transform of one lookup with torch ops, ids in range."""
    rule = layout.rules[lookup]
    if rule.kind == KIND_HASH:
        return torch_bucket(ids, rule.key, rule.modulus)
    if rule.kind == KIND_ARITH:
        rows = ids if rule.divisor == 1 else torch.div(ids, rule.divisor, rounding_mode="floor")
        return rows if rule.modulus >= rule.limit else rows % rule.modulus
    raise ValueError("the bench has no graphhash case")


class TorchComposed(nn.Module):
    """The group's method as torch ops on the group's own tables (parameters viewing them):
    per feature, transform -> embedding_bag (single / concat / add) or embedding -> product ->
    pooling (mult). Sparse gradients."""

    def __init__(self, group, trainable: bool) -> None:
        super().__init__()
        self.layout = group.layout
        self.tables = nn.ParameterList(
            nn.Parameter(group.weight(t), requires_grad=trainable) for t in range(len(group.tables))
        )

    def forward(self, batch: Batch) -> torch.Tensor:
        outputs = []
        for f in range(len(self.layout.features)):
            ids, offsets = batch.feature_ids[f], batch.feature_offsets[f]
            for s in self.layout.feature_segments[f]:
                segment = self.layout.segments[s]
                lookups = range(segment.first_lookup, segment.end_lookup)
                if segment.is_mult:
                    product = None
                    for lookup in lookups:
                        table = self.tables[self.layout.lookup_tables[lookup]]
                        rows = F.embedding(torch_rows(self.layout, lookup, ids), table, sparse=True)
                        product = rows if product is None else product * rows
                    outputs.append(pool(product.float(), offsets, batch.batch))
                    continue
                total = None
                for lookup in lookups:
                    table = self.tables[self.layout.lookup_tables[lookup]]
                    pooled = F.embedding_bag(
                        torch_rows(self.layout, lookup, ids),
                        table,
                        offsets,
                        mode="sum",
                        sparse=True,
                        include_last_offset=True,
                    ).float()
                    total = pooled if total is None else total + pooled
                outputs.append(total)
        return torch.cat(outputs, dim=1)


def pool(values: torch.Tensor, offsets: torch.Tensor, batch: int) -> torch.Tensor:
    """Sum of each bag's rows: a reshape when bags are equal, else segment_reduce."""
    lengths = offsets[1:] - offsets[:-1]
    if values.shape[0] % batch == 0 and values.shape[0] // batch * batch == values.shape[0]:
        length = values.shape[0] // batch
        if bool((lengths == length).all()):
            return values.view(batch, length, -1).sum(dim=1)
    return torch.segment_reduce(values, "sum", lengths=lengths)


class EmbeddingBags(nn.Module):
    """One nn.EmbeddingBag per physical table (viewing the group's rows), fed the rows the
    method's transform gives (computed once, outside the timing): the plain lookup baseline."""

    def __init__(self, group, batch: Batch, sparse: bool) -> None:
        super().__init__()
        layout = group.layout
        self.bags = nn.ModuleList(
            nn.EmbeddingBag.from_pretrained(
                group.weight(t), freeze=False, mode="sum", sparse=sparse, include_last_offset=True
            )
            for t in range(len(group.tables))
        )
        self.inputs = []
        for f in range(len(layout.features)):
            for s in layout.feature_segments[f]:
                lookup = layout.segments[s].first_lookup
                rows = torch_rows(layout, lookup, batch.feature_ids[f])
                self.inputs.append((layout.lookup_tables[lookup], rows, batch.feature_offsets[f]))

    def forward(self) -> torch.Tensor:
        return torch.cat(
            [self.bags[t](rows, offsets).float() for t, rows, offsets in self.inputs], dim=1
        )


def rowwise_adagrad_step(
    parameters: list[nn.Parameter], momenta: list[torch.Tensor], lr: float, eps: float
) -> None:
    """Row-wise Adagrad on sparse gradients with torch ops (the torch-composed optimizer)."""
    with torch.no_grad():
        for parameter, momentum in zip(parameters, momenta, strict=True):
            if parameter.grad is None:
                continue
            grad = parameter.grad.coalesce()
            rows, values = grad.indices()[0], grad.values().float()
            momentum.index_add_(0, rows, values.pow(2).mean(dim=1))
            step = values / (momentum[rows].sqrt() + eps).unsqueeze(1)
            parameter.index_add_(0, rows, (-lr * step).to(parameter.dtype))
            parameter.grad = None


# ---- timing ----------------------------------------------------------------------------------


@dataclass
class Timing:
    median_ms: float
    p99_ms: float
    iterations: int


class Timer:
    """CUDA-event times per iteration after warm-up (wall clock on CPU, for --dry-run)."""

    def __init__(self, device: torch.device, iters: int, warmup: int) -> None:
        self.device = device
        self.iters = iters
        self.warmup = warmup

    def __call__(self, step: Callable[[], object]) -> Timing:
        for _ in range(self.warmup):
            step()
        self.sync()
        times = []
        for _ in range(self.iters):
            if self.device.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                step()
                times.append((time.perf_counter() - begin) * 1e3)
        return Timing(statistics.median(times), percentile(times, 0.99), len(times))

    def wall(self, step: Callable[[], object]) -> Timing:
        """Host wall clock per call including the device sync: serving latency."""
        for _ in range(self.warmup):
            step()
        self.sync()
        times = []
        for _ in range(self.iters):
            begin = time.perf_counter()
            step()
            self.sync()
            times.append((time.perf_counter() - begin) * 1e3)
        return Timing(statistics.median(times), percentile(times, 0.99), len(times))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def copy_bandwidth(device: torch.device, timer: Timer, gib: float) -> float:
    """TB/s of a device-to-device copy (bytes read + written over time)."""
    numel = int(gib * (1 << 30)) // 4
    source = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    timing = timer(lambda: target.copy_(source))
    return 2 * numel * 4 / (timing.median_ms * 1e-3) / 1e12


# ---- bytes moved -----------------------------------------------------------------------------


def forward_bytes(layout: GroupLayout, batch: Batch) -> int:
    """Rows read (every lookup of every id) + output written (fp32)."""
    element = ELEMENT_BYTES.get(layout.dtype, 2)
    rows = 0
    for lookup, f in enumerate(layout.lookup_features):
        rows += batch.counts[f] * layout.tables[layout.lookup_tables[lookup]].dim * element
    return rows + batch.batch * layout.total_columns * 4


def train_bytes(layout: GroupLayout, batch: Batch, unique_rows: int, adagrad: bool) -> int:
    """Forward + output gradient read per id and lookup + updated rows read and written
    (+ their Adagrad accumulators)."""
    element = ELEMENT_BYTES.get(layout.dtype, 2)
    grad = sum(
        batch.counts[f] * layout.tables[layout.lookup_tables[lookup]].dim * 4
        for lookup, f in enumerate(layout.lookup_features)
    )
    update = 2 * unique_rows * layout.max_dim * element + (8 * unique_rows if adagrad else 0)
    return forward_bytes(layout, batch) + grad + update


def lookups(layout: GroupLayout, batch: Batch) -> int:
    return sum(batch.counts[f] for f in layout.lookup_features)


def unique_rows(layout: GroupLayout, batch: Batch) -> int:
    keys = []
    for lookup, f in enumerate(layout.lookup_features):
        rows = torch_rows(layout, lookup, batch.feature_ids[f])
        keys.append(rows + layout.table_row_starts[layout.lookup_tables[lookup]])
    return int(torch.unique(torch.cat(keys)).numel())


# ---- checks ----------------------------------------------------------------------------------


def max_relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().item() or 1.0
    return (got.float() - expected.float()).abs().max().item() / scale


def poisoned_forward(group, batch: Batch) -> tuple[torch.Tensor, bool]:
    """The forward launch into a NaN-filled output: (output, every element written)."""
    from embedding_tables.kernels import ops

    features = list(range(len(group.layout.features)))
    plan = plan_call(group.layout, True, batch.batch, batch.ids.numel(), features, batch.counts)
    out = torch.full((plan.output_numel,), float("nan"), device=batch.ids.device)
    ops.fused_forward(
        group.device_layout,
        group.flat_weights,
        batch.ids,
        batch.offsets,
        ops.DeviceCall.of(plan, batch.ids.device),
        True,
        out=out,
    )
    return out.view(batch.batch, -1), not bool(torch.isnan(out).any())


def reference_output(group, batch: Batch, bags: int) -> torch.Tensor:
    """The plain-torch reference (`reference.reference_embedding`, id by id) of the first
    `bags` bags of every feature."""
    weights = {t.name: group.weight(i).detach() for i, t in enumerate(group.tables)}
    columns = []
    for f, spec in enumerate(group.layout.features):
        ids = batch.feature_ids[f].tolist()
        offsets = batch.feature_offsets[f][: bags + 1].tolist()
        pooled = []
        for b in range(bags):
            bag = torch.zeros(spec.output_dim, device=batch.ids.device)
            for i in range(offsets[b], offsets[b + 1]):
                bag = bag + reference_embedding(spec.plan, spec.name, ids[i], weights)
            pooled.append(bag)
        columns.append(torch.stack(pooled))
    return torch.cat(columns, dim=1)


def check_case(case: Case, device: torch.device, check_scale: float) -> list[dict]:
    """Fresh random inputs on small tables: forward vs reference and torch-composed, with a
    poisoned output; one fused SGD and Adagrad step vs the torch-composed step."""
    small = shrink(case, check_scale)
    results = []
    tolerance = 1e-5 if case.dtype == "fp32" else 1e-2
    batch = make_batch(small, device, seed=101)
    group = build_group(small, device, None)
    with torch.no_grad():
        output, written = poisoned_forward(group, batch)
        reference = reference_output(group, batch, bags=min(8, batch.batch))
        composed = TorchComposed(group, trainable=False)(batch)
    for name, error in (
        ("forward vs reference", max_relative_error(output[: reference.shape[0]], reference)),
        ("forward vs torch-composed", max_relative_error(output, composed)),
    ):
        results.append(check_record(case, name, error, tolerance, written))
    # The torch-composed step runs on fp32 copies: torch's sparse SGD on fp16 rows rounds after
    # every id's addition, the fused update once per row.
    as_fp32 = replace(small, tables=tuple(replace(t, dtype="fp32") for t in small.tables))
    for kind in ("sgd", "rowwise_adagrad"):
        optimizer = SparseOptimizerConfig(kind, lr=0.5, eps=1e-3, initial_accumulator_value=0.1)
        fused = build_group(small, device, optimizer)
        composed_group = build_group(as_fp32, device, optimizer)
        with torch.no_grad():
            composed_group.flat_weights.copy_(fused.flat_weights)
        upstream = torch.randn(batch.batch, fused.layout.total_columns, device=device)
        fused.pooled(batch.ids, batch.offsets, batch.batch, input_counts=batch.counts).backward(
            upstream
        )
        module = TorchComposed(composed_group, trainable=True)
        module(batch).backward(upstream)
        parameters = list(module.tables)
        if kind == "sgd":
            torch.optim.SGD(parameters, lr=optimizer.lr).step()
        else:
            momenta = [composed_group.momentum(t) for t in range(len(parameters))]
            rowwise_adagrad_step(parameters, momenta, optimizer.lr, optimizer.eps)
        error = max_relative_error(fused.flat_weights, composed_group.flat_weights)
        results.append(check_record(case, f"fused {kind} step vs torch-composed", error, tolerance))
    return results


def check_record(case: Case, name: str, error: float, tolerance: float, written=True) -> dict:
    return {
        "case": case.name,
        "check": name,
        "max_relative_error": error,
        "tolerance": tolerance,
        "all_outputs_written": written,
        "ok": bool(error <= tolerance and written),
    }


def shrink(case: Case, scale: float) -> Case:
    """The same case on tables of at most `scale` of the rows and a small batch."""
    tables = tuple(
        TableConfig(
            t.name,
            max(16, min(t.num_embeddings, int(t.num_embeddings * scale))),
            t.dim,
            t.method,
            dtype=t.dtype,
        )
        for t in case.tables
    )
    return Case(
        case.name, case.method, tables, case.feature_to_table, 64, case.bag, True, case.dtype
    )


def check_bad_inputs(device: torch.device) -> list[dict]:
    """Out-of-range ids of full/qr and bad offsets raise typed errors (no illegal access)."""
    results = []
    for method in ("full", "qr"):
        case = Case(
            f"bad-input/{method}",
            method,
            (TableConfig("t", 1000, 16, method),),
            {"f": "t"},
            2,
            (2, 2),
            False,
            "fp32",
        )
        group = build_group(case, device, SparseOptimizerConfig())
        ids = torch.tensor([3, 1000, 5, 7], device=device)
        offsets = torch.tensor([0, 2, 4], device=device)
        results.append(raises(case.name + ": id 1000 of 1000", IdError, group, ids, offsets))
    case = Case("bad-input/offsets", "hash", (TableConfig("t", 1000, 16, "hash"),), {"f": "t"},
                3, (1, 1), False, "fp32")  # fmt: skip
    group = build_group(case, device, SparseOptimizerConfig())
    ids = torch.arange(4, device=device)
    for label, offsets in (
        ("decreasing offsets", [0, 3, 2, 4]),
        ("last offset short of len(ids)", [0, 1, 2, 3]),
        ("last offset past len(ids)", [0, 2, 3, 900]),
    ):
        tensor = torch.tensor(offsets, device=device)
        results.append(raises(f"{case.name}: {label}", OffsetsError, group, ids, tensor))
    return results


def raises(name: str, error: type[Exception], group, ids, offsets) -> dict:
    batch = (offsets.numel() - 1) // len(group.layout.features)
    try:
        with torch.no_grad():
            group.pooled(ids, offsets, batch)
        raised = "nothing"
    except error as caught:
        raised = f"{type(caught).__name__}: {caught}"
    except Exception as caught:  # noqa: BLE001 - recorded, the run goes on
        raised = f"unexpected {type(caught).__name__}: {caught}"
    ok = raised.startswith(error.__name__)
    return {"case": name, "check": f"raises {error.__name__}", "raised": raised, "ok": ok}


# ---- the run ---------------------------------------------------------------------------------


@dataclass
class Run:
    device: torch.device
    timer: Timer
    copy_tbps: float
    deadline: float
    tune: bool = True
    results: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    # Best forward tiles found on case A hash, per (padded row width, dtype).
    tuned: dict[tuple[int, str], object] = field(default_factory=dict)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, case: Case, candidate: str, step: str, timing: Timing | str, **facts) -> None:
        entry = {"case": case.name, "method": case.method, "candidate": candidate, "step": step}
        if isinstance(timing, str):
            entry["error"] = timing
        else:
            entry.update(
                median_ms=timing.median_ms, p99_ms=timing.p99_ms, iterations=timing.iterations
            )
            seconds = timing.median_ms * 1e-3
            if "bytes" in facts:
                entry["gbps"] = facts["bytes"] / seconds / 1e9
                entry["pct_of_copy"] = 100 * facts["bytes"] / seconds / 1e12 / self.copy_tbps
            if "lookups" in facts:
                entry["lookups_per_s"] = facts["lookups"] / seconds
        entry.update(facts)
        self.results.append(entry)
        print(f"  {case.name:24s} {candidate:30s} {step:8s} {describe(entry)}", flush=True)


def describe(entry: dict) -> str:
    if "error" in entry:
        return "error: " + entry["error"].splitlines()[-1][:80]
    text = f"{entry['median_ms']:.3f} ms"
    if "gbps" in entry:
        text += f"  {entry['gbps']:.0f} GB/s ({entry['pct_of_copy']:.0f}% of copy)"
    return text


def attempt(step: Callable[[], T]) -> T | str:
    """What `step` returns, or the error that stopped it (the run goes on and records it)."""
    try:
        return step()
    except Exception:  # noqa: BLE001 - any failure of one candidate is recorded, not fatal
        return traceback.format_exc(limit=3)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class Volumes:
    """What one step of a case moves (fbgemm's convention) and how many lookups it does."""

    forward: int
    train_sgd: int
    train_adagrad: int
    lookups: int

    def facts(self, step: str) -> dict:
        moved = {"fwd": self.forward, "sgd": self.train_sgd, "adagrad": self.train_adagrad}
        return {"bytes": moved[step], "lookups": self.lookups}


def run_case(run: Run, case: Case, baselines: bool) -> None:
    """Check, then time the kernels and the baselines of one case."""
    device = run.device
    run.checks.extend(check_case(case, device, check_scale=0.01))
    batch = make_batch(case, device, seed=7)
    volumes = time_fused(run, case, batch)
    adagrad = build_group(case, device, SparseOptimizerConfig("rowwise_adagrad", lr=LR))
    upstream = torch.randn(batch.batch, adagrad.layout.total_columns, device=device)

    def adagrad_train() -> None:
        adagrad.pooled(batch.ids, batch.offsets, batch.batch, input_counts=batch.counts).backward(
            upstream
        )

    timing = attempt(lambda: run.timer(adagrad_train))
    run.record(case, "fused rowwise_adagrad", "train", timing, **volumes.facts("adagrad"))
    time_torch_composed(run, case, adagrad, batch, upstream, volumes)
    if baselines:
        for sparse in (True, False):
            time_embedding_bags(run, case, adagrad, batch, upstream, volumes, sparse)


def time_fused(run: Run, case: Case, batch: Batch) -> Volumes:
    """The kernels with fused SGD: full-shape check, forward (with and without the input
    check), forward + backward + update, and the backward's torch segment step alone."""
    group = build_group(case, run.device, SparseOptimizerConfig("sgd", lr=LR))
    layout = group.layout
    with torch.no_grad():
        output, written = poisoned_forward(group, batch)
        error = max_relative_error(output, TorchComposed(group, trainable=False)(batch))
    del output
    tolerance = 1e-5 if case.dtype == "fp32" else 1e-2
    run.checks.append(
        check_record(case, "full-shape forward vs torch-composed", error, tolerance, written)
    )
    distinct = unique_rows(layout, batch)
    volumes = Volumes(
        forward_bytes(layout, batch),
        train_bytes(layout, batch, distinct, adagrad=False),
        train_bytes(layout, batch, distinct, adagrad=True),
        lookups(layout, batch),
    )
    upstream = torch.randn(batch.batch, layout.total_columns, device=run.device)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return group.pooled(batch.ids, batch.offsets, batch.batch, input_counts=batch.counts)

    def train() -> None:
        group.pooled(batch.ids, batch.offsets, batch.batch, input_counts=batch.counts).backward(
            upstream
        )

    group.forward_blocks = tuned_blocks(run, case, group, forward)
    blocks = group.forward_blocks
    timing = attempt(lambda: run.timer(forward))
    run.record(case, "fused", "fwd", timing, tiles=tiles_label(blocks), **volumes.facts("fwd"))
    group.check_inputs = False
    timing = attempt(lambda: run.timer(forward))
    run.record(case, "fused, no input check", "fwd", timing, **volumes.facts("fwd"))
    group.check_inputs = True
    timing = attempt(lambda: run.timer(train))
    run.record(case, "fused sgd", "train", timing, **volumes.facts("sgd"))
    timing = attempt(lambda: time_segment_step(group, batch, run.timer))
    run.record(case, "fused: segment step only", "train", timing, unique_rows=distinct)
    return volumes


def tuned_blocks(run: Run, case: Case, group, forward: Callable[[], object]):
    """Forward tiles for this case: on case A hash, the fastest of a few (each recorded, short
    runs); on other A cases of the same row width and dtype, that one; else the default."""
    from embedding_tables.kernels import ops

    block_d = next_power_of_2(group.layout.max_dim)
    key = (block_d, case.dtype)
    if not case.name.startswith("A/hash/") or not run.tune:
        return run.tuned.get(key) if case.name.startswith("A/") else None
    short = Timer(run.device, iters=20, warmup=3)
    candidates = [
        None,
        ops.ForwardBlocks(2, 32, block_d, 8),
        ops.ForwardBlocks(1, 32, block_d, 4),
        ops.ForwardBlocks(4, 8, block_d, 4),
        ops.ForwardBlocks(1, 16, block_d, 4),
    ]
    best, best_ms = None, math.inf
    for blocks in candidates:
        group.forward_blocks = blocks
        timing = attempt(lambda: short(forward))
        label = f"fused tiles {tiles_label(blocks)}"
        run.record(case, label, "tune", timing)
        if not isinstance(timing, str) and timing.median_ms < best_ms:
            best, best_ms = blocks, timing.median_ms
    run.tuned[key] = best
    return best


def tiles_label(blocks) -> str:
    """bags x ids x columns, warps of a ForwardBlocks (or "default": the launcher's choice)."""
    if blocks is None:
        return "default"
    return f"{blocks.bags}x{blocks.ids}x{blocks.d} w{blocks.num_warps}"


def next_power_of_2(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


def time_torch_composed(
    run: Run, case: Case, group, batch: Batch, upstream: torch.Tensor, volumes: Volumes
) -> None:
    """The same method as torch ops on the same tables: forward, and sparse grad + SGD."""
    composed = TorchComposed(group, trainable=True)
    optimizer = torch.optim.SGD(list(composed.tables), lr=LR)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return composed(batch)

    def train() -> None:
        composed(batch).backward(upstream)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timing = attempt(lambda: run.timer(forward))
    run.record(case, "torch-composed", "fwd", timing, **volumes.facts("fwd"))
    timing = attempt(lambda: run.timer(train))
    run.record(case, "torch-composed sparse sgd", "train", timing, **volumes.facts("sgd"))


def time_embedding_bags(
    run: Run,
    case: Case,
    group,
    batch: Batch,
    upstream: torch.Tensor,
    volumes: Volumes,
    sparse: bool,
) -> None:
    """nn.EmbeddingBag per table on the transformed rows: forward (once), and dense or sparse
    grad + SGD."""
    label = f"nn.EmbeddingBag {'sparse' if sparse else 'dense'} sgd"
    bags = attempt(lambda: EmbeddingBags(group, batch, sparse))
    if isinstance(bags, str):
        run.record(case, label, "train", bags)
        return
    optimizer = torch.optim.SGD(list(bags.parameters()), lr=LR)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return bags()

    def train() -> None:
        bags().backward(upstream)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if sparse:
        timing = attempt(lambda: run.timer(forward))
        run.record(case, "nn.EmbeddingBag", "fwd", timing, **volumes.facts("fwd"))
    run.record(case, label, "train", attempt(lambda: run.timer(train)), **volumes.facts("sgd"))


def time_segment_step(group, batch: Batch, timer: Timer) -> Timing:
    """The backward's torch part alone (sort by row, runs, items) on this batch's entries."""
    from embedding_tables.kernels import ops

    features = list(range(len(group.layout.features)))
    plan = plan_call(group.layout, True, batch.batch, batch.ids.numel(), features, batch.counts)
    _, saved = ops.fused_forward(
        group.device_layout,
        group.flat_weights,
        batch.ids,
        batch.offsets,
        ops.DeviceCall.of(plan, batch.ids.device),
        True,
        save=True,
    )
    return timer(lambda: ops.sort_entries_by_row(saved.entry_rows, ops.ITEM_ENTRIES))


def run_serving(run: Run, case: Case) -> None:
    """E: forward latency per call (wall clock with sync) for serving batch sizes."""
    group = build_group(case, run.device, None)
    group.requires_grad_(False)
    for size in SERVING_BATCHES:
        if run.time_left() < 10:
            run.skipped.append(f"E/batch {size}: out of time")
            continue
        serve_batch(run, case, group, size)


def serve_batch(run: Run, case: Case, group, size: int) -> None:
    batch = make_batch(case, run.device, seed=size, batch=size)
    served = Case(
        f"E/hash/batch{size}", "hash", case.tables, case.feature_to_table, size, case.bag,
        False, "fp32",
    )  # fmt: skip
    bags = EmbeddingBags(group, batch, sparse=False).requires_grad_(False)
    composed = TorchComposed(group, trainable=False)

    def fused() -> torch.Tensor:
        with torch.no_grad():
            return group.pooled(batch.ids, batch.offsets, size, input_counts=batch.counts)

    def plain() -> torch.Tensor:
        with torch.no_grad():
            return bags()

    def torch_ops() -> torch.Tensor:
        with torch.no_grad():
            return composed(batch)

    facts = {"bytes": forward_bytes(group.layout, batch), "lookups": lookups(group.layout, batch)}
    for label, step in (
        ("fused", fused),
        ("nn.EmbeddingBag", plain),
        ("torch-composed", torch_ops),
    ):
        timing = attempt(lambda step=step: run.timer.wall(step))
        run.record(served, label, "serve", timing, **facts)


def summary_and_targets(run: Run, device_name: str) -> tuple[dict, list[dict]]:
    def pick(case_prefix: str, candidate: str, step: str) -> list[dict]:
        return [
            r
            for r in run.results
            if r["case"].startswith(case_prefix)
            and r["candidate"] == candidate
            and r["step"] == step
            and "error" not in r
        ]

    def time_of(case: str, candidate: str, step: str) -> float | None:
        found = [r for r in pick(case, candidate, step) if r["case"] == case]
        return found[0]["median_ms"] if found else None

    hash_fwd = pick("A/hash/", "fused", "fwd")
    best = max(hash_fwd, key=lambda r: r["gbps"], default=None)
    qr_ratios, train_ratios = [], []
    for r in pick("A/qr_mult/", "fused", "fwd"):
        torch_ms = time_of(r["case"], "torch-composed", "fwd")
        if torch_ms:
            qr_ratios.append((torch_ms / r["median_ms"], r["case"]))
    for r in pick("A/hash/", "fused sgd", "train"):
        bag_ms = time_of(r["case"], "nn.EmbeddingBag sparse sgd", "train")
        if bag_ms:
            train_ratios.append((bag_ms / r["median_ms"], r["case"]))
    worst_qr = min(qr_ratios, default=None)
    worst_train = min(train_ratios, default=None)
    summary = {
        "device": device_name,
        "copy_tbps": run.copy_tbps,
        "hash_fwd_tbps": None if best is None else best["gbps"] / 1e3,
        "qr_mult_vs_torch": None if worst_qr is None else worst_qr[0],
        "fwd_bwd_vs_embeddingbag": None if worst_train is None else worst_train[0],
    }
    segment = {r["case"]: r for r in pick("A/hash/", "fused: segment step only", "train")}
    targets = [
        target(
            "hash_fwd_tbps",
            summary["hash_fwd_tbps"],
            TARGET_HASH_FWD_TBPS,
            "best case A hash forward (" + (best["case"] if best else "none") + ")",
            None
            if best is None
            else f"{best['pct_of_copy']:.0f}% of the measured copy ({run.copy_tbps:.2f} TB/s); "
            "the target is 83% of an H100's copy",
        ),
        target(
            "qr_mult_vs_torch",
            summary["qr_mult_vs_torch"],
            TARGET_QR_MULT_VS_TORCH,
            "worst case A qr mult forward, torch-composed / fused ("
            + (worst_qr[1] if worst_qr else "none")
            + ")",
            None,
        ),
        target(
            "fwd_bwd_vs_embeddingbag",
            summary["fwd_bwd_vs_embeddingbag"],
            TARGET_FWD_BWD_VS_EMBEDDINGBAG,
            "worst case A hash, nn.EmbeddingBag(sparse) + SGD / fused SGD ("
            + (worst_train[1] if worst_train else "none")
            + ")",
            None
            if worst_train is None or worst_train[1] not in segment
            else (
                f"of the fused step's {time_of(worst_train[1], 'fused sgd', 'train'):.3f} ms, the "
                f"torch segment step (sort by row) takes {segment[worst_train[1]]['median_ms']:.3f}"
                " ms"
            ),
        ),
    ]
    return summary, targets


def target(key: str, value, goal: float, measured_on: str, diagnosis: str | None) -> dict:
    entry = {"key": key, "value": value, "target": goal, "measured_on": measured_on}
    if value is None:
        entry.update(met=False, why="not measured (skipped or failed: see results)")
        return entry
    entry["met"] = value >= goal
    if not entry["met"]:
        entry["missed_by_pct"] = 100 * (goal - value) / goal
    if diagnosis:
        entry["diagnosis"] = diagnosis
    return entry


def machine(device: torch.device) -> dict:
    """The machine, in the shape of embtab.machine.machine_info (which imports `models`, hence
    torchrec: absent on the GPU machine), with the GPU's name and properties."""
    import triton

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "gpu": None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
        },
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "name": properties.name,
            "capability": f"{properties.major}.{properties.minor}",
            "memory_gib": round(properties.total_memory / (1 << 30), 1),
            "multiprocessors": properties.multi_processor_count,
        }
    return info


def print_table(run: Run, summary: dict, targets: list[dict]) -> None:
    print()
    print(f"{'case':26s} {'candidate':32s} {'step':6s} {'ms':>9s} {'GB/s':>7s} {'%copy':>6s}")
    for r in run.results:
        if "error" in r:
            print(f"{r['case']:26s} {r['candidate']:32s} {r['step']:6s} {'error':>9s}")
            continue
        gbps = f"{r['gbps']:.0f}" if "gbps" in r else ""
        pct = f"{r['pct_of_copy']:.0f}" if "pct_of_copy" in r else ""
        ms = f"{r['median_ms']:.3f}"
        if r["step"] == "serve":
            ms += f"/{r['p99_ms']:.3f}"
        print(f"{r['case']:26s} {r['candidate']:32s} {r['step']:6s} {ms:>9s} {gbps:>7s} {pct:>6s}")
    failed = [c for c in run.checks if not c["ok"]]
    print(f"\nchecks: {len(run.checks) - len(failed)}/{len(run.checks)} ok")
    for check in failed:
        print(f"  FAILED {check['case']}: {check['check']} {check}")
    for entry in targets:
        if entry["value"] is None:
            state = "not measured"
        elif entry["met"]:
            state = "met"
        else:
            state = f"MISSED by {entry['missed_by_pct']:.0f}%"
        print(f"target {entry['key']}: {entry['value']} (>= {entry['target']}) {state}")
    print("summary:", json.dumps(summary))


def results_document(run: Run, name: str, started: float, complete: bool) -> dict:
    summary, targets = summary_and_targets(run, name)
    return {
        "machine": machine(run.device),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "complete": complete,
        "results": run.results,
        "checks": run.checks,
        "targets": targets,
        "skipped": run.skipped,
        "summary": summary,
        "notes": (
            "Ratios in the summary are the worst case A sub-case (all are in results); "
            "hash_fwd_tbps is the best case A hash forward. GB/s: fbgemm's convention (rows "
            "read + output written; training adds output-gradient reads and updated rows), so "
            "Zipf batches whose repeated rows hit L2 can pass the copy bandwidth. Targets are "
            "stated for an H100 (3.0 TB/s copy); see bench/GPU_NOTES.md."
        ),
        "elapsed_s": time.monotonic() - started,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"default {RESULT}")
    parser.add_argument("--cases", default="A,C,D,E")
    parser.add_argument("--budget-s", type=float, default=500.0)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--smoke", action="store_true", help="GPU, 1%% of every size: compiles and checks fast"
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny")
    parser.add_argument(
        "--no-tune", action="store_true", help="keep the default forward tiles on case A"
    )
    args = parser.parse_args()
    started = time.monotonic()
    if not triton_available():
        print("bench/gpu_kernels.py times the fused Triton kernels: install Triton first")
        return 2
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--dry-run runs the kernels on CPU: start it with TRITON_INTERPRET=1")
            return 2
        device, scale, iters, warmup = torch.device("cpu"), 1e-4, 2, 1
    else:
        if not torch.cuda.is_available():
            print(
                "no CUDA device: bench/gpu_kernels.py measures GPU kernels and writes no results "
                "without one (use --dry-run with TRITON_INTERPRET=1 to exercise its logic on CPU)"
            )
            return 2
        if args.iters < 100:
            print("--iters must be >= 100 for results (medians over at least 100 iterations)")
            return 2
        scale = 0.01 if args.smoke else 1.0
        device, iters, warmup = torch.device("cuda"), args.iters, args.warmup
    # A smoke run's numbers are not the benchmark's: written only where --out says.
    out = None if args.dry_run or (args.smoke and args.out is None) else (args.out or RESULT)
    timer = Timer(device, iters, warmup)
    copy = copy_bandwidth(device, timer, gib=0.01 if args.dry_run else 2.0)
    run = Run(device, timer, copy, started + args.budget_s, tune=not args.no_tune)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    print(f"{name}: device-to-device copy {copy:.2f} TB/s", flush=True)
    wanted = set(args.cases.split(","))
    plan: list[tuple[str, Callable[[], None]]] = [
        ("bad input", lambda: run.checks.extend(check_bad_inputs(device)))
    ]

    def add_a(methods: tuple[str, ...]) -> None:
        for method in methods if "A" in wanted else ():
            for dim in (128, 256):
                for dtype in ("fp32", "fp16"):
                    case = case_a(method, dim, dtype, scale)
                    baselines = method in ("hash", "full")
                    plan.append((case.name, lambda c=case, b=baselines: run_case(run, c, b)))

    # The targets' cases first, then C, D, E, then the rest of A: what the budget cuts is last.
    add_a(("hash", "qr"))
    if "C" in wanted:
        plan.append(("C", lambda: run_case(run, case_c(scale), True)))
    if "D" in wanted:
        plan.append(("D/hash", lambda: run_case(run, case_d("hash", scale), True)))
        plan.append(("D/qr_mult", lambda: run_case(run, case_d("qr", scale), False)))
    if "E" in wanted:
        plan.append(("E", lambda: run_serving(run, case_c(scale, name="E"))))
    add_a(("unified", "full"))
    for label, step in plan:
        if run.time_left() < 20:
            run.skipped.append(f"{label}: out of time budget")
            print(f"skipping {label}: out of time", flush=True)
            continue
        print(f"[{time.monotonic() - started:6.1f}s] {label}", flush=True)
        try:
            step()
        except Exception:  # noqa: BLE001 - one case failing must not lose the others
            run.skipped.append(f"{label}: failed: {traceback.format_exc(limit=4)}")
            print(traceback.format_exc(limit=4), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if out is not None:
            # Written after every case, so that a run cut short still leaves its results.
            write_results(out, results_document(run, name, started, complete=False))
    document = results_document(run, name, started, complete=True)
    text = json.dumps(document, indent=1) + "\n"
    print_table(run, document["summary"], document["targets"])
    ok = all(c["ok"] for c in run.checks)
    if out is None:
        print(f"\nno results written ({len(text)} bytes of JSON): dry or smoke run without --out")
        return 0 if ok else 1
    write_results(out, document)
    print(f"wrote {out}")
    return 0 if ok else 1


def write_results(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(document, indent=1) + "\n")
    partial.replace(path)


if __name__ == "__main__":
    sys.exit(main())
