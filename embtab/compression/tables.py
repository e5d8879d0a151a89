"""The embedding tables of one study cell: a compression method at a memory budget.

The budget is a fraction of the FULL tables' memory, applied table by table to the large id
tables: a categorical feature with at least `compress_min_rows` ids is compressed to
`budget` x its full table's bytes; smaller tables (gender, age, ...) stay full, since
compressing them saves next to nothing. A sequence feature reads the table of the feature
whose ids it shares (MovieLens `hist_item_id` reads `item_id`'s table).

How each method spends the budget on one compressed table of n ids (rows are `dim` wide):

- `full`: one row per id; only budget 1.0.
- `hash`: int(n x budget) rows, row = hash(id) mod rows (collisions even at budget 1.0).
- `unified`: ONE table for all compressed features, int(sum of their n x budget) rows; each
  feature (a sequence feature too) looks it up with its own hash seed (feature multiplexing).
- `qr_mult` / `qr_add` / `qr_concat`: the complementary-partition embedding with the fewest
  partitions (2, 3, ...) that fits the budget; the planner gives the remainder partition as
  many rows as the budget allows (at 1.0: n - 2 remainder rows and 2 quotient rows).
- `collisionless`: Monolith's table with capacity = int(n x budget) rows, admission after
  `min_count` = 1 sighting, LRU eviction at capacity, no expiry.
- `graphhash` / `double_graphhash`: rows from a Louvain clustering of the training user-item
  graph (plus hash rows for unseen ids), for the user and item id tables; other compressed
  tables (MovieLens `zip_code`) fall back to `hash` at the same budget.
- `double_hash`: two hash functions into one table of int(n x budget) rows, the two rows
  summed (the hashing baseline of the GraphHash paper); a GraphHash table with no clusters.
- `robe`: ROBE-Z, one shared array of n x dim x budget parameters cut into rows of
  `block_size` (4); an id reads dim / 4 blocks at hashed rows, concatenated.

Which method a table gets (full when small, the graph fallback, a hash table for raw 64-bit
ids) is decided by `models.tables.feature_method`, the rule `embtab train` follows too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from embedding_tables.config import TableConfig
from embedding_tables.errors import BudgetError
from embedding_tables.methods import Method, method_class
from embtab.compression.errors import InfeasibleCellError, StudyConfigError
from feature_store.schema import FeatureSpec, Schema
from models.tables import UNIFIED_TABLE, FeatureMethod, feature_method, feature_routes


@dataclass(frozen=True)
class MethodSpec:
    """One method of the study: the TableConfig method and options of its compressed tables.

    `mappings` says where GraphHash-style tables get their id -> row maps: "graph" (clustered
    from the training interactions) or "hashed" (no clusters: every id hashed twice).
    """

    name: str
    table_method: str
    options: Mapping[str, Any] = field(default_factory=dict)
    mappings: str | None = None

    def method(self) -> Method:
        """The TableConfig method of the compressed tables, with this cell's options."""
        return method_class(self.table_method)(**self.options)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("full", "full"),
        MethodSpec("hash", "hash"),
        MethodSpec("unified", "unified"),
        MethodSpec("qr_mult", "qr", {"combine": "mult"}),
        MethodSpec("qr_add", "qr", {"combine": "add"}),
        MethodSpec("qr_concat", "qr", {"combine": "concat"}),
        MethodSpec("collisionless", "collisionless", {"min_count": 1}),
        MethodSpec("graphhash", "graphhash", {"graphhash_variant": "single"}, "graph"),
        MethodSpec("double_graphhash", "graphhash", {"graphhash_variant": "double"}, "graph"),
        MethodSpec("double_hash", "graphhash", {"graphhash_variant": "double"}, "hashed"),
        MethodSpec("robe", "robe", {"block_size": 4}),
        MethodSpec("ttrec", "ttrec"),
    )
}
# The study's baseline: every table full; every budget is a fraction of its memory.
BASELINE = "full"
# Names that stand for several methods on the command line.
METHOD_ALIASES = {"qr": ("qr_mult", "qr_add", "qr_concat")}


@dataclass(frozen=True)
class CellTables:
    """The tables of one cell and what the budget decided for them."""

    tables: tuple[TableConfig, ...]
    feature_to_table: dict[str, str]
    compressed: tuple[str, ...]  # the tables compressed to the budget (by name)
    full_bytes: int  # every table at one row per id: what the budget is a fraction of
    compressed_full_bytes: int  # the compressed tables' share of full_bytes
    decisions: dict[str, Any]  # what the method chose per table (qr partitions, capacity, ...)

    @property
    def graph_tables(self) -> list[TableConfig]:
        return [table for table in self.tables if table.method.takes_mapping]


def expand_methods(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Method names with aliases expanded, in order, without repeats; StudyConfigError for an
    unknown one (before anything runs)."""
    expanded: list[str] = []
    for name in names:
        for study_name in METHOD_ALIASES.get(name, (name,)):
            if study_name not in METHODS:
                accepted = ", ".join([*METHODS, *METHOD_ALIASES])
                raise StudyConfigError(f"unknown method {name!r}; accepted: {accepted}")
            if study_name not in expanded:
                expanded.append(study_name)
    return tuple(expanded)


def cell_tables(
    schema: Schema, method: str, budget: float, dim: int, compress_min_rows: int, seed: int = 0
) -> CellTables:
    """Tables of every categorical feature of `schema` for `method` at `budget`; `seed` is the
    hash seed of the compressed tables (each run of a cell draws its own collisions).

    Raises InfeasibleCellError when the method cannot be built at this budget on this schema
    (full below 1.0, graph methods without user and item ids, qr with no partition count that
    fits, a budget that leaves a table no row).
    """
    spec = METHODS[method]
    table_method = method_class(spec.table_method)
    categorical = schema.categorical
    compressed = [f.name for f in categorical if f.cardinality >= compress_min_rows]
    if not table_method.compresses and budget < 1.0:
        raise InfeasibleCellError(
            "full keeps one row per id; it runs at budget 1.0 only (it is the baseline)"
        )
    if spec.mappings == "graph":
        _check_graph(schema, method)
    if table_method.compresses and not compressed:
        raise InfeasibleCellError(
            f"no table has >= {compress_min_rows} ids to compress; lower compress_min_rows"
        )
    feature_to_table = feature_routes(schema)
    full_tables = {
        f.name: TableConfig(name=f.name, num_embeddings=f.cardinality, dim=dim, pooling="mean")
        for f in categorical
    }
    full_bytes = sum(table.full_bytes for table in full_tables.values())
    compressed_full_bytes = sum(full_tables[name].full_bytes for name in compressed)
    decisions: dict[str, Any] = {}
    if table_method.shares_one_table:
        tables, feature_to_table = _shared(
            full_tables, feature_to_table, compressed, spec, budget, seed
        )
    else:
        # A graph method clusters the user and item id tables only; without a graph (double_hash)
        # it applies to every compressed table.
        graph_features = (
            set(schema.id_columns.values()) if spec.mappings == "graph" else set(full_tables)
        )
        tables = []
        for feature in categorical:
            method = feature_method(
                feature,
                spec.table_method,
                compressed=feature.name in compressed,
                graph_features=graph_features,
            )
            table, decided = _compress(
                full_tables[feature.name], feature, method, spec, budget, seed
            )
            tables.append(table)
            if decided:
                decisions[feature.name] = decided
        if not table_method.compresses:
            compressed = []
    _check_rows(tables, budget)
    return CellTables(
        tables=tuple(tables),
        feature_to_table=feature_to_table,
        compressed=tuple(compressed),
        full_bytes=full_bytes,
        compressed_full_bytes=compressed_full_bytes,
        decisions=decisions,
    )


def planned_bytes(tables: CellTables) -> int:
    """Weight bytes the cell will allocate at most, known before allocating anything: the
    planned physical tables (graphhash tables at their budget, collisionless at capacity)."""
    return sum(table.method.planned_bytes(table) for table in tables.tables)


def _check_graph(schema: Schema, method: str) -> None:
    if not {"user", "item"} <= set(schema.id_columns):
        raise InfeasibleCellError(
            f"{method} clusters the user-item interaction graph; data set {schema.dataset!r} has "
            f"no user and item id columns (it names {dict(schema.id_columns) or 'none'})"
        )


def _shared(
    full_tables: dict[str, TableConfig],
    feature_to_table: dict[str, str],
    compressed: list[str],
    spec: MethodSpec,
    budget: float,
    seed: int,
) -> tuple[list[TableConfig], dict[str, str]]:
    """One shared table (unified) for the compressed features, sized to the budget's total."""
    first = full_tables[compressed[0]]
    shared = TableConfig(
        name=UNIFIED_TABLE,
        num_embeddings=sum(full_tables[name].num_embeddings for name in compressed),
        dim=first.dim,
        method=spec.method(),
        budget=budget,
        pooling=first.pooling,
        seed=seed,
    )
    tables = [table for name, table in full_tables.items() if name not in compressed]
    routed = {
        feature: UNIFIED_TABLE if table in compressed else table
        for feature, table in feature_to_table.items()
    }
    return [*tables, shared], routed


def _compress(
    full: TableConfig,
    feature: FeatureSpec,
    method: FeatureMethod,
    spec: MethodSpec,
    budget: float,
    seed: int,
) -> tuple[TableConfig, dict[str, Any]]:
    """One table and what was decided for it (empty if nothing beyond the budget)."""
    if not method_class(method.name).compresses:
        return full, {}
    if not method.budgeted:
        return dataclasses.replace(full, method=method.name), {}
    if method.name != spec.table_method:
        why = "raw 64-bit ids" if feature.hashed else "not a user or item id table"
        table = dataclasses.replace(full, method=method.name, budget=budget, seed=seed)
        return table, {"method": method.name, "why": why}
    try:
        table = dataclasses.replace(full, method=spec.method(), budget=budget, seed=seed)
        return table.method.at_budget(table)
    except BudgetError as error:
        raise InfeasibleCellError(str(error)) from error


def _check_rows(tables: list[TableConfig], budget: float) -> None:
    for table in tables:
        if table.budget is not None and table.budget_rows() < 1:
            raise InfeasibleCellError(
                f"budget {budget} leaves table {table.name!r} ({table.num_embeddings} ids) no "
                "row at all"
            )
