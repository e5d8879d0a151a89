"""From a schema and a TablesConfig to the TableConfigs and feature -> table map of a model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from embedding_tables.config import TableConfig
from embedding_tables.methods import method_class
from feature_store.schema import FeatureSpec, Schema, SchemaError
from models.batches import sparse_features
from models.config import TablesConfig, from_dict
from models.errors import ModelConfigError

UNIFIED_TABLE = "unified"
# Tables too small to compress keep one row per id.
UNCOMPRESSED_METHOD = "full"
# Methods that need the user-item interaction graph apply to the schema's id columns only;
# the other compressed tables of such a config use this method at the same budget.
GRAPH_FALLBACK = "hash"
# Raw 64-bit ids (a spec's `ids: hash`) cannot index rows one by one: a feature that has them
# gets a hash table where the config asks for a method that indexes by id (the full table's
# size for `full`, the config's budget otherwise).
RAW_ID_METHOD = "hash"


def select_features(schema: Schema, names: tuple[str, ...] | list[str]) -> Schema:
    """The schema restricted to `names` (all of it when empty), in schema order."""
    if not names:
        return schema
    known = {spec.name for spec in schema.features}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ModelConfigError(
            f"unknown feature(s) {unknown} for data set {schema.dataset!r}; "
            f"accepted: {', '.join(spec.name for spec in schema.features)}"
        )
    chosen = set(names)
    try:
        return dataclasses.replace(
            schema, features=tuple(spec for spec in schema.features if spec.name in chosen)
        )
    except SchemaError as error:
        raise ModelConfigError(f"feature selection {sorted(chosen)}: {error}") from error


def build_tables(
    schema: Schema, config: TablesConfig, dim: int
) -> tuple[list[TableConfig], dict[str, str]]:
    """Tables for every categorical feature of `schema`, and the table each sparse feature reads.

    A sequence feature reads the table of the feature whose ids it shares.
    """
    if config.tables:
        return _explicit_tables(schema, config)
    _check_options(config)
    if method_class(config.method).shares_one_table:
        return _unified_table(schema, config, dim)
    categorical = [spec.name for spec in schema.categorical]
    unknown = sorted(set(config.overrides) - set(categorical))
    if unknown:
        raise ModelConfigError(
            f"tables.overrides names unknown table(s) {unknown}; accepted: {', '.join(categorical)}"
        )
    graph_features = set(schema.id_columns.values())
    tables = []
    for spec in schema.categorical:
        method = feature_method(
            spec,
            config.method,
            compressed=spec.cardinality >= config.compress_min_rows,
            graph_features=graph_features,
        )
        fields: dict[str, Any] = {
            "name": spec.name,
            "num_embeddings": spec.cardinality,
            "dim": dim,
            "method": method.name,
            "pooling": config.pooling,
        }
        override = config.overrides.get(spec.name, {})
        if method_class(method.name).compresses:
            # An override may change the method: the shared options apply where they belong.
            fields.update(_options_of(override.get("method", method.name), config.options))
            fields["budget"] = config.budget if method.budgeted else None
        fields.update(override)
        tables.append(from_dict(TableConfig, fields, f"table {spec.name!r}"))
    return tables, feature_routes(schema)


@dataclass(frozen=True)
class FeatureMethod:
    """The method one categorical feature's table gets. `budgeted` False: the table keeps the
    full table's size (a full table, or the hash table that raw ids get in place of one)."""

    name: str
    budgeted: bool


def feature_method(
    spec: FeatureSpec, method: str, *, compressed: bool, graph_features: set[str]
) -> FeatureMethod:
    """The method of `spec`'s table when a config asks for `method`.

    A table too small to compress stays full; a graph method applies to the user and item id
    tables (`graph_features`) only, the others fall back to hashing; raw 64-bit ids get a hash
    table where the method would index rows by id.
    """
    if not compressed:
        method = UNCOMPRESSED_METHOD
    elif method_class(method).needs_interaction_graph and spec.name not in graph_features:
        method = GRAPH_FALLBACK
    chosen = method_class(method)
    if spec.hashed and chosen.indexes_by_id:
        return FeatureMethod(RAW_ID_METHOD, chosen.compresses)
    return FeatureMethod(method, chosen.compresses)


def _check_options(config: TablesConfig) -> None:
    """Every `tables.options` key is an option of the config's method."""
    accepted = _accepted_options(config.method)
    unknown = sorted(set(config.options) - set(accepted))
    if unknown:
        raise ModelConfigError(
            f"tables.options {unknown} do not apply to method {config.method!r}; accepted: "
            f"{', '.join(accepted)}"
        )


def _accepted_options(method: str) -> tuple[str, ...]:
    """The option names a table of `method` takes beside its name, sizes and budget."""
    own = (field.name for field in dataclasses.fields(method_class(method)))
    return (*own, "seed", "dtype", "pooling")


def _options_of(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The `tables.options` that apply to a table of `method` (a fallback table takes only
    those of its own method)."""
    accepted = _accepted_options(method)
    return {key: value for key, value in options.items() if key in accepted}


def feature_routes(schema: Schema) -> dict[str, str]:
    """The table each sparse feature reads: its own, or for a sequence feature the table of the
    categorical feature whose ids it shares."""
    categorical = [spec.name for spec in schema.categorical]
    feature_to_table = {name: name for name in categorical}
    feature_to_table.update(
        {spec.name: spec.shares_ids_with or spec.name for spec in schema.sequence}
    )
    missing = sorted(set(feature_to_table.values()) - set(categorical))
    if missing:
        raise ModelConfigError(
            f"sequence feature(s) read table(s) {missing} that no categorical feature defines; "
            "give each sequence feature `shares_ids_with` a categorical feature of the model"
        )
    return feature_to_table


def _unified_table(
    schema: Schema, config: TablesConfig, dim: int
) -> tuple[list[TableConfig], dict[str, str]]:
    """One shared table for every feature; its logical size is the sum of their cardinalities."""
    fields: dict[str, Any] = {
        "name": UNIFIED_TABLE,
        "num_embeddings": sum(spec.cardinality for spec in schema.categorical),
        "dim": dim,
        "method": config.method,
        "budget": config.budget,
        "pooling": config.pooling,
        **config.options,
        **config.overrides.get(UNIFIED_TABLE, {}),
    }
    unknown = sorted(set(config.overrides) - {UNIFIED_TABLE})
    if unknown:
        raise ModelConfigError(
            f"tables.overrides names unknown table(s) {unknown}; with method unified the only "
            f"table is {UNIFIED_TABLE!r}"
        )
    table = from_dict(TableConfig, fields, f"table {UNIFIED_TABLE!r}")
    return [table], {spec.name: UNIFIED_TABLE for spec in sparse_features(schema)}


def _explicit_tables(
    schema: Schema, config: TablesConfig
) -> tuple[list[TableConfig], dict[str, str]]:
    tables = list(config.tables)
    names = [table.name for table in tables]
    features = [spec.name for spec in sparse_features(schema)]
    feature_to_table = dict(config.feature_to_table)
    for spec in sparse_features(schema):
        if spec.name not in feature_to_table:
            default = spec.shares_ids_with or spec.name
            if default not in names:
                raise ModelConfigError(
                    f"feature {spec.name!r} has no table: add it to tables.feature_to_table or "
                    f"name a table {default!r}; tables: {', '.join(names)}"
                )
            feature_to_table[spec.name] = default
    unknown_features = sorted(set(feature_to_table) - set(features))
    if unknown_features:
        raise ModelConfigError(
            f"tables.feature_to_table names unknown feature(s) {unknown_features}; "
            f"accepted: {', '.join(features)}"
        )
    unknown_tables = sorted(set(feature_to_table.values()) - set(names))
    if unknown_tables:
        raise ModelConfigError(
            f"tables.feature_to_table names unknown table(s) {unknown_tables}; "
            f"accepted: {', '.join(names)}"
        )
    return tables, feature_to_table
