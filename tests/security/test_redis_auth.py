"""Redis AUTH, against a real redis-server started with `requirepass` and an ACL user: every
place that takes a Redis URL (publisher, serving, delta sync, online features, CLI `--redis` and
EMBTAB_REDIS) works with credentials in the URL, refuses with a typed error that names no
secret when they are wrong, and never prints, logs or serves the password."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from redis.exceptions import NoPermissionError

from embtab.cli import main
from embtab.services import ACL_RULES, free_port, start_redis
from feature_store.online import OnlineFeatureError, OnlineFeatureStore
from models.checkpoint import save_checkpoint
from online_training.learner import OnlineLearner
from online_training.sync import ParamSync, SyncConfig
from serving.errors import RedisAuthError
from serving.reader import ParamReader
from serving.redis_nodes import RedisConfig, RedisNodes
from tests.online_training.conftest import PARTITIONS
from tests.online_training.example_stream import (
    example_rows,
    publisher_for,
    send_examples,
    small_model,
)
from tests.serving.serving_helpers import (
    SCHEMA,
    publish,
    request_body,
    tiny_model,
    unique_name,
)
from tests.serving.test_app import running_service

DEFAULT_PASSWORD = "default-Pw-7f3a9c"
ACL_PASSWORD = "acl-Pw-0c41d2e8"
SECRETS = (DEFAULT_PASSWORD, ACL_PASSWORD)


@pytest.fixture(scope="module")
def secured() -> Iterator[dict[str, str]]:
    """A redis-server with a default-user password and an ACL user; its URLs by kind."""
    server = start_redis(
        password=DEFAULT_PASSWORD,
        acl_users={"embtab": ACL_PASSWORD},
        # A user allowed everything but embtab's keys: its commands are refused by the ACL.
        extra_args=["--user", "outsider", "on", ">outsider-pw", "~other:*", "+@all"],
    )
    base = f"127.0.0.1:{server.port}/0"
    try:
        yield {
            "acl": f"redis://embtab:{ACL_PASSWORD}@{base}",
            "password": f"redis://:{DEFAULT_PASSWORD}@{base}",
            "anonymous": f"redis://{base}",
            "wrong": f"redis://embtab:not-{ACL_PASSWORD}@{base}",
            "outsider": f"redis://outsider:outsider-pw@{base}",
            "command_line": " ".join(map(str, server.process.args)),
        }
    finally:
        server.stop()


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"a password leaked into: {text[:300]}"


@contextlib.contextmanager
def captured_logs() -> Iterator[list[str]]:
    """Every log record of every logger, formatted with its arguments, while the block runs."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Keep(logging.DEBUG)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_the_acl_user_may_use_embtab_keys_only(secured):
    assert ACL_RULES[1] == "~embtab:*" and "-@dangerous" in ACL_RULES
    assert_no_secret(secured["command_line"])  # what `ps` shows any local user
    nodes = RedisNodes(RedisConfig.parse(secured["acl"], socket_timeout_s=2.0, retries=0))
    try:
        with pytest.raises(NoPermissionError):
            nodes.meta.set("not-embtab", b"1")
        with pytest.raises(NoPermissionError):
            nodes.meta.flushall()
    finally:
        nodes.close()


@pytest.mark.parametrize("kind", ["acl", "password"])
def test_publish_and_serve_with_credentials_and_nothing_shows_them(secured, kind):
    url = secured[kind]
    model = tiny_model("hash")
    name = unique_name("auth")
    with captured_logs() as logs:
        assert publish(model, name, url).version == 1
        with running_service(url, name) as client:
            ready = time.monotonic() + 10
            while client.get("/readyz").status_code != 200 and time.monotonic() < ready:
                time.sleep(0.05)
            scored = client.post("/score", json=request_body(3, np.arange(0, 400, 40)))
            assert scored.status_code == 200, scored.text
            health = client.get("/healthz")
            assert health.json()["status"] == "ok"
            bodies = [client.get(path).text for path in ("/healthz", "/version", "/metrics")]
    assert_no_secret(*logs, *bodies, scored.text)
    assert any("serving model=" in line and "***" in line for line in logs), logs


@pytest.mark.parametrize("kind", ["anonymous", "wrong"])
def test_missing_or_wrong_credentials_are_a_typed_error_naming_no_secret(secured, kind):
    with pytest.raises(RedisAuthError, match="refused the credentials") as refused:
        publish(tiny_model("hash"), unique_name("auth"), secured[kind])
    assert_no_secret(str(refused.value))


def test_an_acl_user_without_rights_to_the_keys_is_refused_not_retried(secured):
    started = time.monotonic()
    with pytest.raises(RedisAuthError, match="ACL user lacks a permission") as refused:
        publish(tiny_model("hash"), unique_name("auth"), secured["outsider"])
    assert "outsider-pw" not in str(refused.value)
    assert time.monotonic() - started < 5


def test_a_service_with_wrong_credentials_answers_503_and_shows_no_secret(secured):
    name = unique_name("auth")
    publish(tiny_model("hash"), name, secured["acl"])
    with captured_logs() as logs, running_service(secured["wrong"], name) as client:
        scored = client.post("/score", json=request_body(3, np.arange(5)))
        health = client.get("/healthz")
        ready = client.get("/readyz")
    assert scored.status_code == 503 and ready.status_code == 503
    assert "no version" in scored.json()["error"]
    assert_no_secret(*logs, scored.text, health.text, ready.text)
    assert any("refused the credentials" in line for line in logs), logs


def test_delta_sync_with_credentials_and_a_refused_password_is_not_retried(secured, movielens):
    model = small_model(movielens)
    sync = ParamSync(publisher_for(secured["acl"], unique_name("sync")), model, SyncConfig())
    with captured_logs() as logs:
        assert sync.attach().kind == "full"
        OnlineLearner(model).apply(example_rows(movielens, 200))
        record = sync.sync()
        assert record.kind == "delta" and record.attempts == 1
    reader = ParamReader(sync.publisher.nodes, sync.publisher.model)
    assert reader.head(reader.live_version()).delta == 1
    refused = ParamSync(publisher_for(secured["wrong"], unique_name("sync")), model)
    started = time.monotonic()
    with pytest.raises(RedisAuthError) as error:
        refused.attach()
    assert time.monotonic() - started < 5 and refused.failures == 0
    assert_no_secret(*logs, str(error.value))


def test_online_features_with_credentials_and_refused_without(secured):
    store = OnlineFeatureStore.from_url(secured["acl"], SCHEMA, namespace=f"embtab:{unique_name()}")
    store.write_users([1, 2], {"age": [3, 4], "gender": [1, 2]})
    assert store.get_users([1, 2]).column("age").to_pylist() == [3, 4]
    anonymous = OnlineFeatureStore.from_url(secured["anonymous"], SCHEMA)
    with pytest.raises(OnlineFeatureError, match="refused the credentials") as refused:
        anonymous.get_users([1])
    assert_no_secret(str(refused.value))


def test_cli_publish_and_serve_take_credentials_from_flag_and_env(secured, tmp_path, capsys):
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model("hash"))
    name = unique_name("cli")
    assert main(["publish", str(checkpoint), "--model", name, "--redis", secured["acl"]]) == 0
    json_args = ["publish", str(checkpoint), "--model", name, "--json", "--redis", secured["acl"]]
    assert main(json_args) == 0
    printed = capsys.readouterr()
    assert f"published {name} v1" in printed.out and json.loads(printed.out.split("\n", 1)[1])
    assert main(["publish", str(checkpoint), "--redis", secured["wrong"]]) != 0
    refused = capsys.readouterr()
    assert "refused the credentials" in refused.err
    assert_no_secret(printed.out, printed.err, refused.out, refused.err)

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "embtab.cli", "serve", "--model", name, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "EMBTAB_REDIS": secured["acl"], "PYTHONUNBUFFERED": "1"},
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            deadline = time.monotonic() + 60
            status = None
            while status != 200 and time.monotonic() < deadline:
                with contextlib.suppress(httpx.TransportError):
                    status = client.get("/readyz").status_code
                time.sleep(0.1)
            assert status == 200, "the service never became ready"
            scored = client.post("/score", json=request_body(2, np.arange(0, 400, 50)))
            assert scored.status_code == 200, scored.text
            health = client.get("/healthz").text
    finally:
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=15)
    assert f"serving {name}" in output and "***" in output
    assert_no_secret(output, health)


def test_services_up_shows_the_redis_url_without_its_password(secured, monkeypatch, capsys):
    monkeypatch.setenv("EMBTAB_REDIS", secured["acl"])
    monkeypatch.setenv("EMBTAB_KAFKA", "127.0.0.1:9")  # given, so nothing is started
    assert main(["services", "up", "--seconds", "0", "--json"]) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out)["redis"] == secured["acl"].replace(ACL_PASSWORD, "***")
    assert_no_secret(printed.out, printed.err)


def test_cli_stream_train_syncs_with_an_acl_user_and_prints_no_secret(
    secured, kafka, topics, kafka_service, movielens, tmp_path, capsys
):
    checkpoint = save_checkpoint(tmp_path / "offline.safetensors", small_model(movielens))
    send_examples(kafka, topics.examples, example_rows(movielens, 300), PARTITIONS)
    name = unique_name("stream")
    arguments = ["stream", "train", "--checkpoint", str(checkpoint), "--name", name, "--json"]
    arguments += ["--kafka", kafka_service.kafka_bootstrap, "--redis", secured["acl"]]
    arguments += ["--topic-prefix", topics.prefix, "--group", unique_name("group")]
    with captured_logs() as logs:
        assert main(arguments) == 0
    printed = capsys.readouterr()
    result = json.loads(printed.out)
    assert result["examples"] == 300 and result["redis"] == secured["acl"].replace(
        ACL_PASSWORD, "***"
    )
    nodes = RedisNodes(RedisConfig.parse(secured["acl"]))
    try:
        assert ParamReader(nodes, name).live_version() == result["version"]
    finally:
        nodes.close()
    assert_no_secret(printed.out, printed.err, *logs)
