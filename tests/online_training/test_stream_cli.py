"""`embtab stream train` and `embtab stream run` against the session's broker and Redis."""

from __future__ import annotations

import json
import uuid

from embtab.cli import main
from models.checkpoint import read_manifest, save_checkpoint
from serving.reader import ParamReader
from tests.online_training.conftest import PARTITIONS
from tests.online_training.example_stream import (
    example_rows,
    publisher_for,
    send_examples,
    small_model,
    unique_model_name,
)


def _services(kafka_service, redis_service, prefix: str) -> list[str]:
    return [
        "--kafka",
        kafka_service.kafka_bootstrap,
        "--redis",
        redis_service.redis_url,
        "--topic-prefix",
        prefix,
        "--group",
        f"trainer-{uuid.uuid4().hex[:8]}",
    ]


def test_stream_train_publishes_a_checkpoint_then_deltas_and_keeps_its_state(
    capsys, kafka, topics, kafka_service, redis_service, movielens, tmp_path
):
    checkpoint = save_checkpoint(tmp_path / "offline.safetensors", small_model(movielens))
    send_examples(kafka, topics.examples, example_rows(movielens, 800), PARTITIONS)
    name, state = unique_model_name(), tmp_path / "state.safetensors"
    arguments = ["stream", "train", "--checkpoint", str(checkpoint), "--name", name]
    arguments += ["--state", str(state), "--sync-interval", "1", "--json"]
    assert main([*arguments, *_services(kafka_service, redis_service, topics.prefix)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 800 and result["redis_model"] == name
    assert result["full_publishes"] == 1 and result["deltas"] >= 1
    assert result["examples_topic"] == topics.examples
    online = read_manifest(state)["online"]
    assert (online["version"], online["delta"]) == (result["version"], result["delta"])
    reader = ParamReader(publisher_for(redis_service.redis_url, name).nodes, name)
    assert reader.live_version() == result["version"]
    assert reader.head(result["version"]).delta == result["delta"]


def test_stream_run_replays_joins_and_trains_with_live_counters(
    capsys, kafka_service, redis_service, movielens, tmp_path
):
    checkpoint = save_checkpoint(tmp_path / "offline.safetensors", small_model(movielens))
    prefix = f"test-{uuid.uuid4().hex[:10]}."
    arguments = ["stream", "run", "--limit", "400", "--label-delay", "20"]
    arguments += ["--checkpoint", str(checkpoint), "--name", unique_model_name()]
    arguments += ["--sync-interval", "1", "--no-online-features"]
    arguments += ["--join-group", f"joiner-{uuid.uuid4().hex[:8]}"]
    assert main([*arguments, *_services(kafka_service, redis_service, prefix)]) == 0
    captured = capsys.readouterr()
    summary = captured.out.strip()
    assert summary.startswith("replayed 400 events of movielens-1m/test, joined 400 examples; ")
    assert "trained 400 examples from " in summary and "last window AUC" in summary
    assert "produced" in captured.err and "| lag " in captured.err and "window AUC" in captured.err
