"""The torch lookup (EMBTAB_LOOKUP=torch, the CUDA default without fbgemm-gpu's CUDA build)
against fbgemm's TBE and the plain reference over several training steps, for every method on
plain physical tables; checkpoints both ways; per-sample weight gradients; allocation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedding_tables import EmbeddingCollection, SparseOptimizerConfig, TableConfig
from embedding_tables.backend import LOOKUP_SWITCH
from embedding_tables.graphhash import build_graphhash
from embedding_tables.methods import GraphHash
from embedding_tables.reference import (
    reference_pooled,
    reference_sequence,
    reference_touched_rows,
    sparse_update,
)
from tests.embedding_tables.helpers import method_case, random_kjt

STEPS = 3
# torch lookup vs fbgemm: the same fp32 sums, at most a rounding apart.
SAME_MATHS = {"rtol": 1e-6, "atol": 1e-7}
# either vs the reference, which works in float64 per id.
FP32_ROUNDING = {"rtol": 2e-6, "atol": 1e-6}
UPDATED = {"rtol": 1e-5, "atol": 1e-6}


def graphhash_case(pooling: str):
    """A double graphhash table (two reads of one table per id) beside a hash table."""
    users = np.repeat(np.arange(60), 3)
    items = (users * 7 + np.tile(np.arange(3), 60)) % 40
    mapping = build_graphhash(users, items, budget_rows=24, variant="double").user
    tables = [
        TableConfig("g", 60, 8, GraphHash(graphhash_variant="double"), budget=24, pooling=pooling),
        TableConfig("h", 1000, 4, "hash", budget=50, pooling=pooling),
    ]
    return tables, {"a": "g", "b": "h", "c": "g"}, {"g": mapping}


def case(name: str, pooling: str):
    """(tables, feature_to_table, mappings): `mixed` holds full, hash, unified, qr mult and
    qr add tables; `qr_concat` and `graphhash` the methods it lacks."""
    if name == "graphhash":
        return graphhash_case(pooling)
    tables, feature_to_table = method_case(name, pooling)
    return tables, feature_to_table, None


def build(backend: str, monkeypatch: pytest.MonkeyPatch, *args, **kwargs) -> EmbeddingCollection:
    if backend == "torch":
        monkeypatch.setenv(LOOKUP_SWITCH, "torch")
    else:
        monkeypatch.delenv(LOOKUP_SWITCH, raising=False)
    ec = EmbeddingCollection(*args, **kwargs)
    assert ec.backend == backend
    return ec


def outputs(ec: EmbeddingCollection, features, sequence: bool) -> dict[str, torch.Tensor]:
    if sequence:
        return {k: v.values() for k, v in ec.sequence(features).items()}
    return ec(features).to_dict()


def state(source: EmbeddingCollection | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a collection's state_dict (or of such a copy)."""
    tensors = source if isinstance(source, dict) else source.state_dict()
    return {k: v.clone() for k, v in tensors.items()}


@pytest.mark.parametrize("kind", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("sequence", [False, True], ids=["weighted-mean", "sequence"])
@pytest.mark.parametrize("name", ["mixed", "qr_concat", "graphhash"])
def test_training_steps_match_fbgemm_and_reference(monkeypatch, name, sequence, kind) -> None:
    torch.manual_seed(4)
    optimizer = SparseOptimizerConfig(kind, lr=0.3, eps=1e-3, initial_accumulator_value=0.1)
    tables, feature_to_table, mappings = case(name, "sum" if sequence else "mean")
    fbgemm = build("fbgemm", monkeypatch, tables, feature_to_table, optimizer, mappings=mappings)
    plain = build("torch", monkeypatch, tables, feature_to_table, optimizer, mappings=mappings)
    assert list(plain.parameters()) == []
    assert state(plain).keys() == state(fbgemm).keys()
    plain.load_state_dict(fbgemm.state_dict())  # a fbgemm checkpoint, read by the torch lookup
    expected_state = state(fbgemm)

    for step in range(STEPS):
        features = random_kjt(
            tables, feature_to_table, weighted=not sequence, seed=step, any_int64=True
        )
        weights = {
            key.removeprefix("tables.").removesuffix(".weight"): value.float().requires_grad_()
            for key, value in state(expected_state).items()
            if key.endswith(".weight")
        }
        reference = reference_sequence if sequence else reference_pooled
        expected = reference(fbgemm.plans, feature_to_table, weights, features, mappings)
        got_fbgemm = outputs(fbgemm, features, sequence)
        got = outputs(plain, features, sequence)
        for feature in feature_to_table:
            torch.testing.assert_close(got[feature], got_fbgemm[feature], **SAME_MATHS)
            torch.testing.assert_close(got[feature], expected[feature], **FP32_ROUNDING)

        upstream = {f: torch.randn_like(out) for f, out in got.items()}
        for result in (got, got_fbgemm, expected):
            sum((result[f] * upstream[f]).sum() for f in result).backward()

        touched = reference_touched_rows(fbgemm.plans, feature_to_table, features, mappings)
        for table, weight in weights.items():
            sparse_update(
                expected_state[f"tables.{table}.weight"],
                expected_state.get(f"tables.{table}.momentum"),
                weight.grad,
                touched.get(table, set()),
                optimizer,
            )
        recorded, recorded_fbgemm = plain.take_touched_rows(), fbgemm.take_touched_rows()
        for table in weights:
            assert set(recorded[table].tolist()) == touched.get(table, set()), (step, table)
            assert torch.equal(recorded[table], recorded_fbgemm[table])
        for key, value in state(plain).items():
            torch.testing.assert_close(value, fbgemm.state_dict()[key], **SAME_MATHS)
            torch.testing.assert_close(value, expected_state[key], **UPDATED)

    # A torch-lookup checkpoint, read by fbgemm's TBE.
    torch.manual_seed(5)
    restored = build("fbgemm", monkeypatch, tables, feature_to_table, optimizer, mappings=mappings)
    restored.load_state_dict(plain.state_dict())
    for key, value in restored.state_dict().items():
        assert torch.equal(value, plain.state_dict()[key]), key
    features = random_kjt(tables, feature_to_table, weighted=True, seed=STEPS, any_int64=True)
    torch.testing.assert_close(
        outputs(restored, features, sequence), outputs(plain, features, sequence), **SAME_MATHS
    )


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_per_sample_weights_get_fbgemms_gradient(monkeypatch, pooling: str) -> None:
    torch.manual_seed(6)
    tables, feature_to_table = method_case("unified", pooling)
    optimizer = SparseOptimizerConfig("rowwise_adagrad", lr=0.2)
    fbgemm = build("fbgemm", monkeypatch, tables, feature_to_table, optimizer)
    plain = build("torch", monkeypatch, tables, feature_to_table, optimizer)
    plain.load_state_dict(fbgemm.state_dict())
    base = random_kjt(tables, feature_to_table, weighted=True)
    grads = []
    for ec in (fbgemm, plain):
        sample_weights = base.weights().clone().requires_grad_()
        features = type(base)(
            keys=base.keys(), values=base.values(), lengths=base.lengths(), weights=sample_weights
        )
        (ec(features).values() ** 2).sum().backward()
        grads.append(sample_weights.grad)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], **SAME_MATHS)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(value, fbgemm.state_dict()[key], **SAME_MATHS)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_memory_bytes_is_what_the_torch_lookup_allocates(monkeypatch, dtype: str) -> None:
    tables, feature_to_table = method_case("mixed", dtype=dtype)
    ec = build("torch", monkeypatch, tables, feature_to_table, SparseOptimizerConfig())
    allocated = {config.name: 0 for config in tables}
    for table in ec.physical_tables():
        weight = ec.tables.weight(table.name)
        assert weight.dtype == {"fp32": torch.float32, "fp16": torch.float16}[dtype]
        assert ec.tables.momentum(table.name).shape == (table.num_rows,)
        allocated[table.logical_table] += weight.numel() * weight.element_size()
    memory = ec.memory_bytes()
    assert {name: memory[name] for name in allocated} == allocated
