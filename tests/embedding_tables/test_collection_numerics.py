"""The fast path against the plain-torch reference: pooled and sequence, forward, gradients and
fused updates, for every method; the tests with a sparse optimizer run once per backend
(`lookup_backend`: fbgemm's TBE and the torch lookup). Exact where the order of summation is
the same; otherwise within fp32 rounding (mean pooling scales before summing, Adagrad's
sqrt/divide)."""

from __future__ import annotations

import pytest
import torch

from embedding_tables import EmbeddingCollection, SparseOptimizerConfig
from embedding_tables.reference import (
    reference_pooled,
    reference_sequence,
    reference_touched_rows,
    sparse_update,
)
from tests.embedding_tables.helpers import method_case, random_kjt

METHODS = ["full", "hash", "unified", "qr_mult", "qr_add", "qr_concat", "robe", "ttrec", "mixed"]
FP32_ROUNDING = {"rtol": 2e-6, "atol": 1e-6}


def reference_weights(ec: EmbeddingCollection) -> dict[str, torch.Tensor]:
    return {
        table.name: ec.tables.weight(table.name).detach().float().clone().requires_grad_()
        for table in ec.physical_tables()
    }


def run_reference(ec, features, weights, sequence: bool):
    function = reference_sequence if sequence else reference_pooled
    return function(ec.plans, ec.feature_to_table, weights, features)


def fast_outputs(ec, features, sequence: bool) -> dict[str, torch.Tensor]:
    if sequence:
        return {k: v.values() for k, v in ec.sequence(features).items()}
    return ec(features).to_dict()


def check_outputs_and_lengths(ec, features, outputs, expected, sequence: bool) -> None:
    for feature in ec.feature_names:
        assert outputs[feature].shape == expected[feature].shape, feature
        assert outputs[feature].shape[1] == ec.output_dim(feature)
        torch.testing.assert_close(outputs[feature], expected[feature], **FP32_ROUNDING)
    if sequence:
        lengths = {k: v.lengths() for k, v in ec.sequence(features).items()}
        for feature, jagged in features.to_dict().items():
            assert torch.equal(lengths[feature], jagged.lengths())


# (pooling, per-sample weights, sequence): sequence rows are unpooled and unweighted.
LOOKUPS = [
    ("sum", False, False),
    ("sum", True, False),
    ("mean", False, False),
    ("mean", True, False),
    ("sum", False, True),
]


@pytest.mark.parametrize(
    "pooling, weighted, sequence",
    LOOKUPS,
    ids=["sum", "weighted-sum", "mean", "weighted-mean", "sequence"],
)
@pytest.mark.parametrize("method", METHODS)
def test_forward_and_gradients_match_reference(method, pooling, weighted, sequence) -> None:
    torch.manual_seed(1)
    tables, feature_to_table = method_case(method, pooling)
    ec = EmbeddingCollection(tables, feature_to_table, optimizer=None)
    features = random_kjt(tables, feature_to_table, weighted=weighted, any_int64=True)
    weights = reference_weights(ec)
    expected = run_reference(ec, features, weights, sequence)
    outputs = fast_outputs(ec, features, sequence)
    check_outputs_and_lengths(ec, features, outputs, expected, sequence)

    upstream = {f: torch.randn_like(out) for f, out in outputs.items()}
    sum((outputs[f] * upstream[f]).sum() for f in outputs).backward()
    sum((expected[f] * upstream[f]).sum() for f in expected).backward()
    for name, weight in weights.items():
        grad = ec.tables.weight(name).grad
        torch.testing.assert_close(grad, weight.grad, **FP32_ROUNDING)


@pytest.mark.parametrize("kind", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("sequence", [False, True], ids=["pooled", "sequence"])
@pytest.mark.parametrize("method", METHODS)
def test_fused_update_matches_reference(method, sequence, kind, lookup_backend) -> None:
    torch.manual_seed(2)
    optimizer = SparseOptimizerConfig(kind, lr=0.3, eps=1e-3, initial_accumulator_value=0.1)
    tables, feature_to_table = method_case(method, "mean" if not sequence else "sum")
    ec = EmbeddingCollection(tables, feature_to_table, optimizer=optimizer)
    assert ec.backend == lookup_backend
    assert list(ec.parameters()) == []  # fused weights are kept away from dense optimizers
    features = random_kjt(tables, feature_to_table, weighted=not sequence, any_int64=True)
    weights = reference_weights(ec)
    momenta = {name: ec.tables.momentum(name) for name in weights}
    momenta = {k: None if v is None else v.clone() for k, v in momenta.items()}
    for momentum in momenta.values():
        if momentum is not None:
            assert torch.all(momentum == 0.1)

    expected = run_reference(ec, features, weights, sequence)
    outputs = fast_outputs(ec, features, sequence)
    check_outputs_and_lengths(ec, features, outputs, expected, sequence)
    upstream = {f: torch.randn_like(out) for f, out in outputs.items()}
    sum((outputs[f] * upstream[f]).sum() for f in outputs).backward()
    sum((expected[f] * upstream[f]).sum() for f in expected).backward()

    touched = reference_touched_rows(ec.plans, ec.feature_to_table, features)
    recorded = ec.take_touched_rows()
    for name, weight in weights.items():
        new = weight.detach().clone()
        sparse_update(new, momenta[name], weight.grad, touched.get(name, set()), optimizer)
        torch.testing.assert_close(ec.tables.weight(name), new, rtol=1e-5, atol=1e-6)
        if kind == "rowwise_adagrad":
            torch.testing.assert_close(ec.tables.momentum(name), momenta[name], **FP32_ROUNDING)
        assert set(recorded[name].tolist()) == touched.get(name, set())
    assert all(rows.numel() == 0 for rows in ec.take_touched_rows().values())


def test_all_bags_empty_pool_to_zeros(lookup_backend) -> None:
    tables, feature_to_table = method_case("mixed", "mean")
    ec = EmbeddingCollection(tables, feature_to_table, optimizer=SparseOptimizerConfig())
    assert ec.backend == lookup_backend
    features = random_kjt(tables, feature_to_table, max_len=0)
    pooled = ec(features)
    assert pooled.values().shape == (5, sum(ec.output_dim(f) for f in ec.feature_names))
    assert torch.count_nonzero(pooled.values()) == 0
    sequence = ec.sequence(features)
    assert all(jagged.values().shape[0] == 0 for jagged in sequence.values())


def test_fp16_tables_match_reference(lookup_backend) -> None:
    torch.manual_seed(3)
    tables, feature_to_table = method_case("mixed", "sum", dtype="fp16")
    for optimizer in (None, SparseOptimizerConfig()):
        ec = EmbeddingCollection(tables, feature_to_table, optimizer=optimizer)
        assert ec.backend == lookup_backend
        assert all(t.dtype == "fp16" for t in ec.physical_tables())
        features = random_kjt(tables, feature_to_table, weighted=True)
        expected = run_reference(ec, features, reference_weights(ec), sequence=False)
        outputs = fast_outputs(ec, features, sequence=False)
        for feature in ec.feature_names:
            torch.testing.assert_close(outputs[feature], expected[feature], rtol=1e-3, atol=1e-4)


def test_keyed_tensor_order_and_widths_follow_feature_to_table(lookup_backend) -> None:
    tables, feature_to_table = method_case("mixed")
    ec = EmbeddingCollection(tables, feature_to_table, optimizer=SparseOptimizerConfig())
    assert ec.backend == lookup_backend
    pooled = ec(random_kjt(tables, feature_to_table))
    assert pooled.keys() == list(feature_to_table)
    assert pooled.length_per_key() == [8, 8, 4, 8, 4, 4]
