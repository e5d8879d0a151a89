"""The fused Triton kernels run by Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors, on
small shapes, against the plain-torch reference: the hash bit for bit, every method pooled and
sequence (sum, mean, per-sample weights, empty bags) with poisoned outputs, the fused Adagrad /
SGD update and dense gradients, long runs split across programs, half-precision rows, the
bad-input errors, and EmbeddingCollection routed through the kernels.

Triton's interpreter must be on before Triton is first imported (its own `tl.sum` etc. are
jit functions), and torchrec imports Triton, so these cases run in a fresh process:
`test_kernels_interpreter.py` starts it. To run them directly:

    TRITON_INTERPRET=1 python -m pytest tests/embedding_tables/kernels_interpreter_cases.py
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip(
    "triton", reason="Triton is not installed (pip install -e '.[dev]'); the kernel tests need it"
)
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "needs TRITON_INTERPRET=1 from process start; test_kernels_interpreter.py runs it so",
        allow_module_level=True,
    )

from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import embedding_tables.collection as collection_module  # noqa: E402
import embedding_tables.kernels.group as group_module  # noqa: E402
import embedding_tables.kernels.layout as layout_module  # noqa: E402
from embedding_tables import (  # noqa: E402
    EmbeddingCollection,
    IdError,
    OffsetsError,
    SparseOptimizerConfig,
    TableConfig,
)
from embedding_tables.hashing import bucket, bucket_int  # noqa: E402
from embedding_tables.interfaces import TableGroupLookup
from embedding_tables.kernels import ops, triton_kernels  # noqa: E402
from embedding_tables.methods import QR, Full, GraphHash, Method, TTRec
from embedding_tables.planning import PhysicalTable  # noqa: E402
from embedding_tables.reference import (  # noqa: E402
    reference_pooled,
    reference_sequence,
    reference_touched_rows,
    sparse_update,
)
from tests.embedding_tables.helpers import method_case, random_kjt  # noqa: E402

FusedTableGroup = group_module.FusedTableGroup
METHODS = ["full", "hash", "unified", "qr_mult", "qr_add", "qr_concat", "robe", "mixed"]
FP32 = {"rtol": 1e-5, "atol": 1e-6}
HALF = {"rtol": 1e-2, "atol": 1e-3}


def test_kernels_are_interpreted() -> None:
    assert isinstance(triton_kernels.fused_lookup_kernel, InterpretedFunction)


def test_the_fused_group_is_a_table_group_lookup() -> None:
    _, _, group, _ = build("hash")
    assert isinstance(group, TableGroupLookup)


# ---- helpers -----------------------------------------------------------------------------


def build(method: str, pooling: str = "sum", dtype: str = "fp32", optimizer=None):
    tables, feature_to_table = method_case(method, pooling, dtype)
    specs, physical = layout_module.feature_specs(tables, feature_to_table)
    group = FusedTableGroup(physical, specs, optimizer, "cpu")
    plans = {spec.plan.config.name: spec.plan for spec in specs}
    return tables, feature_to_table, group, plans


def jagged_inputs(features: KeyedJaggedTensor):
    """ids, complete offsets, per-sample weights, ids per key, batch size of a KJT."""
    lengths = features.lengths()
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return (
        features.values(),
        offsets,
        features.weights_or_none(),
        features.length_per_key(),
        features.stride(),
    )


def reference_weights(group) -> dict[str, torch.Tensor]:
    return {
        table.name: group.weight(t).detach().float().clone().requires_grad_()
        for t, table in enumerate(group.tables)
    }


def split_pooled(group, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
    columns = group.layout.feature_columns
    return {
        spec.name: pooled[:, columns[f] : columns[f] + spec.output_dim]
        for f, spec in enumerate(group.layout.features)
    }


def group_outputs(group, features: KeyedJaggedTensor, sequence: bool) -> dict[str, torch.Tensor]:
    ids, offsets, weights, counts, batch = jagged_inputs(features)
    if sequence:
        rows = group.sequence(ids, counts)
        return {spec.name: r for spec, r in zip(group.layout.features, rows, strict=True)}
    return split_pooled(group, group.pooled(ids, offsets, batch, weights, input_counts=counts))


def poisoned_forward(group, features: KeyedJaggedTensor, sequence: bool) -> dict[str, torch.Tensor]:
    """The forward launch writing into a NaN-filled output: every element must be written."""
    ids, offsets, weights, counts, batch = jagged_inputs(features)
    features_in = list(range(len(group.layout.features)))
    plan = layout_module.plan_call(
        group.layout, not sequence, batch, ids.numel(), features_in, counts
    )
    out = torch.full((plan.output_numel,), float("nan"))
    ops.fused_forward(
        group.device_layout,
        group.flat_weights,
        ids,
        offsets,
        ops.DeviceCall.of(plan, group.device),
        not sequence,
        sample_weights=None if sequence else weights,
        out=out,
    )
    assert not torch.isnan(out).any(), "an output element was not written"
    if not sequence:
        return split_pooled(group, out.view(batch, -1))
    return {
        spec.name: out[plan.output_offsets[f] :][: counts[f] * spec.output_dim].view(
            -1, spec.output_dim
        )
        for f, spec in enumerate(group.layout.features)
    }


def run_reference(plans, feature_to_table, weights, features, sequence: bool):
    function = reference_sequence if sequence else reference_pooled
    return function(plans, feature_to_table, weights, features)


# (pooling, per-sample weights, sequence); sequence rows are unpooled and unweighted.
LOOKUPS = {
    "sum": ("sum", False, False),
    "weighted-sum": ("sum", True, False),
    "mean": ("mean", False, False),
    "weighted-mean": ("mean", True, False),
    "sequence": ("sum", False, True),
}


# ---- the hash --------------------------------------------------------------------------------


def test_triton_hash_equals_hashing_bucket_bit_for_bit() -> None:
    generator = torch.Generator().manual_seed(0)
    extremes = torch.tensor([0, 1, -1, 2**31, -(2**31), 2**63 - 1, -(2**63), 10**12])
    ids = torch.cat([extremes, torch.randint(-(2**63), 2**63 - 1, (3000,), generator=generator)])
    for seed in (0, 3, 2**40 + 7, -5):
        for num_rows in (1, 2, 1000003, 2**31 + 11, 2**62 + 1):
            assert torch.equal(ops.bucket(ids, seed, num_rows), bucket(ids, seed, num_rows))
    assert ops.bucket(extremes, 3, 1000003).tolist() == [
        bucket_int(v, 3, 1000003) for v in extremes.tolist()
    ]


# ---- forward and gradients -------------------------------------------------------------------


# Every method with sum, weighted mean and sequence; the other poolings on the mixed case (which
# holds every method), to keep the interpreter's time down.
FORWARD_CASES = [(m, lookup) for m in METHODS for lookup in ("sum", "weighted-mean", "sequence")]
FORWARD_CASES += [("mixed", "mean"), ("mixed", "weighted-sum")]


@pytest.mark.parametrize("method, lookup", FORWARD_CASES)
def test_forward_and_dense_gradients_match_reference(method: str, lookup: str) -> None:
    pooling, weighted, sequence = LOOKUPS[lookup]
    torch.manual_seed(1)
    tables, feature_to_table, group, plans = build(method, pooling)
    features = random_kjt(tables, feature_to_table, weighted=weighted, any_int64=True, seed=4)
    weights = reference_weights(group)
    expected = run_reference(plans, feature_to_table, weights, features, sequence)

    poisoned = poisoned_forward(group, features, sequence)
    outputs = group_outputs(group, features, sequence)
    for name in feature_to_table:
        assert outputs[name].shape == expected[name].shape
        torch.testing.assert_close(poisoned[name], expected[name], **FP32)
        torch.testing.assert_close(outputs[name], expected[name], **FP32)

    upstream = {name: torch.randn_like(out) for name, out in outputs.items()}
    sum((outputs[n] * upstream[n]).sum() for n in outputs).backward()
    sum((expected[n] * upstream[n]).sum() for n in expected).backward()
    for t, table in enumerate(group.tables):
        torch.testing.assert_close(group.weight(t).grad, weights[table.name].grad, **FP32)


@pytest.mark.parametrize("sequence", [False, True], ids=["weighted-mean", "sequence"])
@pytest.mark.parametrize("kind", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("method", METHODS)
def test_fused_update_matches_reference(method: str, kind: str, sequence: bool) -> None:
    torch.manual_seed(2)
    optimizer = SparseOptimizerConfig(kind, lr=0.3, eps=1e-3, initial_accumulator_value=0.1)
    tables, feature_to_table, group, plans = build(
        method, "sum" if sequence else "mean", optimizer=optimizer
    )
    assert list(group.parameters()) == []
    features = random_kjt(tables, feature_to_table, weighted=not sequence, any_int64=True, seed=5)
    check_fused_update(group, plans, feature_to_table, features, optimizer, sequence)


def check_fused_update(group, plans, feature_to_table, features, optimizer, sequence) -> None:
    weights = reference_weights(group)
    momenta = {t.name: group.momentum(i) for i, t in enumerate(group.tables)}
    momenta = {k: None if v is None else v.clone() for k, v in momenta.items()}
    expected = run_reference(plans, feature_to_table, weights, features, sequence)
    outputs = group_outputs(group, features, sequence)
    for name in feature_to_table:
        torch.testing.assert_close(outputs[name], expected[name], **FP32)
    upstream = {name: torch.randn_like(out) for name, out in outputs.items()}
    sum((outputs[n] * upstream[n]).sum() for n in outputs).backward()
    sum((expected[n] * upstream[n]).sum() for n in expected).backward()

    touched = reference_touched_rows(plans, feature_to_table, features)
    for t, table in enumerate(group.tables):
        new = weights[table.name].detach().clone()
        rows = touched.get(table.name, set())
        sparse_update(new, momenta[table.name], weights[table.name].grad, rows, optimizer)
        torch.testing.assert_close(group.weight(t).float(), new, **FP32)
        if optimizer.kind == "rowwise_adagrad":
            torch.testing.assert_close(group.momentum(t), momenta[table.name], **FP32)
        assert set(group.take_touched_rows(t).tolist()) == rows
        assert group.take_touched_rows(t).numel() == 0


@pytest.mark.parametrize("method", ["hash", "qr_mult"])
@pytest.mark.parametrize("kind", ["rowwise_adagrad", None])
def test_long_runs_are_split_across_programs_and_resummed(method: str, kind) -> None:
    """Hot rows read by more ids than one backward item takes: partial sums, then pass 2."""
    torch.manual_seed(3)
    optimizer = None if kind is None else SparseOptimizerConfig(kind, lr=0.2, eps=1e-3)
    tables, feature_to_table, group, plans = build(method, "sum", optimizer=optimizer)
    group.backward_blocks = ops.BackwardBlocks(
        items=4, entries=2, runs=2, partials=2, item_entries=3, num_warps=4
    )
    keys = list(feature_to_table)
    lengths = torch.full((len(keys) * 4,), 6)
    values = torch.tensor([7, 7, 7, 7, 11, 7] * (len(keys) * 4))
    features = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)
    if optimizer is not None:
        check_fused_update(group, plans, feature_to_table, features, optimizer, False)
        return
    weights = reference_weights(group)
    outputs = group_outputs(group, features, False)
    expected = reference_pooled(plans, feature_to_table, weights, features)
    sum(out.sum() for out in outputs.values()).backward()
    sum(out.sum() for out in expected.values()).backward()
    for t, table in enumerate(group.tables):
        torch.testing.assert_close(group.weight(t).grad, weights[table.name].grad, **FP32)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_rows_within_1e_2(dtype: str) -> None:
    torch.manual_seed(4)
    tables, feature_to_table = method_case("mixed", "mean", "fp16")
    specs, physical = layout_module.feature_specs(tables, feature_to_table)
    physical = [PhysicalTable(t.name, t.logical_table, t.num_rows, t.dim, dtype) for t in physical]
    optimizer = SparseOptimizerConfig("rowwise_adagrad", lr=0.05)
    group = FusedTableGroup(physical, specs, optimizer, "cpu")
    assert group.flat_weights.dtype == group_module.TORCH_DTYPES[dtype]
    plans = {spec.plan.config.name: spec.plan for spec in specs}
    features = random_kjt(tables, feature_to_table, weighted=True, seed=6)
    weights = reference_weights(group)
    expected = reference_pooled(plans, feature_to_table, weights, features)
    outputs = poisoned_forward(group, features, sequence=False)
    for name in feature_to_table:
        torch.testing.assert_close(outputs[name], expected[name], **HALF)
    outputs = group_outputs(group, features, sequence=False)
    sum(out.sum() for out in outputs.values()).backward()
    sum(out.sum() for out in expected.values()).backward()
    touched = reference_touched_rows(plans, feature_to_table, features)
    for t, table in enumerate(group.tables):
        new = weights[table.name].detach().clone()
        momentum = torch.zeros(new.shape[0])
        rows = touched.get(table.name, set())
        sparse_update(new, momentum, weights[table.name].grad, rows, optimizer)
        torch.testing.assert_close(group.weight(t).float(), new, **HALF)


def test_batches_of_empty_bags_pool_to_zeros_and_update_nothing() -> None:
    optimizer = SparseOptimizerConfig("sgd", lr=0.5)
    tables, feature_to_table, group, _ = build("mixed", "mean", optimizer=optimizer)
    before = group.flat_weights.clone()
    features = random_kjt(tables, feature_to_table, max_len=0)
    pooled = poisoned_forward(group, features, sequence=False)
    assert all(torch.count_nonzero(out) == 0 for out in pooled.values())
    outputs = group_outputs(group, features, sequence=False)
    sum(out.sum() for out in outputs.values()).backward()
    assert torch.equal(group.flat_weights, before)
    rows = group_outputs(group, features, sequence=True)
    assert all(r.shape[0] == 0 for r in rows.values())
    ids, offsets, _, _, _ = jagged_inputs(features)
    assert group.pooled(ids, offsets[:1], 0).shape == (0, group.layout.total_columns)


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["full", "qr"])
@pytest.mark.parametrize("bad", [-1, 10, 2**40])
def test_out_of_range_ids_raise_the_cpu_paths_error(method: str, bad: int) -> None:
    specs, physical = layout_module.feature_specs([TableConfig("t", 10, 4, method)], {"item": "t"})
    group = FusedTableGroup(physical, specs, SparseOptimizerConfig(), "cpu")
    before = group.flat_weights.clone()
    ids = torch.tensor([3, bad])
    offsets = torch.tensor([0, 2])
    with pytest.raises(IdError, match=rf"'item'.*id {bad} "):
        group.pooled(ids, offsets, 1)
    with torch.no_grad(), pytest.raises(IdError, match=rf"'item'.*id {bad} "):
        group.pooled(ids, offsets, 1)
    with pytest.raises(IdError, match=rf"id {bad} "):
        group.sequence(ids, [2])
    assert torch.equal(group.flat_weights, before)


@pytest.mark.parametrize("method", [Full(out_of_range="hash"), QR(out_of_range="hash")])
def test_out_of_range_hash_option_hashes_into_range(method: Method) -> None:
    config = TableConfig("t", 10, 4, method, seed=5)
    specs, physical = layout_module.feature_specs([config], {"item": "t"})
    group = FusedTableGroup(physical, specs, None, "cpu")
    ids = torch.tensor([-7, 10, 2**62, 3])
    hashed = torch.where((ids >= 0) & (ids < 10), ids, bucket(ids, 5, 10))
    offsets = torch.tensor([0, 4])
    with torch.no_grad():
        assert torch.equal(group.pooled(ids, offsets, 1), group.pooled(hashed, offsets, 1))


@pytest.mark.parametrize(
    "offsets",
    [[0, 3, 2, 4], [0, 1, 2, 3], [0, 2, 3, 9], [1, 2, 3, 4], [0, -2, 3, 4]],
    ids=["decreasing", "short-of-the-ids", "past-the-ids", "not-from-0", "negative"],
)
@pytest.mark.parametrize("grad", [False, True])
def test_bad_offsets_are_a_clear_error(offsets: list[int], grad: bool) -> None:
    specs, physical = layout_module.feature_specs(
        [TableConfig("t", 100, 4, "hash", budget=7)], {"f": "t"}
    )
    group = FusedTableGroup(physical, specs, SparseOptimizerConfig(), "cpu")
    ids = torch.tensor([1, 2, 3, 4])
    with torch.set_grad_enabled(grad), pytest.raises(OffsetsError, match="offsets"):
        group.pooled(ids, torch.tensor(offsets), 3)


def test_ids_per_feature_must_describe_the_ids() -> None:
    specs, physical = layout_module.feature_specs(
        [TableConfig("t", 100, 4, "hash", budget=7)], {"f": "t", "g": "t"}
    )
    group = FusedTableGroup(physical, specs, SparseOptimizerConfig(), "cpu")
    ids = torch.arange(6)
    offsets = torch.tensor([0, 2, 3, 6])
    with pytest.raises(OffsetsError, match="per feature"):
        group.pooled(ids, offsets[:3], 1, input_counts=[2, 3])
    with pytest.raises(OffsetsError, match="offsets"):
        group.pooled(ids, torch.tensor([0, 1, 3, 4, 6]), 2, input_counts=[2, 4])
    with pytest.raises(OffsetsError, match="per feature"):
        group.sequence(ids, [2, 5])


# ---- EmbeddingCollection through the kernels -------------------------------------------------


@pytest.fixture
def kernel_collections(monkeypatch):
    """EmbeddingCollection on CPU routed as on CUDA: through the (interpreted) kernels."""
    monkeypatch.setattr(collection_module, "lookup_backend", lambda device_type: "triton")


@pytest.mark.parametrize("sequence", [False, True], ids=["weighted-mean", "sequence"])
def test_collection_routes_through_the_kernels(kernel_collections, sequence: bool) -> None:
    torch.manual_seed(5)
    optimizer = SparseOptimizerConfig("rowwise_adagrad", lr=0.3, eps=1e-3)
    tables, feature_to_table = method_case("mixed", "sum" if sequence else "mean")
    ec = EmbeddingCollection(tables, feature_to_table, optimizer=optimizer)
    assert all(isinstance(lookup, FusedTableGroup) for lookup in ec.tables.lookups)
    assert list(ec.parameters()) == []
    features = random_kjt(tables, feature_to_table, weighted=not sequence, any_int64=True)
    weights = {
        t.name: ec.tables.weight(t.name).detach().clone().requires_grad_()
        for t in ec.physical_tables()
    }
    momenta = {name: ec.tables.momentum(name).clone() for name in weights}
    expected = run_reference(ec.plans, feature_to_table, weights, features, sequence)
    if sequence:
        result = ec.sequence(features)
        outputs = {name: jagged.values() for name, jagged in result.items()}
        for name, jagged in result.items():
            assert torch.equal(jagged.lengths(), features[name].lengths())
    else:
        pooled = ec(features)
        assert pooled.keys() == list(feature_to_table)
        outputs = pooled.to_dict()
    for name in feature_to_table:
        torch.testing.assert_close(outputs[name], expected[name], **FP32)
    upstream = {name: torch.randn_like(out) for name, out in outputs.items()}
    sum((outputs[n] * upstream[n]).sum() for n in outputs).backward()
    sum((expected[n] * upstream[n]).sum() for n in expected).backward()
    touched = reference_touched_rows(ec.plans, feature_to_table, features)
    recorded = ec.take_touched_rows()
    for name, weight in weights.items():
        new = weight.detach().clone()
        sparse_update(new, momenta[name], weight.grad, touched.get(name, set()), optimizer)
        torch.testing.assert_close(ec.tables.weight(name), new, **FP32)
        assert set(recorded[name].tolist()) == touched.get(name, set())


@pytest.mark.parametrize("sequence", [False, True], ids=["weighted-mean", "sequence"])
def test_a_row_combine_table_takes_the_torch_ops_beside_the_kernels(
    kernel_collections, sequence: bool
) -> None:
    """ttrec's contraction is not the kernels': its cores are a group of their own (torch
    ops, the same fused update), the other tables one fused group."""
    torch.manual_seed(7)
    optimizer = SparseOptimizerConfig("rowwise_adagrad", lr=0.3, eps=1e-3)
    pooling = "sum" if sequence else "mean"
    tables, feature_to_table = method_case("mixed", pooling)
    tables = [*tables, TableConfig("tt", 900, 8, TTRec(rank=4), budget=0.2, pooling=pooling)]
    feature_to_table = {**feature_to_table, "tt": "tt"}
    ec = EmbeddingCollection(tables, feature_to_table, optimizer=optimizer)
    kinds = sorted(type(lookup).__name__ for lookup in ec.tables.lookups)
    assert kinds == ["FusedTableGroup", "TorchLookup"]
    features = random_kjt(tables, feature_to_table, weighted=not sequence, any_int64=True)
    weights = {
        t.name: ec.tables.weight(t.name).detach().clone().requires_grad_()
        for t in ec.physical_tables()
    }
    momenta = {name: ec.tables.momentum(name).clone() for name in weights}
    expected = run_reference(ec.plans, feature_to_table, weights, features, sequence)
    if sequence:
        outputs = {name: jagged.values() for name, jagged in ec.sequence(features).items()}
    else:
        outputs = ec(features).to_dict()
    for name in feature_to_table:
        torch.testing.assert_close(outputs[name], expected[name], **FP32)
    upstream = {name: torch.randn_like(out) for name, out in outputs.items()}
    sum((outputs[n] * upstream[n]).sum() for n in outputs).backward()
    sum((expected[n] * upstream[n]).sum() for n in expected).backward()
    touched = reference_touched_rows(ec.plans, feature_to_table, features)
    for name, weight in weights.items():
        new = weight.detach().clone()
        sparse_update(new, momenta[name], weight.grad, touched.get(name, set()), optimizer)
        torch.testing.assert_close(ec.tables.weight(name), new, **FP32)


def test_collection_dense_mode_and_checkpoints_match_the_cpu_path(kernel_collections) -> None:
    torch.manual_seed(6)
    tables, feature_to_table = method_case("mixed", "mean")
    fused = EmbeddingCollection(tables, feature_to_table, optimizer=None)
    assert len(list(fused.parameters())) == len(fused.physical_tables())
    collection_module_use = collection_module.lookup_backend
    collection_module.lookup_backend = lambda device_type: "fbgemm"
    try:
        plain = EmbeddingCollection(tables, feature_to_table, optimizer=None)
    finally:
        collection_module.lookup_backend = collection_module_use
    plain.load_state_dict(fused.state_dict())
    features = random_kjt(tables, feature_to_table, weighted=True, any_int64=True)
    fused_out, plain_out = fused(features).values(), plain(features).values()
    torch.testing.assert_close(fused_out, plain_out, **FP32)
    upstream = torch.randn_like(fused_out)
    (fused_out * upstream).sum().backward()
    (plain_out * upstream).sum().backward()
    for table in fused.physical_tables():
        torch.testing.assert_close(
            fused.tables.weight(table.name).grad, plain.tables.weight(table.name).grad, **FP32
        )


def test_collection_out_of_range_ids_and_graphhash_rows(kernel_collections) -> None:
    ec = EmbeddingCollection([TableConfig("t", 10, 4, "qr")], {"item": "t"}, None)
    bad = KeyedJaggedTensor(keys=["item"], values=torch.tensor([3, 10]), lengths=torch.tensor([2]))
    with pytest.raises(IdError, match=r"'item'.*id 10 "):
        ec(bad)

    class CycleMapping:
        num_rows = 50

        def transform_all(self, ids: torch.Tensor) -> torch.Tensor:
            return torch.stack([ids.remainder(5), 5 + ids.remainder(45)], dim=1)

    config = TableConfig("g", 1000, 4, GraphHash(graphhash_variant="double"), budget=0.05)
    tables, feature_to_table = [config, TableConfig("h", 100, 4, "hash")], {"a": "g", "b": "h"}
    mapping = CycleMapping()
    ec = EmbeddingCollection(tables, feature_to_table, None, mappings={"g": mapping})
    features = random_kjt(tables, feature_to_table)
    weights = {t.name: ec.tables.weight(t.name).detach() for t in ec.physical_tables()}
    expected = reference_pooled(ec.plans, feature_to_table, weights, features, {"g": mapping})
    torch.testing.assert_close(ec(features).to_dict()["a"], expected["a"], **FP32)
