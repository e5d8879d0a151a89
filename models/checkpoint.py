"""Checkpoints: one safetensors file whose header metadata carries the JSON manifest.

The manifest holds what rebuilds the model without the training code: model config, table
configs, feature -> table map, sparse optimizer, the features' schema, table mapping metadata
(GraphHash maps, collisionless id map statistics; their tensors are in the file with the rest),
metrics and library versions. A model trained on a spec'd data set also carries its
preprocessing artifact (each file as a uint8 tensor under `preprocessing/`, its content hash in
the manifest), so the checkpoint alone turns raw values into scores. Tensors and manifest live
in one file so that a write is one
atomic rename: a crash leaves the previous checkpoint, never half of a new one. safetensors has
no checksum of its own, so the header also carries a SHA-256 of every tensor's bytes: a file
corrupted after it was written is refused instead of loading wrong weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from embedding_tables.graphhash import GraphHashMapping
from embedding_tables.optimizer import SparseOptimizerConfig
from feature_store.artifact import Preprocessor
from feature_store.schema import Schema, SchemaError
from feature_store.wheels import DataError
from models.base import Model
from models.build import ModelSpec, build_model
from models.config import model_config_from_dict, table_config_from_dict, to_dict
from models.errors import CheckpointError, CheckpointWriteError, ModelError

FORMAT = "embtab.checkpoint"
FORMAT_VERSION = 1
MANIFEST_KEY = "embtab.manifest"
CHECKSUM_KEY = "embtab.tensors_sha256"
GRAPHHASH_PREFIX = "embeddings.graphhash_mappings."
PREPROCESSING_PREFIX = "preprocessing/"
LIBRARIES = ("embtab", "torch", "torchrec", "fbgemm-gpu-cpu", "safetensors", "numpy", "pyarrow")


@dataclass
class Checkpoint:
    """A model rebuilt from a checkpoint (in eval mode), and the checkpoint's manifest."""

    model: Model
    manifest: dict[str, Any]

    @property
    def schema(self) -> Schema:
        return self.model.schema

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def manifest_of(model: Model, metrics: dict | None = None, extra: dict | None = None) -> dict:
    spec: ModelSpec = model.spec
    embeddings = model.embeddings
    mappings: dict[str, dict] = {}
    graphhash = {
        name: mapping.to_tensors()[1] for name, mapping in embeddings.graphhash_mappings.items()
    }
    if graphhash:
        mappings["graphhash"] = graphhash
    collisionless = {name: table.stats() for name, table in embeddings.self_managed.items()}
    if collisionless:
        mappings["collisionless"] = collisionless
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "model": to_dict(spec.model),
        "schema": json.loads(spec.schema.to_json()),
        "tables": [to_dict(table) for table in spec.tables],
        "feature_to_table": dict(spec.feature_to_table),
        "sparse_optimizer": (
            None if spec.sparse_optimizer is None else dataclasses.asdict(spec.sparse_optimizer)
        ),
        "mappings": mappings,
        "memory_bytes": embeddings.memory_bytes(),
        "num_parameters": embeddings.num_parameters(),
        "metrics": metrics or {},
        "preprocessing": (
            None
            if spec.preprocessing is None
            else {
                "content_hash": spec.preprocessing.content_hash,
                "dataset": spec.preprocessing.spec.name,
            }
        ),
        **(extra or {}),
    }


def preprocessing_tensors(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The preprocessing artifact's files as uint8 tensors (none for a model without one)."""
    if spec.preprocessing is None:
        return {}
    return {
        f"{PREPROCESSING_PREFIX}{name}": torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        for name, blob in spec.preprocessing.to_files().items()
    }


def preprocessing_from_tensors(
    manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], source: str
) -> Preprocessor | None:
    """The artifact a checkpoint carries, checked against the content hash its manifest names."""
    recorded = manifest.get("preprocessing")
    if not recorded:
        return None
    files = {
        key[len(PREPROCESSING_PREFIX) :]: value.numpy().tobytes()
        for key, value in tensors.items()
        if key.startswith(PREPROCESSING_PREFIX)
    }
    try:
        preprocessing = Preprocessor.from_files(files)
    except DataError as error:
        raise CheckpointError(f"{source}: its preprocessing artifact: {error}") from error
    if preprocessing.content_hash != recorded["content_hash"]:
        raise CheckpointError(
            f"{source}: the preprocessing artifact has content hash "
            f"{preprocessing.content_hash}, the manifest names {recorded['content_hash']}"
        )
    return preprocessing


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def save_checkpoint(
    path: str | Path, model: Model, metrics: dict | None = None, extra: dict | None = None
) -> Path:
    """Write `model` to `path` atomically (temp file in the same directory, fsync, rename).

    `extra` adds JSON-able entries to the manifest (the run config, training history). A write
    that fails (read-only directory, full disk) raises CheckpointWriteError and leaves the
    previous file at `path` as it was.
    """
    path = Path(path)
    manifest = manifest_of(model, metrics, extra)
    # Table weights are views of one fused buffer; safetensors wants each tensor on its own.
    tensors = {
        key: value.detach().cpu().contiguous().clone() for key, value in model.state_dict().items()
    }
    tensors.update(preprocessing_tensors(model.spec))
    return write_checkpoint_file(path, tensors, manifest)


def write_checkpoint_file(
    path: str | Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]
) -> Path:
    """Write `tensors` and `manifest` as a checkpoint at `path`, atomically, as save_checkpoint."""
    path = Path(path)
    metadata = {
        MANIFEST_KEY: json.dumps(manifest, sort_keys=True),
        CHECKSUM_KEY: tensors_digest(tensors),
    }
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, scratch, metadata=metadata)
        with open(scratch, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(scratch, path)
    except (OSError, SafetensorError) as error:
        with contextlib.suppress(OSError):
            scratch.unlink(missing_ok=True)
        raise CheckpointWriteError(
            f"could not write checkpoint {path} ({error}); the file there, if any, is unchanged: "
            "check that the directory is writable and the disk has room"
        ) from error
    except BaseException:
        with contextlib.suppress(OSError):
            scratch.unlink(missing_ok=True)
        raise
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a checkpoint, checked for format and version (tensors are not read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or not safetensors): {error}"
        ) from error
    if MANIFEST_KEY not in header:
        raise CheckpointError(f"{path} is a safetensors file without an embtab manifest")
    try:
        manifest = json.loads(header[MANIFEST_KEY])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: the manifest is not valid JSON: {error}") from error
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {manifest.get('format_version')!r} (written by "
            f"embtab {manifest.get('versions', {}).get('embtab', '?')}); this embtab reads "
            f"version {FORMAT_VERSION}"
        )
    return manifest


def spec_from_manifest(manifest: dict[str, Any]) -> ModelSpec:
    try:
        optimizer = manifest["sparse_optimizer"]
        return ModelSpec(
            model=model_config_from_dict(manifest["model"], "manifest.model"),
            schema=Schema.from_json(json.dumps(manifest["schema"])),
            tables=tuple(
                table_config_from_dict(table, "manifest.tables", strict=False)
                for table in manifest["tables"]
            ),
            feature_to_table=dict(manifest["feature_to_table"]),
            sparse_optimizer=None if optimizer is None else SparseOptimizerConfig(**optimizer),
        )
    except (KeyError, TypeError, ValueError, SchemaError) as error:
        raise CheckpointError(f"the manifest does not describe a model: {error!r}") from error


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, checked against the checksum in its header (files written
    before checkpoints carried one are read unchecked)."""
    try:
        with safe_open(Path(path), framework="pt") as handle:
            expected = (handle.metadata() or {}).get(CHECKSUM_KEY)
            names = handle.keys()  # a safe_open handle is not iterable itself
            tensors = {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: tensors are unreadable (truncated?): {error}") from error
    if expected is not None and tensors_digest(tensors) != expected:
        raise CheckpointError(
            f"{path}: the tensors do not match the checksum in its header: the file was "
            "corrupted after it was written; use another copy or an earlier checkpoint"
        )
    return tensors


def load_checkpoint(path: str | Path, device: torch.device | str | None = None) -> Checkpoint:
    """Rebuild the model a checkpoint describes and load its tensors; all or nothing."""
    manifest = read_manifest(path)
    tensors = read_tensors(path)
    spec = dataclasses.replace(
        spec_from_manifest(manifest),
        preprocessing=preprocessing_from_tensors(manifest, tensors, str(path)),
    )
    mappings = graphhash_from_tensors(manifest, tensors, str(path))
    try:
        model = build_model(spec, mappings, device)
    except ModelError as error:
        raise CheckpointError(f"{path}: cannot rebuild the model: {error}") from error
    load_state(model, tensors, str(path))
    model.eval()
    return Checkpoint(model=model, manifest=manifest)


def graphhash_from_tensors(
    manifest: dict[str, Any], tensors: Mapping[str, torch.Tensor], source: str
) -> dict[str, GraphHashMapping]:
    """The GraphHash mappings a manifest names, rebuilt from a checkpoint's tensors."""
    mappings = {}
    for table, metadata in manifest.get("mappings", {}).get("graphhash", {}).items():
        prefix = f"{GRAPHHASH_PREFIX}{table}."
        parts = {
            key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)
        }
        try:
            mappings[table] = GraphHashMapping.from_tensors(parts, metadata)
        except ValueError as error:
            raise CheckpointError(f"{source}: GraphHash mapping of {table!r}: {error}") from error
    return mappings


def load_state(model: Model, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load `tensors` into `model`, strictly: every key present and of the right shape (the
    preprocessing artifact's tensors are not the model's state and are left out)."""
    tensors = {k: v for k, v in tensors.items() if not k.startswith(PREPROCESSING_PREFIX)}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    try:
        model.load_state_dict(tensors, strict=True)
    except (RuntimeError, ValueError) as error:
        raise CheckpointError(f"{source} does not fit the model: {error}") from error
