"""ROBE-Z: the shared array within the budget, its transform against the method's own reference
(hash(id, j, seed) per block), the collection's output against the plain-torch reference, and
options refused with what is accepted."""

from __future__ import annotations

import pytest
import torch

from embedding_tables import EmbeddingCollection
from embedding_tables.config import TableConfig
from embedding_tables.errors import BudgetError, ConfigError
from embedding_tables.hashing import bucket_int, hash64_int
from embedding_tables.methods import ROBE
from embedding_tables.planning import plan_table
from embedding_tables.reference import reference_pooled, reference_rows_of_id, reference_sequence
from embedding_tables.transforms import BatchedTransform, transform_for
from embtab.compression.errors import InfeasibleCellError
from embtab.compression.tables import cell_tables
from feature_store.schema import FeatureSpec, Schema
from models.build import plan_model
from models.config import run_config_from_dict
from models.errors import ModelConfigError
from tests.embedding_tables.helpers import method_case, random_kjt, slots_of

INT64_EDGES = [0, 1, -1, 2**63 - 1, -(2**63), 10**12, -(10**12)]
# A two-table model: user and item ids of 60 and 400, compressed from 50 ids.
SCHEMA = Schema(
    "robe-test",
    (FeatureSpec("user_id", "categorical", 60), FeatureSpec("item_id", "categorical", 400)),
    id_columns={"user": "user_id", "item": "item_id"},
)


@pytest.mark.parametrize(
    "config",
    [
        TableConfig("t", 10_000, 16, ROBE(block_size=4), budget=0.01),
        TableConfig("t", 10_000, 16, ROBE(block_size=16), budget=0.013),
        TableConfig("t", 777, 24, ROBE(block_size=8), budget=0.5, dtype="fp16"),
        TableConfig("t", 1000, 8, ROBE(block_size=4), budget=3),
    ],
)
def test_the_shared_array_spends_the_budget_and_no_more(config: TableConfig) -> None:
    plan = plan_table(config)
    (array,) = plan.physical
    block = config.method.block_size
    assert plan.combine == "concat" and array.dim == block and array.name == "t"
    budget_bytes = (
        config.budget * config.dim * (array.memory_bytes // array.num_parameters)
        if isinstance(config.budget, int)
        else config.budget * config.full_bytes
    )
    assert array.memory_bytes <= budget_bytes
    assert array.memory_bytes + array.dim * (array.memory_bytes // array.num_parameters) > (
        budget_bytes
    )
    assert config.method.lookup_tables(config, plan, "f") == ("t",) * (config.dim // block)


def test_no_budget_is_the_full_tables_memory() -> None:
    config = TableConfig("t", 300, 16, ROBE(block_size=8))
    (array,) = plan_table(config).physical
    assert (array.num_rows, array.dim) == (600, 8)
    assert array.memory_bytes == config.full_bytes


@pytest.mark.parametrize("block_size", [4, 8, 16])
def test_transform_matches_the_reference_on_any_int64(block_size: int) -> None:
    config = TableConfig("t", 5000, 16, ROBE(block_size=block_size), budget=0.02, seed=11)
    plan = plan_table(config)
    transform = transform_for(config, "f", plan=plan)
    generator = torch.Generator().manual_seed(block_size)
    ids = torch.cat(
        [
            torch.tensor(INT64_EDGES),
            torch.randint(0, 5000, (200,), generator=generator),
            torch.randint(-(2**62), 2**62, (200,), generator=generator) * 2,
        ]
    )
    rows = transform(ids)
    assert len(rows) == 16 // block_size == len(transform.tables)
    for position, value in enumerate(ids.tolist()):
        expected = reference_rows_of_id(plan, "f", value)
        got = [(table, int(r[position])) for table, r in zip(transform.tables, rows, strict=True)]
        assert got == expected
    for block, row_ids in enumerate(rows):
        assert int(row_ids.min()) >= 0 and int(row_ids.max()) < plan.physical[0].num_rows, block
    assert [r.tolist() for r in transform(torch.empty(0, dtype=torch.int64))] == [[]] * len(rows)


def test_block_j_reads_hash_of_id_j_and_seed() -> None:
    config = TableConfig("t", 1000, 12, ROBE(block_size=4), budget=0.1, seed=5)
    plan = plan_table(config)
    rows = plan.physical[0].num_rows
    expected = [("t", bucket_int(123, hash64_int(j, 5), rows)) for j in range(3)]
    assert reference_rows_of_id(plan, "f", 123) == expected
    other_seed = plan_table(TableConfig("t", 1000, 12, ROBE(block_size=4), budget=0.1, seed=6))
    assert reference_rows_of_id(other_seed, "f", 123) != expected


def test_blocks_run_batched_as_hash_slots_with_other_tables() -> None:
    transforms = [
        transform_for(TableConfig("r", 10**5, 16, ROBE(block_size=4), budget=0.01, seed=2), "a"),
        transform_for(TableConfig("h", 10**4, 8, "hash", budget=99), "b"),
        transform_for(TableConfig("s", 900, 8, ROBE(block_size=8), budget=0.3), "c"),
    ]
    assert {t.slot_rule(j).kind for t in transforms for j in range(len(t.tables))} == {"hash"}
    generator = torch.Generator().manual_seed(3)
    ids = {
        t.feature: torch.randint(-(2**40), 2**40, (17,), generator=generator) for t in transforms
    }
    slots = slots_of(transforms)
    rows = BatchedTransform(slots)([ids[t.feature] for t, _ in slots])
    assert torch.equal(rows, torch.cat([t(ids[t.feature])[j] for t, j in slots]))


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no-grad"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("sequence", [False, True], ids=["pooled", "sequence"])
def test_collection_matches_the_reference(pooling: str, sequence: bool, grad: bool) -> None:
    """With autograd on, the TBE path; without, the CPU kernels' gather, concat and pool."""
    torch.manual_seed(4)
    tables, feature_to_table = method_case("robe", pooling)
    ec = EmbeddingCollection(tables, feature_to_table, optimizer=None)
    features = random_kjt(tables, feature_to_table, batch=7, weighted=not sequence, any_int64=True)
    assert int(features.lengths()[0]) == 0  # an empty bag
    weights = {t.name: ec.tables.weight(t.name).detach().clone() for t in ec.physical_tables()}
    with torch.set_grad_enabled(grad):
        if sequence:
            outputs = {k: v.values() for k, v in ec.sequence(features).items()}
        else:
            outputs = ec(features).to_dict()
    reference = reference_sequence if sequence else reference_pooled
    expected = reference(ec.plans, ec.feature_to_table, weights, features)
    for feature, rows in expected.items():
        assert outputs[feature].shape == rows.shape
        assert rows.shape[1] == ec.output_dim(feature) == ec.configs[feature_to_table[feature]].dim
        torch.testing.assert_close(outputs[feature], rows, rtol=2e-6, atol=1e-6)


def test_block_size_must_be_a_multiple_of_four() -> None:
    for bad in (0, -4, 2, 6, 4.0, True):
        with pytest.raises(ConfigError, match=r"block_size must be a positive multiple of 4"):
            ROBE(block_size=bad)


def test_block_size_must_divide_dim_when_the_config_is_built() -> None:
    with pytest.raises(
        ConfigError,
        match=r"table 't': robe block_size 16 does not divide dim 24; accepted block sizes: "
        r"4, 8, 12, 24$",
    ):
        TableConfig("t", 100, 24, ROBE(block_size=16), budget=0.5)
    with pytest.raises(ConfigError, match=r"dim 6 is not a multiple of 4"):
        TableConfig("t", 100, 6, "robe")


def test_a_block_larger_than_the_array_is_refused_when_the_config_is_built() -> None:
    # 100 ids x 16 x 0.005 = 8 parameters: a block of 8 fits, one of 16 does not.
    fits = TableConfig("t", 100, 16, ROBE(block_size=8), budget=0.005)
    assert plan_table(fits).physical[0].num_rows == 1
    with pytest.raises(
        BudgetError,
        match=r"table 't': robe block_size 16 is larger than the shared array of 8 parameters "
        r"that budget 0.005 buys; accepted block sizes at this budget: 4, 8 .* a budget of 0.01 "
        r"\(or budget=2 rows\)",
    ):
        TableConfig("t", 100, 16, ROBE(block_size=16), budget=0.005)
    with pytest.raises(BudgetError, match=r"accepted block sizes at this budget: none"):
        TableConfig("t", 100, 16, "robe", budget=0.001)


def test_a_model_config_and_a_study_cell_refuse_a_bad_block() -> None:
    run = run_config_from_dict(
        {
            "dataset": SCHEMA.dataset,
            "model": {"name": "dcn"},
            "tables": {
                "method": "robe",
                "budget": 0.25,
                "compress_min_rows": 50,
                "dim": 8,
                "options": {"block_size": 16},
            },
        }
    )
    with pytest.raises(ModelConfigError, match=r"'user_id'.*block_size 16 does not divide dim 8"):
        plan_model(run, SCHEMA)
    with pytest.raises(InfeasibleCellError, match=r"larger than the shared array"):
        cell_tables(SCHEMA, "robe", 0.0001, 16, compress_min_rows=50)


def test_the_flat_form_round_trips_and_refuses_other_options() -> None:
    config = TableConfig("t", 1000, 16, ROBE(block_size=8), budget=0.25, pooling="mean", seed=3)
    fields = config.to_fields()
    assert fields["method"] == "robe" and fields["block_size"] == 8
    assert TableConfig.from_fields(fields) == config
    with pytest.raises(ConfigError, match=r"'combine'.*do not apply to method 'robe'.*block_size"):
        TableConfig.from_fields({**fields, "combine": "add"})
    with pytest.raises(ConfigError, match=r"table 't': method 'robe': block_size must be"):
        TableConfig.from_fields({**fields, "block_size": 6})
    with pytest.raises(ConfigError, match=r"table 't': robe block_size 32 does not divide"):
        TableConfig.from_fields({**fields, "block_size": 32})


def test_at_budget_records_the_array() -> None:
    config = TableConfig("t", 1000, 16, ROBE(block_size=8), budget=0.1)
    assert config.method.at_budget(config) == (config, {"array_rows": 200, "blocks": 2})
