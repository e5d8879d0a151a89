"""The feature schema: validation and JSON round trip."""

from __future__ import annotations

import pytest

from feature_store.schema import FeatureSpec, Schema, SchemaError


def test_schema_round_trips_through_json():
    schema = Schema(
        dataset="toy",
        features=(
            FeatureSpec("item", "categorical", 10),
            FeatureSpec("history", "sequence", 10, max_length=5, shares_ids_with="item"),
            FeatureSpec("price", "dense"),
        ),
        id_columns={"item": "item"},
    )
    assert Schema.from_json(schema.to_json()) == schema
    assert [f.name for f in schema.categorical] == ["item"]
    assert [f.name for f in schema.sequence] == ["history"]
    assert [f.name for f in schema.dense] == ["price"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (dict(name="x", kind="sparse"), "unknown kind 'sparse'"),
        (dict(name="x", kind="categorical", cardinality=0), "cardinality >= 1"),
        (dict(name="x", kind="sequence", cardinality=3, max_length=0), "max_length >= 1"),
    ],
)
def test_bad_feature_specs_say_what_is_accepted(spec, message):
    with pytest.raises(SchemaError, match=message):
        FeatureSpec(**spec)


def test_sequence_must_share_ids_with_a_categorical_feature():
    with pytest.raises(SchemaError, match="not a categorical feature"):
        Schema(
            dataset="toy",
            features=(FeatureSpec("h", "sequence", 3, max_length=2, shares_ids_with="missing"),),
        )


def test_duplicate_feature_names_are_rejected():
    with pytest.raises(SchemaError, match="duplicate"):
        Schema(dataset="toy", features=(FeatureSpec("a", "dense"), FeatureSpec("a", "dense")))


def test_unknown_feature_lookup_lists_the_features():
    schema = Schema(dataset="toy", features=(FeatureSpec("a", "dense"),))
    with pytest.raises(SchemaError, match="features: a"):
        schema.feature("b")
