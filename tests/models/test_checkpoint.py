"""Checkpoints: identical predictions after a round trip, and clear errors, never a partial load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import checkpoint as checkpoint_module
from models.batches import batch_from_columns
from models.checkpoint import MANIFEST_KEY, load_checkpoint, read_manifest, save_checkpoint
from models.errors import CheckpointError
from models.train import dense_optimizer, train_step
from tests.models.test_models_train import METHODS, make_model


def trained(dataset, name, method):
    model, run = make_model(dataset, name, METHODS[method])
    optimizer = dense_optimizer(model, run.train)
    for step, start in enumerate(range(0, 1024, 256)):
        batch = batch_from_columns(dataset.read("train").slice(start, 256), model.schema)
        train_step(model, batch, optimizer, step)
    return model


def scores(model, batch):
    model.eval()
    with torch.no_grad():
        return model(batch.sparse, batch.dense)


@pytest.mark.parametrize("method", list(METHODS))
def test_round_trip_gives_identical_predictions(tiny_dataset, tmp_path, method):
    model = trained(tiny_dataset, "din", method)
    path = save_checkpoint(tmp_path / "din.safetensors", model, metrics={"valid": {"auc": 0.5}})
    loaded = load_checkpoint(path)
    batch = batch_from_columns(tiny_dataset.read("test"), model.schema)
    assert torch.equal(scores(model, batch), scores(loaded.model, batch))
    assert not loaded.model.training
    assert loaded.model.spec == model.spec
    assert loaded.metrics == {"valid": {"auc": 0.5}}
    manifest = loaded.manifest
    assert manifest["versions"]["torch"] == torch.__version__
    assert [t["name"] for t in manifest["tables"]] == [t.name for t in model.spec.tables]
    assert manifest["schema"]["features"][0]["name"] == "user_id"
    if method == "graphhash":
        assert set(manifest["mappings"]["graphhash"]) == {"user_id", "item_id"}
    if method == "collisionless":
        assert manifest["mappings"]["collisionless"]["user_id"]["admitted"] > 0


def test_round_trip_keeps_the_sparse_optimizer_state(tiny_dataset, tmp_path):
    model = trained(tiny_dataset, "mf", "qr")
    loaded = load_checkpoint(save_checkpoint(tmp_path / "mf.safetensors", model)).model
    batch = batch_from_columns(tiny_dataset.read("valid"), model.schema)
    for twin in (model, loaded):
        torch.manual_seed(3)
        train_step(twin, batch, None, 0)
    assert torch.equal(scores(model, batch), scores(loaded, batch))


def test_truncated_or_foreign_files_are_clear_errors(tiny_dataset, tmp_path):
    path = save_checkpoint(tmp_path / "good.safetensors", trained(tiny_dataset, "lr", "full"))
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(truncated)
    header_only = tmp_path / "header.safetensors"
    header_only.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(header_only)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="without an embtab manifest"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")


def rewrite_manifest(path, change):
    manifest = read_manifest(path)
    change(manifest)
    save_file(load_file(path), path, metadata={MANIFEST_KEY: json.dumps(manifest)})


def test_incompatible_versions_and_mismatched_tensors_are_refused(tiny_dataset, tmp_path):
    model = trained(tiny_dataset, "dcn", "hash")
    path = save_checkpoint(tmp_path / "dcn.safetensors", model)
    rewrite_manifest(path, lambda manifest: manifest.update(format_version=99))
    with pytest.raises(CheckpointError, match="format version 99.*reads version 1"):
        load_checkpoint(path)

    path = save_checkpoint(tmp_path / "dcn.safetensors", model)
    rewrite_manifest(path, lambda manifest: manifest["model"].update(cross_layers=5))
    with pytest.raises(CheckpointError, match="does not match the model: missing"):
        load_checkpoint(path)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tiny_dataset, tmp_path, monkeypatch):
    model = trained(tiny_dataset, "lr", "full")
    path = save_checkpoint(tmp_path / "lr.safetensors", model)
    before = path.read_bytes()

    def fail_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["lr.safetensors"]
