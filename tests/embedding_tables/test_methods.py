"""Methods as modules: a method's options can only be written where they apply, the flat form of
config files and manifests round-trips, old manifests still load, a budget means one thing,
and nothing outside embedding_tables/methods branches on a method's name."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from embedding_tables.config import TableConfig
from embedding_tables.errors import ConfigError
from embedding_tables.methods import (
    QR,
    ROBE,
    Collisionless,
    Full,
    GraphHash,
    Hash,
    Method,
    TTRec,
    Unified,
    method_class,
    method_names,
    register,
)
from embedding_tables.planning import plan_table

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("embedding_tables", "models", "serving", "online_training", "feature_store", "embtab")
BUILT_IN = ("full", "hash", "unified", "qr", "collisionless", "graphhash", "robe", "ttrec")
NAME = "|".join(BUILT_IN)
# A comparison of a table's method (or its name) with a method's name, or a membership test of
# it in a literal tuple of names: what each method's module answers instead.
NAME_BRANCHES = (
    re.compile(rf"method(\.name)?\s*(==|!=)\s*[\"']({NAME})[\"']"),
    re.compile(rf"[\"']({NAME})[\"']\s*(==|!=)\s*\S*method\b"),
    re.compile(r"method(\.name)?\s+(not\s+)?in\s+\(\s*[\"']"),
    re.compile(r"method(\.name)?\s+(not\s+)?in\s+[A-Z_]*METHODS\b"),
)


def test_no_module_outside_methods_branches_on_a_method_name() -> None:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "methods" in path.relative_to(ROOT / package).parts[:1]:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if any(pattern.search(line) for pattern in NAME_BRANCHES):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_name_branch_check_sees_the_branches_it_forbids() -> None:
    branches = [
        'if config.method == "qr":',
        'if table.method.name != "full":',
        'elif "graphhash" == spec.method:',
        'if config.method in ("full", "qr"):',
        "if config.method not in SELF_MANAGED_METHODS:",
    ]
    for line in branches:
        assert any(pattern.search(line) for pattern in NAME_BRANCHES), line
    assert not any(pattern.search("if config.method.takes_mapping:") for pattern in NAME_BRANCHES)


def test_every_built_in_method_is_registered_under_its_name() -> None:
    for name, method in zip(
        BUILT_IN, (Full, Hash, Unified, QR, Collisionless, GraphHash, ROBE, TTRec), strict=True
    ):
        assert method_class(name) is method and name in method_names()
        assert TableConfig("t", 100, 8, name).method == method()


def test_an_option_cannot_be_given_to_a_method_it_does_not_belong_to() -> None:
    with pytest.raises(TypeError):
        QR(capacity=10)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match=r"'capacity'.*do not apply to method 'qr'.*combine"):
        TableConfig.from_fields(
            {"name": "t", "num_embeddings": 100, "dim": 8, "method": "qr", "capacity": 10}
        )
    with pytest.raises(ConfigError, match="table 't': method 'qr': unknown combine 'sum'"):
        TableConfig.from_fields(
            {"name": "t", "num_embeddings": 100, "dim": 8, "method": "qr", "combine": "sum"}
        )
    with pytest.raises(ConfigError, match="unknown method 'tt'; accepted: .*full.*qr"):
        TableConfig("t", 100, 8, "tt")


@pytest.mark.parametrize(
    "method",
    [
        Full(out_of_range="hash"),
        Hash(),
        Unified(feature_chunks={"a": 2}),
        QR(combine="concat", num_partitions=3),
        Collisionless(min_count=2, admission="cms", ttl_seconds=60.0, capacity=50),
        GraphHash(graphhash_variant="double"),
        ROBE(block_size=8),
    ],
)
def test_the_flat_form_round_trips(method: Method) -> None:
    config = TableConfig("t", 1000, 16, method, budget=0.5, pooling="mean", seed=3)
    fields = config.to_fields()
    assert fields["method"] == method.name and "budget" in fields
    assert TableConfig.from_fields(fields) == config


def test_a_manifest_written_before_methods_had_their_own_options_still_loads() -> None:
    # What checkpoint manifests held for a qr table before: every method's option, flat.
    old = {
        "name": "item_id",
        "num_embeddings": 3706,
        "dim": 16,
        "method": "qr",
        "budget": 0.1,
        "pooling": "mean",
        "dtype": "fp32",
        "seed": 0,
        "feature_chunks": {},
        "combine": "add",
        "num_partitions": 2,
        "out_of_range": "error",
        "min_count": 1,
        "admission": "exact",
        "ttl_seconds": None,
        "capacity": None,
        "eviction": "lru",
        "default_row": "shared",
        "graphhash_variant": "single",
    }
    config = TableConfig.from_fields(old, strict=False)
    assert config == TableConfig("item_id", 3706, 16, QR(combine="add"), 0.1, "mean")
    with pytest.raises(ConfigError, match="do not apply"):
        TableConfig.from_fields(old)


def test_an_int_budget_is_rows_and_a_float_a_fraction() -> None:
    assert plan_table(TableConfig("t", 1000, 8, "hash", budget=2)).physical[0].num_rows == 2
    assert plan_table(TableConfig("t", 1000, 8, "hash", budget=1.0)).physical[0].num_rows == 1000
    assert plan_table(TableConfig("t", 1000, 8, "hash", budget=0.25)).physical[0].num_rows == 250
    with pytest.raises(ConfigError, match="an int budget is a number of rows.*write 1.0"):
        TableConfig("t", 1000, 8, "hash", budget=1)


def test_a_method_name_is_registered_once() -> None:
    @dataclass(frozen=True)
    class Impostor(Method):
        name = "qr"

    with pytest.raises(ConfigError, match="'qr' is already registered"):
        register(Impostor)
    assert method_class("qr") is QR
