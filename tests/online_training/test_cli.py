"""`embtab stream produce` and `embtab stream join` against the session's services."""

from __future__ import annotations

import json
import uuid

from embtab.cli import main
from feature_store.online import OnlineFeatureStore


def test_produce_then_join_print_their_counts(capsys, kafka_service, redis_service, movielens):
    prefix = f"test-{uuid.uuid4().hex[:10]}."
    namespace = f"test-{uuid.uuid4().hex[:10]}"
    common = ["--kafka", kafka_service.kafka_bootstrap, "--topic-prefix", prefix]
    produce = ["stream", "produce", "--limit", "400", "--label-delay", "20", *common]
    produce += ["--redis", redis_service.redis_url, "--redis-namespace", namespace]
    try:
        assert main(produce) == 0
        line = capsys.readouterr().out.strip()
        assert line.startswith("produced 400 impressions and ") and "movielens-1m/test" in line

        assert main(["stream", "join", "--window", "60", "--json", *common]) == 0
        joined = json.loads(capsys.readouterr().out)
        assert joined["examples"] == 400
        assert joined["late_clicks"] == 0 and joined["dlq_messages"] == 0
        assert joined["examples_topic"] == f"{prefix}examples"
        labels = movielens.read("test", ["label"]).column("label").to_numpy()[:400]
        assert joined["positives"] == int(labels.sum())
    finally:
        OnlineFeatureStore.from_url(
            redis_service.redis_url, movielens.schema, namespace=namespace
        ).clear()


def test_produce_json_reports_the_topics_and_online_features(
    capsys, kafka_service, redis_service, movielens
):
    prefix = f"test-{uuid.uuid4().hex[:10]}."
    namespace = f"test-{uuid.uuid4().hex[:10]}"
    arguments = ["stream", "produce", "--limit", "100", "--json"]
    arguments += ["--kafka", kafka_service.kafka_bootstrap, "--topic-prefix", prefix]
    arguments += ["--redis", redis_service.redis_url, "--redis-namespace", namespace]
    try:
        assert main(arguments) == 0
        result = json.loads(capsys.readouterr().out)
    finally:
        deleted = OnlineFeatureStore.from_url(
            redis_service.redis_url, movielens.schema, namespace=namespace
        ).clear()
    assert result["impressions"] == 100 and result["online_features"] is True
    assert result["topics"] == {
        "feature_log": f"{prefix}feature-log",
        "actions": f"{prefix}actions",
    }
    assert deleted > 0


def test_a_bad_setting_is_a_one_line_error(capsys, kafka_service):
    arguments = ["stream", "produce", "--speedup", "-2", "--kafka", kafka_service.kafka_bootstrap]
    assert main([*arguments, "--no-online-features"]) == 2
    assert "speedup must be >= 0" in capsys.readouterr().err


def test_produce_and_join_per_event_json(capsys, kafka_service, movielens):
    prefix = f"test-{uuid.uuid4().hex[:10]}."
    common = ["--kafka", kafka_service.kafka_bootstrap, "--topic-prefix", prefix, "--json"]
    produce = ["stream", "produce", "--format", "json", "--limit", "300", "--label-delay", "1"]
    assert main([*produce, "--no-online-features", *common]) == 0
    produced = json.loads(capsys.readouterr().out)
    labels = movielens.read("test", ["label"]).column("label").to_numpy()[:300]
    assert produced["messages"] == 300 + int(labels.sum()) and produced["heartbeats"] == 0

    join = ["stream", "join", "--dataset", "movielens-1m", "--format", "json", "--window", "3"]
    join += ["--lateness", "1", "--idle-after", "1", "--idle-timeout", "6"]
    join += ["--group", f"joiner-{uuid.uuid4().hex[:8]}"]
    assert main([*join, *common]) == 0
    joined = json.loads(capsys.readouterr().out)
    assert joined["examples"] == 300 and joined["dlq_messages"] == 0
    assert joined["positives"] == int(labels.sum())
