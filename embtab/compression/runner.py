"""Run a study: each cell builds its tables, trains the model once, and is evaluated on test.

A cell is trained by the project's batch trainer (`models.train.fit`: Adam on the dense part,
fused row-wise Adagrad on the tables, one validation pass at the end of the epoch) from a
`RunConfig` whose tables are the cell's explicit TableConfigs; GraphHash tables get their
mappings from the training split's user-item graph (or, for `double_hash`, mappings with no
clusters). What a cell records is measured, never nominal: the bytes are
`EmbeddingCollection.memory_bytes()` of the trained model.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from embedding_tables.errors import BudgetError
from embedding_tables.graphhash import GraphHashMapping
from embtab.compression.errors import InfeasibleCellError
from embtab.compression.grid import Cell, StudyConfig
from embtab.compression.results import DONE, SKIPPED, ResultsFile
from embtab.compression.tables import METHODS, CellTables, cell_tables, planned_bytes
from feature_store.offline import Dataset
from feature_store.schema import Schema
from models.build import ModelSpec, build_model, graphhash_mappings, plan_model
from models.config import RunConfig, TablesConfig
from models.train import fit, seed_everything, split_evaluator

NO_IDS = torch.empty(0, dtype=torch.int64)


def model_schema(study: StudyConfig, dataset: Dataset) -> Schema:
    """The features the study's model reads (the two-tower: the user and item ids only)."""
    run = RunConfig(dataset=dataset.name, model=study.model, train=study.train)
    return plan_model(run, dataset.schema).schema


def run_cell(
    study: StudyConfig,
    cell: Cell,
    dataset: Dataset,
    stage: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Train and test one cell; a skipped record (with the reason) if it cannot be built."""
    started = time.perf_counter()
    head = {"cell": cell.key, "method": cell.method, "budget": cell.budget, "seed": cell.seed}
    try:
        tables = cell_tables(
            model_schema(study, dataset),
            cell.method,
            cell.budget,
            study.dim,
            study.min_rows_to_compress,
            cell.seed,
        )
        planned = planned_bytes(tables)
        if planned > study.max_table_bytes:
            raise InfeasibleCellError(
                f"the tables would take {planned:,} bytes, over the limit of "
                f"{study.max_table_bytes:,} bytes (--max-table-bytes)"
            )
        run = RunConfig(
            dataset=dataset.name,
            model=study.model,
            tables=TablesConfig(tables=tables.tables, feature_to_table=tables.feature_to_table),
            train=dataclasses.replace(study.train, seed=cell.seed),
        )
        spec = plan_model(run, dataset.schema)
        seed_everything(cell.seed)
        stage("mapping ids" if spec.graphhash_tables else "building")
        mappings = _mappings(spec, cell, dataset)
    except InfeasibleCellError as error:
        return {**head, "status": SKIPPED, "reason": str(error)}
    model = build_model(spec, mappings)
    stage("training")
    result = fit(model, dataset, run.train, progress=False)
    stage("testing")
    test = split_evaluator(model, dataset, "test", run.train)(model)
    memory = model.embeddings.memory_bytes()
    allocated = memory.pop("total")
    compressed_bytes = sum(memory[t.name] for t in tables.tables if t.method.compresses)
    return {
        **head,
        "status": DONE,
        "options": _options(cell, tables, mappings),
        "bytes_allocated": allocated,
        "bytes_by_table": memory,
        "full_bytes": tables.full_bytes,
        "memory_fraction": allocated / tables.full_bytes,
        "compressed_tables_fraction": (
            compressed_bytes / tables.compressed_full_bytes if tables.compressed else None
        ),
        "weight_bytes": sum(table.memory_bytes for table in model.embeddings.physical_tables()),
        "self_managed_bytes": {
            name: table.memory_breakdown() for name, table in model.embeddings.self_managed.items()
        },
        "test": test,
        "valid": {k: v for k, v in result.best.items() if k not in ("step", "epoch")},
        "steps": result.steps,
        "examples": result.examples,
        "train_seconds": round(result.train_seconds, 2),
        "cell_seconds": round(time.perf_counter() - started, 2),
    }


def run_study(
    study: StudyConfig,
    dataset: Dataset,
    results: ResultsFile,
    progress: bool = True,
    finished: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Every cell not yet done in `results`, in grid order, each recorded as it finishes;
    returns this run's records (also appended to `finished` as they come, so a caller sees
    them when the run is interrupted).

    The bar counts cells (the finished ones of an earlier run included), shows the running
    cell and its stage, and estimates the time left from this run's cells.
    """
    cells = study.cells()
    done = results.done()
    todo = [cell for cell in cells if cell.key not in done]
    records = [] if finished is None else finished
    with tqdm(
        total=len(cells),
        initial=len(cells) - len(todo),
        desc=f"{study.name}",
        unit="cell",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for cell in todo:
            label = f"{cell.method} budget {cell.budget:g} seed {cell.seed}"

            def stage(message: str, label: str = label) -> None:
                bar.set_postfix_str(f"{label}: {message}")

            stage("planning")
            record = run_cell(study, cell, dataset, stage)
            results.record(record)
            records.append(record)
            bar.update(1)
    return records


def _mappings(spec: ModelSpec, cell: Cell, dataset: Dataset) -> dict[str, nn.Module]:
    """GraphHash tables' id -> row maps: clustered from the training graph, or hash-only."""
    tables = spec.graphhash_tables
    if not tables:
        return {}
    if METHODS[cell.method].mappings == "hashed":
        return {
            table.name: GraphHashMapping(
                table.name,
                NO_IDS,
                NO_IDS,
                NO_IDS,
                table.budget_rows(),
                variant=table.method.graphhash_variant,
                seed=table.seed,
            )
            for table in tables
        }
    try:
        return graphhash_mappings(spec, dataset, cell.seed)
    except BudgetError as error:
        raise InfeasibleCellError(str(error)) from error


def _options(cell: Cell, tables: CellTables, mappings: dict[str, nn.Module]) -> dict[str, Any]:
    """What the cell ran: the method's TableConfig options, the compressed tables and what
    was decided for each (qr partitions, collisionless capacity, graph clusters)."""
    spec = METHODS[cell.method]
    decisions = {name: dict(decided) for name, decided in tables.decisions.items()}
    for name, mapping in mappings.items():
        decisions.setdefault(name, {}).update(
            cluster_rows=mapping.num_cluster_rows,
            hash_rows=mapping.num_hash_rows,
            ids_with_cluster=mapping.num_known_ids,
        )
    return {
        "table_method": spec.table_method,
        **spec.options,
        "compressed_tables": list(tables.compressed),
        "tables": decisions,
    }
