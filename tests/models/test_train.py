"""The batch trainer: early stopping, best state restored, NaN stops, config errors up front."""

from __future__ import annotations

import pytest
import torch

from models.checkpoint import load_checkpoint, read_manifest
from models.config import run_config_from_dict
from models.errors import ModelConfigError, NonFiniteLossError
from models.train import split_evaluator, train
from tests.models.test_models_train import SMALL

TRAIN = {"batch_size": 256, "epochs": 3, "evals_per_epoch": 2, "dense_lr": 0.01, "sparse_lr": 0.1}


def run_config(name="dcn", tables=None, **train_options):
    return run_config_from_dict(
        {
            "model": {"name": name, **SMALL[name]},
            "tables": tables or {},
            "train": {**TRAIN, **train_options},
        }
    )


def test_train_keeps_the_best_validation_state_and_writes_it(tiny_dataset, tmp_path):
    path = tmp_path / "dcn.safetensors"
    result = train(run_config(patience=2), tiny_dataset, path, progress=False)
    history = result.fit.history
    assert len(history) >= 2 and history[0]["step"] == 5
    best = max(history, key=lambda record: record["auc"])
    assert result.valid["step"] == best["step"]
    again = split_evaluator(result.model, tiny_dataset, "valid", run_config().train)(result.model)
    assert again["auc"] == pytest.approx(best["auc"], abs=1e-12)
    assert result.test["auc"] > 0.6 and result.test["logloss"] < 0.69
    manifest = read_manifest(path)
    assert manifest["metrics"]["test"] == result.test
    assert manifest["run"]["model"]["name"] == "dcn" and manifest["dataset"] == "movielens-1m"
    assert load_checkpoint(path).metrics["valid"]["step"] == best["step"]


def test_same_seed_same_run(tiny_dataset):
    first = train(run_config(epochs=1, seed=5), tiny_dataset, progress=False)
    second = train(run_config(epochs=1, seed=5), tiny_dataset, progress=False)
    assert first.test == second.test


def test_retriever_reports_recall_and_ndcg(tiny_dataset):
    result = train(run_config("two_tower", epochs=2), tiny_dataset, progress=False)
    assert {"recall@10", "ndcg@10", "recall@50", "ndcg@50", "auc"} <= set(result.test)
    assert result.valid["recall@50"] >= result.valid["recall@10"] > 0


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(
    tiny_dataset, tmp_path, monkeypatch
):
    from models.dcn import DCN

    path = tmp_path / "dcn.safetensors"
    real_loss = DCN.training_loss
    calls = {"n": 0}

    def loss_going_nan(self, batch):
        calls["n"] += 1
        loss = real_loss(self, batch)
        return loss * torch.nan if calls["n"] == 8 else loss

    monkeypatch.setattr(DCN, "training_loss", loss_going_nan)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 8") as caught:
        train(run_config(), tiny_dataset, path, progress=False)
    assert caught.value.step == 8
    saved = load_checkpoint(path)
    assert saved.metrics["valid"]["auc"] > 0.5 and saved.manifest["history"][-1]["step"] == 5


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model": {"name": "gpt"}}, "unknown model 'gpt'; accepted: dare, dcn, deepfm, din"),
        (
            {"tables": {"method": "pq"}},
            "unknown table method 'pq'; accepted: collisionless, full, graphhash",
        ),
        ({"features": ["user_id", "mood"]}, r"unknown feature\(s\) \['mood'\].*accepted: user_id"),
        (
            {"model": {"name": "dlrm"}, "tables": {"overrides": {"user_id": {"dim": 8}}}},
            "needs every feature's embedding width equal",
        ),
        ({"model": {"name": "din", "sequence_feature": "age"}}, "not a sequence feature"),
        ({"model": {"name": "dcn", "depth": 3}}, "unknown option.*'depth'.*accepted: cross_layers"),
        ({"train": {"epochs": 0}}, "train.epochs must be >= 1"),
    ],
)
def test_bad_configs_fail_before_training_and_say_what_is_accepted(
    tiny_dataset, tmp_path, raw, message
):
    path = tmp_path / "never.safetensors"
    with pytest.raises(ModelConfigError, match=message):
        train(run_config_from_dict(raw), tiny_dataset, path, progress=False)
    assert not path.exists()


def test_collisionless_tables_expire_by_event_time_offline(tiny_dataset):
    """Offline training runs collisionless tables on the data's clock (one second per row
    here), as the online trainer does: a 20-second ttl expires users between their visits
    (about 60 rows apart), though the whole run takes a few wall-clock seconds (by the wall
    clock nothing would expire)."""
    tables = {"overrides": {"user_id": {"method": "collisionless", "ttl_seconds": 20.0}}}
    result = train(run_config(tables=tables, epochs=1, shuffle=False), tiny_dataset, progress=False)
    stats = result.model.embeddings.self_managed["user_id"].stats()
    assert stats["expired"] > 100, stats
