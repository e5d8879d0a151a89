"""Between a model and its published form: what goes to the row shards, what rides with the
dense blob, and how a server rebuilds a model to score with from a version's manifest and blob.

Rows: every physical table of the model's EmbeddingCollection (`embeddings.tables.*` in the
state_dict) goes to the shards keyed by row; every self-managed (collisionless) table's rows go
keyed by raw id, and the rest of its state (counts, last-seen times, optimizer state) stays with
the trainer. Everything else in the state_dict (dense layers, GraphHash maps) is the dense blob.
A table's default row (the collisionless default row, the mean row of any other table) is what a
server reads for a row it cannot get: absent from Redis, or Redis down and the row not cached.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from embedding_tables.collisionless import DEFAULT_ROW
from embedding_tables.graphhash import GraphHashMapping
from embedding_tables.idmap import EMPTY
from models.base import Model
from models.build import build_model
from models.checkpoint import GRAPHHASH_PREFIX, load_checkpoint, spec_from_manifest
from serving.errors import PublishError, StoreError
from serving.manifest import TableLayout
from serving.publisher import DeltaResult, ParamPublisher, PublishResult

EMBEDDINGS_PREFIX = "embeddings."
TABLE_STATE_PREFIXES = (f"{EMBEDDINGS_PREFIX}tables.", f"{EMBEDDINGS_PREFIX}self_managed.")
EXPORT_CHUNK_ROWS = 65536


def table_layouts(model: Model) -> list[TableLayout]:
    """The physical tables of the model as they are published."""
    embeddings = model.embeddings
    layouts = []
    for table in embeddings.physical_tables():
        if table.name in embeddings.self_managed:
            managed = embeddings.self_managed[table.name]
            layouts.append(TableLayout(table.name, managed.capacity or 0, table.dim, "id"))
        else:
            layouts.append(TableLayout(table.name, table.num_rows, table.dim, "row"))
    return layouts


def dense_state(model: Model) -> dict[str, torch.Tensor]:
    """The state_dict without the tables' rows and row state: the dense blob's tensors."""
    return {
        key: value.detach().cpu().contiguous().clone()
        for key, value in model.state_dict().items()
        if not key.startswith(TABLE_STATE_PREFIXES)
    }


def default_rows(model: Model) -> dict[str, np.ndarray]:
    """Per physical table, the row served when its own row cannot be had."""
    embeddings = model.embeddings
    rows = {}
    for table in embeddings.physical_tables():
        if table.name in embeddings.self_managed:
            managed = embeddings.self_managed[table.name]
            rows[table.name] = managed.default_row_values().detach().float().cpu().numpy()
            continue
        total = np.zeros(table.dim, dtype=np.float64)
        count = 0
        for _, values in embeddings.export_rows(table.name, EXPORT_CHUNK_ROWS):
            total += values.double().sum(dim=0).cpu().numpy()
            count += values.shape[0]
        rows[table.name] = (total / max(1, count)).astype(np.float32)
    return rows


def _row_chunks(model: Model, table: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    yield from model.embeddings.export_rows(table, EXPORT_CHUNK_ROWS)


def publish_model(
    publisher: ParamPublisher,
    model: Model,
    model_manifest: Mapping[str, Any],
    *,
    encoding: str = "fp32",
    num_shards: int | None = None,
) -> PublishResult:
    """Publish every physical table's rows, then the dense blob, then flip the live version.

    The model's preprocessing artifact is published with the version, so a server switches
    model and raw-value transform together."""
    layouts = table_layouts(model)
    preprocessing = model.spec.preprocessing
    publish = publisher.begin(
        layouts,
        encoding=encoding,
        num_shards=num_shards,
        model_manifest=model_manifest,
        preprocessing=None if preprocessing is None else preprocessing.to_files(),
    )
    for layout in layouts:
        for ids, rows in _row_chunks(model, layout.name):
            publish.write_rows(layout.name, ids, rows)
    result = publish.commit(dense_state(model), default_rows(model))
    publisher.collect_garbage()
    return result


def publish_checkpoint(
    publisher: ParamPublisher,
    path: str,
    *,
    encoding: str = "fp32",
    num_shards: int | None = None,
) -> PublishResult:
    """Load a checkpoint (models.checkpoint) and publish it."""
    checkpoint = load_checkpoint(path)
    return publish_model(
        publisher, checkpoint.model, checkpoint.manifest, encoding=encoding, num_shards=num_shards
    )


@dataclass(frozen=True)
class ModelDelta:
    """What changed in a model since the last delta: rows per physical table (row ids, or raw
    ids for a collisionless table), ids a collisionless table lost, collisionless default rows
    that were trained."""

    rows: dict[str, tuple[torch.Tensor, torch.Tensor]]
    deleted: dict[str, torch.Tensor]
    default_rows: dict[str, np.ndarray]

    @property
    def empty(self) -> bool:
        return not (self.rows or self.deleted or self.default_rows)


def model_delta(model: Model) -> ModelDelta:
    """The rows touched since the last call (it resets the record: `take_touched_rows`,
    `evicted_ids`), as `publish_delta` takes them."""
    embeddings = model.embeddings
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    deleted: dict[str, torch.Tensor] = {}
    defaults: dict[str, np.ndarray] = {}
    for table, touched in embeddings.take_touched_rows().items():
        if table in embeddings.self_managed:
            managed = embeddings.self_managed[table]
            evicted = managed.evicted_ids()
            if evicted.numel():
                deleted[table] = evicted.cpu()
            if bool((touched == DEFAULT_ROW).any()):
                defaults[table] = managed.default_row_values().detach().float().cpu().numpy()
            ids = managed.ids_of_rows(touched)
            owned = ids != EMPTY
            if bool(owned.any()):
                rows[table] = (ids[owned].cpu(), managed.weight[touched[owned]].detach().cpu())
        elif touched.numel():
            weight = embeddings.tables.weight(table)
            rows[table] = (touched.cpu(), weight[touched].detach().float().cpu())
    return ModelDelta(rows, deleted, defaults)


def publish_model_delta(
    publisher: ParamPublisher, model: Model, *, with_dense: bool = True
) -> DeltaResult | None:
    """Publish what changed since the last call into the live version in place (and, with
    `with_dense`, the dense parameters as a new dense revision); None if nothing changed."""
    delta = model_delta(model)
    if delta.empty and not with_dense:
        return None
    return publisher.publish_delta(
        rows=delta.rows,
        deleted=delta.deleted,
        dense=dense_state(model) if with_dense else None,
        default_rows=delta.default_rows,
    )


def servable_model(model_manifest: Mapping[str, Any], dense: Mapping[str, torch.Tensor]) -> Model:
    """A model in eval mode with the version's dense state and GraphHash maps loaded; its tables'
    rows are whatever the scorer loads before each forward.

    Built without the fused sparse optimizer: serving never trains, so the tables are plain
    weights and no optimizer state is allocated.
    """
    try:
        spec = dataclasses.replace(spec_from_manifest(dict(model_manifest)), sparse_optimizer=None)
    except ValueError as error:
        raise StoreError(f"the published model manifest is not usable: {error}") from error
    mappings = {}
    graphhash = model_manifest.get("mappings", {}).get("graphhash", {})
    for table, metadata in graphhash.items():
        prefix = f"{GRAPHHASH_PREFIX}{table}."
        parts = {
            key[len(prefix) :]: value for key, value in dense.items() if key.startswith(prefix)
        }
        mappings[table] = GraphHashMapping.from_tensors(parts, metadata)
    model = build_model(spec, mappings)
    result = model.load_state_dict(dict(dense), strict=False)
    stray = [key for key in result.missing_keys if not key.startswith(TABLE_STATE_PREFIXES)]
    if stray or result.unexpected_keys:
        raise PublishError(
            f"the dense blob does not match the model: missing {stray[:5]}, unexpected "
            f"{list(result.unexpected_keys)[:5]}"
        )
    return model.eval()
