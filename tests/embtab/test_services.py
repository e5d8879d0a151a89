"""The embedded service launchers: start, answer, stop, port collisions, env overrides."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer

from embtab import services as services_module
from embtab.services import KAFKA_CONSUMER_DEFAULTS, embedded_services, start_redis


def test_redis_starts_answers_and_stops():
    server = start_redis()
    client = redis.Redis(host="127.0.0.1", port=server.port)
    assert client.ping()
    client.set("embtab:test", b"value")
    assert client.get("embtab:test") == b"value"
    client.close()
    server.stop()
    assert not server.alive()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=1).ping()


def test_redis_with_password_refuses_anonymous_clients():
    server = start_redis(password="s3cret")
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port).ping()
        assert redis.Redis(host="127.0.0.1", port=server.port, password="s3cret").ping()
    finally:
        server.stop()


def test_taken_port_moves_to_another_free_port(monkeypatch):
    """If the chosen port is taken before the server binds it, the launcher tries another."""
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    taken = blocker.getsockname()[1]
    real_free_port = services_module.free_port
    offered = iter([taken])
    monkeypatch.setattr(
        services_module, "free_port", lambda: next(offered, None) or real_free_port()
    )
    started = time.monotonic()
    server = start_redis()
    try:
        assert server.port != taken
        assert redis.Redis(host="127.0.0.1", port=server.port).ping()
        assert time.monotonic() - started < services_module.READY_TIMEOUT_S
    finally:
        server.stop()
        blocker.close()


def test_kafka_broker_round_trips_and_a_group_joins_quickly(kafka_service):
    topic = f"embtab-test-{uuid.uuid4().hex[:8]}"
    producer = KafkaProducer(bootstrap_servers=kafka_service.kafka_bootstrap)
    producer.send(topic, b"hello")
    producer.flush()
    producer.close()
    started = time.monotonic()
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_service.kafka_bootstrap,
        group_id=f"group-{topic}",
        auto_offset_reset="earliest",
        **KAFKA_CONSUMER_DEFAULTS,
    )
    received = []
    try:
        while not received and time.monotonic() - started < 20:
            for records in consumer.poll(timeout_ms=500).values():
                received.extend(record.value for record in records)
    finally:
        consumer.close()
    assert received == [b"hello"]
    assert time.monotonic() - started < 10, "the consumer group should join in about 3 s"


def test_embedded_services_start_both_and_stop_them():
    with embedded_services() as services:
        assert services.redis is not None and services.kafka is not None
        assert redis.Redis.from_url(services.redis_url).ping()
        redis_process, kafka_process = services.redis, services.kafka
    assert not redis_process.alive()
    assert not kafka_process.alive()


def test_environment_urls_are_used_and_nothing_is_started(monkeypatch, redis_service):
    monkeypatch.setenv("EMBTAB_REDIS", redis_service.redis_url)
    monkeypatch.setenv("EMBTAB_KAFKA", "127.0.0.1:9")

    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be started when EMBTAB_REDIS/EMBTAB_KAFKA are set")

    monkeypatch.setattr(services_module, "start_redis", refuse)
    monkeypatch.setattr(services_module, "start_kafka", refuse)
    with embedded_services() as services:
        assert services.redis_url == redis_service.redis_url
        assert services.kafka_bootstrap == "127.0.0.1:9"
        assert services.redis is None and services.kafka is None


def _ignore_sigint() -> None:
    """What a shell does for a background job (`embtab services up &`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_services_up_stops_itself_and_its_servers_on_a_signal(signum, background):
    environment = {k: v for k, v in os.environ.items() if k not in ("EMBTAB_REDIS", "EMBTAB_KAFKA")}
    process = subprocess.Popen(
        [sys.executable, "-m", "embtab.cli", "services", "up", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        preexec_fn=_ignore_sigint if background else None,
    )
    try:
        lines = []
        while not lines or lines[-1] != "}\n":
            line = process.stdout.readline()
            assert line, f"services up ended early: {process.communicate(timeout=10)}"
            lines.append(line)
        urls = json.loads("".join(lines))
        ports = [int(urls["redis"].rsplit(":", 1)[1].split("/")[0])]
        ports.append(int(urls["kafka"].rsplit(":", 1)[1]))
        assert all(services_module._port_answers(port) for port in ports)
        process.send_signal(signum)
        assert process.wait(timeout=20) == 0, process.stderr.read()
        assert not any(services_module._port_answers(port) for port in ports), (
            "a server outlived services up"
        )
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_redis_appends_every_write_and_keeps_its_data_across_a_kill(tmp_path):
    """AOF with fsync every second by default; with a data dir of its own, what a killed
    redis-server had acknowledged is there when one is started again on that dir."""
    data = tmp_path / "redis-data"
    server = start_redis(data_dir=data)
    try:
        client = redis.Redis(host="127.0.0.1", port=server.port)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        client.set("embtab:{m}:version", 3)
        client.close()
        server.process.kill()
        server.process.wait(timeout=10)
    finally:
        server.stop()
    assert data.is_dir(), "the data dir is the caller's: stop() leaves it"
    again = start_redis(data_dir=data)
    try:
        client = redis.Redis(host="127.0.0.1", port=again.port)
        assert client.get("embtab:{m}:version") == b"3"
        client.close()
    finally:
        again.stop()


def _services_up(*flags: str) -> tuple[subprocess.Popen, dict]:
    environment = {k: v for k, v in os.environ.items() if k not in ("EMBTAB_REDIS", "EMBTAB_KAFKA")}
    process = subprocess.Popen(
        [sys.executable, "-m", "embtab.cli", "services", "up", "--json", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    lines: list[str] = []
    while not lines or lines[-1] != "}\n":
        line = process.stdout.readline()
        assert line, f"services up ended early: {process.communicate(timeout=10)}"
        lines.append(line)
    return process, json.loads("".join(lines))


def test_services_up_with_a_redis_dir_has_its_data_back_after_a_restart(tmp_path):
    data = tmp_path / "redis-data"
    for attempt in ("write", "read"):
        process, urls = _services_up("--redis-dir", str(data))
        try:
            assert urls["redis_dir"] == str(data)
            client = redis.Redis.from_url(urls["redis"])
            if attempt == "write":
                client.set("embtab:{m}:next", 7)
            else:
                assert client.get("embtab:{m}:next") == b"7"
            client.close()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == 0, process.stderr.read()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert data.is_dir()


def test_services_up_says_where_redis_keeps_its_data_and_refuses_a_dir_it_cannot_use(
    monkeypatch, redis_service
):
    usage = subprocess.run(
        [sys.executable, "-m", "embtab.cli", "services", "up", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "temporary directory removed at stop" in " ".join(usage.split())
    monkeypatch.setenv("EMBTAB_REDIS", redis_service.redis_url)
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "embtab.cli",
            "services",
            "up",
            "--redis-dir",
            "x",
            "--seconds",
            "0",
        ],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "EMBTAB_REDIS" in refused.stderr
