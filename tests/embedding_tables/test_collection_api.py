"""EmbeddingCollection's contract: errors, budgets, state_dict, delta sync, plug-in methods."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embedding_tables import (
    BudgetError,
    ConfigError,
    EmbeddingCollection,
    FeatureError,
    IdError,
    SparseOptimizerConfig,
    TableConfig,
)
from embedding_tables.hashing import bucket
from embedding_tables.methods import QR, Full, GraphHash, Method, Unified, register
from embedding_tables.reference import reference_pooled
from tests.embedding_tables.helpers import method_case, random_kjt

ADAGRAD = SparseOptimizerConfig("rowwise_adagrad", lr=0.1)


def one_feature_kjt(values: torch.Tensor, key: str = "f", lengths=None) -> KeyedJaggedTensor:
    lengths = torch.tensor([values.numel()]) if lengths is None else torch.tensor(lengths)
    return KeyedJaggedTensor(keys=[key], values=values, lengths=lengths)


def train_step(ec: EmbeddingCollection, features: KeyedJaggedTensor) -> None:
    (ec(features).values() ** 2).sum().backward()


# ---- bad input ----------------------------------------------------------------------------


def test_non_integer_ids_name_feature_and_dtype() -> None:
    ec = EmbeddingCollection([TableConfig("t", 10, 4, "hash")], {"item": "t"}, ADAGRAD)
    with pytest.raises(IdError, match=r"'item'.*float32"):
        ec(one_feature_kjt(torch.tensor([1.0, 2.0]), "item"))


@pytest.mark.parametrize("method", ["full", "qr"])
@pytest.mark.parametrize("bad", [-1, 10, 2**40])
def test_out_of_range_ids_name_feature_and_value(method: str, bad: int) -> None:
    ec = EmbeddingCollection([TableConfig("t", 10, 4, method)], {"item": "t"}, ADAGRAD)
    with pytest.raises(IdError, match=rf"'item'.*id {bad} "):
        ec(one_feature_kjt(torch.tensor([3, bad]), "item"))
    with pytest.raises(IdError, match=rf"id {bad} "):
        ec.sequence(one_feature_kjt(torch.tensor([bad]), "item"))


@pytest.mark.parametrize("method", [Full(out_of_range="hash"), QR(out_of_range="hash")])
def test_out_of_range_hash_option_hashes_into_range(method: Method) -> None:
    config = TableConfig("t", 10, 4, method, seed=5)
    ec = EmbeddingCollection([config], {"item": "t"}, None)
    ids = torch.tensor([-7, 10, 2**62, 3])
    hashed = torch.where((ids >= 0) & (ids < 10), ids, bucket(ids, 5, 10))
    assert torch.equal(
        ec(one_feature_kjt(ids, "item")).values(), ec(one_feature_kjt(hashed, "item")).values()
    )


@pytest.mark.parametrize("method", ["hash", "unified"])
def test_any_int64_is_a_valid_id_for_hashed_methods(method: str) -> None:
    ec = EmbeddingCollection([TableConfig("t", 100, 4, method, budget=7)], {"f": "t"}, ADAGRAD)
    ids = torch.tensor([-(2**63), -1, 0, 2**63 - 1])
    assert ec(one_feature_kjt(ids)).values().shape == (1, 4)
    assert ec(one_feature_kjt(ids.int())).values().shape == (1, 4)


def test_missing_and_unknown_features_are_named() -> None:
    ec = EmbeddingCollection([TableConfig("t", 10, 4)], {"a": "t", "b": "t"}, ADAGRAD)
    kjt = KeyedJaggedTensor(
        keys=["a", "zzz"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1])
    )
    with pytest.raises(FeatureError, match=r"missing 'b'.*unknown 'zzz'"):
        ec(kjt)
    with pytest.raises(FeatureError, match="missing 'b'"):
        ec.sequence(one_feature_kjt(torch.tensor([1]), "a"))


def test_budget_too_small_fails_at_construction() -> None:
    with pytest.raises(BudgetError, match="smallest valid budget is 0.002"):
        EmbeddingCollection([TableConfig("t", 1_000_000, 8, "qr", budget=0.0001)], {"f": "t"})


@pytest.mark.parametrize(
    "tables, feature_to_table, message",
    [
        ([TableConfig("t", 10, 4)], {"f": "nope"}, "unknown table 'nope'"),
        ([TableConfig("t", 10, 4), TableConfig("t", 10, 4)], {"f": "t"}, "unique"),
        ([TableConfig("t", 10, 4), TableConfig("s", 10, 4)], {"f": "t"}, "'s' has no feature"),
        ([TableConfig("total", 10, 4)], {"f": "total"}, "may not be named"),
        ([TableConfig("u", 10, 4, Unified(feature_chunks={"g": 2}))], {"f": "u"}, "'g'"),
        ([TableConfig("t", 10, 6, "hash")], {"f": "t"}, "multiple of 4"),
    ],
)
def test_bad_configs_are_refused(tables, feature_to_table, message) -> None:
    with pytest.raises(ConfigError, match=message):
        EmbeddingCollection(tables, feature_to_table)


# ---- what was allocated --------------------------------------------------------------------


def test_memory_and_parameters_report_allocation() -> None:
    tables = [
        TableConfig("full", 1000, 8),
        TableConfig("hashed", 100_000, 16, "hash", budget=0.1),
        TableConfig("qr", 100_000, 16, "qr", budget=0.01, dtype="fp16"),
        TableConfig("group", 50_000, 4, Unified(feature_chunks={"a": 3}), budget=500),
    ]
    ec = EmbeddingCollection(
        tables, {"full": "full", "hashed": "hashed", "qr": "qr", "a": "group", "b": "group"}
    )
    memory, params = ec.memory_bytes(), ec.num_parameters()
    assert memory["full"] == 1000 * 8 * 4
    assert params["hashed"] == 10_000 * 16
    assert memory["qr"] <= 0.01 * 100_000 * 16 * 2
    assert params["group"] == 500 * 4
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")
    assert params["total"] == sum(t.num_parameters for t in ec.physical_tables())
    assert ec.output_dim("a") == 12 and ec.output_dim("b") == 4


def test_physical_tables_are_named_after_their_logical_table() -> None:
    tables, feature_to_table = method_case("mixed")
    ec = EmbeddingCollection(tables, feature_to_table, ADAGRAD)
    names = {t.name: (t.logical_table, t.num_rows, t.dim) for t in ec.physical_tables()}
    assert set(names) == {"full", "hashed", "group", "qm.r", "qm.q", "qa.r", "qa.q"}
    assert names["qm.r"][0] == "qm" and names["hashed"][1] == 32


# ---- training state ------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", [None, ADAGRAD], ids=["dense", "fused"])
def test_state_dict_round_trip(optimizer, lookup_backend) -> None:
    tables, feature_to_table = method_case("mixed")
    features = random_kjt(tables, feature_to_table, weighted=True)
    torch.manual_seed(0)
    trained = EmbeddingCollection(tables, feature_to_table, optimizer)
    assert trained.backend == lookup_backend
    train_step(trained, features)
    state = trained.state_dict()
    assert all(key.startswith("tables.") for key in state)
    torch.manual_seed(1)
    fresh = EmbeddingCollection(tables, feature_to_table, optimizer)
    assert not torch.equal(fresh(features).values(), trained(features).values())
    fresh.load_state_dict(state)
    assert torch.equal(fresh(features).values(), trained(features).values())
    for key, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, state[key])


def test_state_dict_with_wrong_shapes_changes_nothing(lookup_backend) -> None:
    tables, feature_to_table = method_case("hash")
    ec = EmbeddingCollection(tables, feature_to_table, ADAGRAD)
    assert ec.backend == lookup_backend
    before = {k: v.clone() for k, v in ec.state_dict().items()}
    bad = {k: torch.zeros_like(v) for k, v in before.items()}
    bad["tables.t1.weight"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match="tables.t1.weight"):
        ec.load_state_dict(bad)
    assert all(torch.equal(before[k], v) for k, v in ec.state_dict().items())


def test_fused_checkpoint_loads_into_dense_collection(lookup_backend) -> None:
    tables, feature_to_table = method_case("unified")
    features = random_kjt(tables, feature_to_table)
    fused = EmbeddingCollection(tables, feature_to_table, ADAGRAD)
    assert fused.backend == lookup_backend
    train_step(fused, features)
    dense = EmbeddingCollection(tables, feature_to_table, None)
    result = dense.load_state_dict(fused.state_dict(), strict=False)
    assert result.missing_keys == [] and all("momentum" in k for k in result.unexpected_keys)
    torch.testing.assert_close(dense(features).values(), fused(features).values())


def test_touched_rows_follow_backward_only(lookup_backend) -> None:
    tables, feature_to_table = method_case("mixed")
    ec = EmbeddingCollection(tables, feature_to_table, ADAGRAD)
    assert ec.backend == lookup_backend
    features = random_kjt(tables, feature_to_table)
    ec(features)
    assert all(rows.numel() == 0 for rows in ec.take_touched_rows().values())
    before = {t.name: ec.tables.weight(t.name).clone() for t in ec.physical_tables()}
    train_step(ec, features)
    touched = ec.take_touched_rows()
    for name, rows in touched.items():
        changed = (ec.tables.weight(name) != before[name]).any(dim=1).nonzero().flatten()
        assert set(changed.tolist()) <= set(rows.tolist())
    assert all(rows.numel() == 0 for rows in ec.take_touched_rows().values())


def test_export_then_load_rows_restores_a_table(lookup_backend) -> None:
    tables, feature_to_table = method_case("qr_mult")
    source = EmbeddingCollection(tables, feature_to_table, ADAGRAD)
    assert source.backend == lookup_backend
    target = EmbeddingCollection(tables, feature_to_table, ADAGRAD)
    for table in source.physical_tables():
        chunks = list(source.export_rows(table.name, chunk_rows=7))
        assert all(ids.numel() <= 7 for ids, _ in chunks)
        for ids, rows in chunks:
            target.load_rows(table.name, ids, rows)
        assert torch.equal(target.tables.weight(table.name), source.tables.weight(table.name))
        assert target.take_touched_rows()[table.name].numel() == table.num_rows
    features = random_kjt(tables, feature_to_table)
    assert torch.equal(target(features).values(), source(features).values())


def test_load_rows_checks_everything_before_writing(lookup_backend) -> None:
    ec = EmbeddingCollection([TableConfig("t", 10, 4)], {"f": "t"}, ADAGRAD)
    assert ec.backend == lookup_backend
    before = ec.tables.weight("t").clone()
    with pytest.raises(IdError, match="row id 10"):
        ec.load_rows("t", torch.tensor([0, 10]), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        ec.load_rows("t", torch.tensor([0, 1]), torch.ones(2, 3))
    with pytest.raises(ConfigError, match="unknown physical table 'x'"):
        ec.load_rows("x", torch.tensor([0]), torch.ones(1, 4))
    assert torch.equal(ec.tables.weight("t"), before)


def test_dense_mode_tables_are_parameters_with_gradients() -> None:
    tables, feature_to_table = method_case("hash")
    ec = EmbeddingCollection(tables, feature_to_table, None)
    assert len(list(ec.parameters())) == 2
    train_step(ec, random_kjt(tables, feature_to_table))
    assert all(p.grad is not None for p in ec.parameters())


def test_learning_rate_can_be_changed(lookup_backend) -> None:
    ec = EmbeddingCollection([TableConfig("t", 10, 4)], {"f": "t"}, SparseOptimizerConfig("sgd"))
    assert ec.backend == lookup_backend
    ec.set_learning_rate(0.0)
    before = ec.tables.weight("t").clone()
    train_step(ec, one_feature_kjt(torch.tensor([1, 2])))
    assert torch.equal(ec.tables.weight("t"), before)


def test_index_transform_is_what_the_lookup_uses() -> None:
    tables, feature_to_table = method_case("unified")
    ec = EmbeddingCollection(tables, feature_to_table, ADAGRAD)
    transform = ec.index_transform("f0")
    ids = torch.tensor([5, -9, 123456789])
    rows = transform(ids)
    weight = ec.tables.weight("u")
    expected = torch.cat([weight[r] for r in rows], dim=1)
    got = ec.sequence(random_kjt(tables, feature_to_table, max_len=0))  # shape only
    assert got["f0"].values().shape[1] == expected.shape[1]
    kjt = KeyedJaggedTensor(
        keys=list(feature_to_table),
        values=torch.cat([ids, torch.tensor([1, 2, 3])]),
        lengths=torch.tensor([3, 1, 1, 1]),
    )
    torch.testing.assert_close(ec.sequence(kjt)["f0"].values(), expected)


# ---- plug-in methods -----------------------------------------------------------------------


class FakeMapping:
    """Duck-typed GraphHashMapping: cluster row = id % 5, double variant adds a hashed row."""

    def __init__(self, num_rows: int, double: bool) -> None:
        self.num_rows = num_rows
        self.double = double

    def transform_all(self, ids: torch.Tensor) -> torch.Tensor:
        rows = [ids.remainder(5)]
        if self.double:
            rows.append(5 + ids.remainder(self.num_rows - 5))
        return torch.stack(rows, dim=1)


@pytest.mark.parametrize("variant", ["single", "double"])
def test_graphhash_mapping_plugs_in_as_an_index_transform(variant: str) -> None:
    double = variant == "double"
    config = TableConfig("g", 1000, 4, GraphHash(graphhash_variant=variant), budget=0.05)
    tables, feature_to_table = [config, TableConfig("h", 100, 4, "hash")], {"a": "g", "b": "h"}
    features = random_kjt(tables, feature_to_table)
    ec = EmbeddingCollection(tables, feature_to_table, ADAGRAD)
    with pytest.raises(ConfigError, match="has no mapping"):
        ec(features)
    with pytest.raises(ConfigError, match="allocated 50 rows"):
        ec.set_graphhash_mapping("g", FakeMapping(20, double))
    mapping = FakeMapping(50, double)
    ec.set_graphhash_mapping("g", mapping)
    weights = {t.name: ec.tables.weight(t.name).clone() for t in ec.physical_tables()}
    expected = reference_pooled(ec.plans, feature_to_table, weights, features, {"g": mapping})
    torch.testing.assert_close(ec(features).to_dict()["a"], expected["a"])

    sized = EmbeddingCollection(
        tables, feature_to_table, ADAGRAD, mappings={"g": FakeMapping(20, double)}
    )
    assert sized.num_parameters()["g"] == 20 * 4


class FakeCollisionless(torch.nn.Module):
    """The CollisionlessTable contract, backed by a plain full table."""

    def __init__(self, config: TableConfig, optimizer_config) -> None:
        super().__init__()
        self.config, self.optimizer_config = config, optimizer_config
        self.weight = torch.nn.Parameter(torch.randn(config.num_embeddings, config.dim))

    def pooled(self, values, offsets, per_sample_weights=None):
        mode = "mean" if self.config.pooling == "mean" else "sum"
        return torch.nn.functional.embedding_bag(
            values,
            self.weight,
            offsets,
            mode=mode,
            include_last_offset=True,
            per_sample_weights=per_sample_weights,
        )

    def sequence(self, values):
        return self.weight[values]

    def take_touched_rows(self):
        return torch.tensor([1, 2])

    def export_rows(self, chunk_rows):
        yield torch.arange(self.config.num_embeddings), self.weight.detach().clone()

    def load_rows(self, ids, rows):
        with torch.no_grad():
            self.weight[ids] = rows

    def memory_bytes(self):
        return self.weight.numel() * 4

    def num_parameters(self):
        return self.weight.numel()


@register
@dataclass(frozen=True)
class FakeSelfManaged(Method):
    """A self-managed method that lives only in this test."""

    name = "test_fake_self_managed"
    self_managed = True

    def build_table(self, config: TableConfig, optimizer) -> torch.nn.Module:
        return FakeCollisionless(config, optimizer)


def test_self_managed_tables_are_called_per_feature() -> None:
    tables = [TableConfig("c", 20, 4, FakeSelfManaged()), TableConfig("h", 100, 8, "hash")]
    feature_to_table = {"x": "c", "y": "h", "z": "c"}
    ec = EmbeddingCollection(tables, feature_to_table, ADAGRAD)
    assert ec.self_managed["c"].optimizer_config == ADAGRAD
    features = random_kjt(tables, feature_to_table)
    pooled = ec(features).to_dict()
    x = features.to_dict()["x"]
    expected = torch.nn.functional.embedding_bag(
        x.values(), ec.self_managed["c"].weight, x.offsets(), mode="sum", include_last_offset=True
    )
    torch.testing.assert_close(pooled["x"], expected)
    assert pooled["y"].shape[1] == 8
    assert ec.sequence(features)["z"].values().shape == (
        features.to_dict()["z"].values().numel(),
        4,
    )
    assert ec.take_touched_rows()["c"].tolist() == [1, 2]
    assert ec.memory_bytes()["c"] == 20 * 4 * 4 and ec.num_parameters()["total"] == 80 + 800
    ids, rows = next(ec.export_rows("c"))
    ec.load_rows("c", ids[:2], torch.zeros(2, 4))
    assert torch.count_nonzero(ec.self_managed["c"].weight[:2]) == 0
    assert "self_managed.c.weight" in ec.state_dict()
