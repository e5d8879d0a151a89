"""Kafka SASL/SSL settings, at the client-config level: from the environment and the `embtab
stream` flags into KafkaSettings, and from there into every kafka-python client embtab builds.

Not against a broker: the embedded Tansu 0.6 has `--authentication` (SCRAM users), but a user
can only be created over an already authenticated connection and its in-memory storage is gone
on restart, so no SASL broker can be set up here; nor does it serve TLS without a certificate.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from embtab.cli import build_parser
from embtab.commands.stream import KAFKA_SECURITY_FLAGS, kafka_settings
from online_training import kafka as kafka_module
from online_training.kafka import KafkaSettings, make_admin, make_consumer, make_producer

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "sasl-Pw-93ab"
SECURE = {
    "EMBTAB_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "EMBTAB_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
    "EMBTAB_KAFKA_SASL_USERNAME": "from-env",
    "EMBTAB_KAFKA_SASL_PASSWORD": PASSWORD,
    "EMBTAB_KAFKA_SSL_CAFILE": "/etc/embtab/kafka-ca.pem",
}


def test_stream_flags_override_the_environment_and_passwords_come_from_it_only(monkeypatch):
    for name, value in SECURE.items():
        monkeypatch.setenv(name, value)
    arguments = build_parser().parse_args(
        ["stream", "train", "--kafka-sasl-mechanism", "SCRAM-SHA-512"]
        + ["--kafka-sasl-username", "from-flag", "--kafka-ssl-certfile", "/etc/embtab/me.pem"]
    )
    settings = kafka_settings(arguments, "broker:9093")
    assert settings.client_options() == {
        "bootstrap_servers": "broker:9093",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "from-flag",
        "sasl_plain_password": PASSWORD,
        "ssl_cafile": "/etc/embtab/kafka-ca.pem",
        "ssl_certfile": "/etc/embtab/me.pem",
        "client_id": "embtab",
        "bootstrap_timeout_ms": 30_000,
    }
    for command in ("produce", "join", "train", "run"):
        parsed = vars(build_parser().parse_args(["stream", command]))
        assert {f"kafka_{name}" for name in KAFKA_SECURITY_FLAGS} <= parsed.keys(), command
    assert not any("password" in flag for flag in KAFKA_SECURITY_FLAGS.values())


def test_a_bad_flag_is_refused_with_what_is_accepted(monkeypatch):
    monkeypatch.delenv("EMBTAB_KAFKA_SECURITY_PROTOCOL", raising=False)
    arguments = build_parser().parse_args(["stream", "join", "--kafka-security-protocol", "TLS"])
    with pytest.raises(kafka_module.KafkaConfigError, match="accepted: PLAINTEXT, SSL"):
        kafka_settings(arguments, "broker:9093")


def test_every_client_gets_the_security_settings_and_no_repr_shows_the_password(monkeypatch):
    settings = KafkaSettings.from_env("127.0.0.1:9", environ=SECURE)
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings)
    wanted = settings.client_options()
    # api_version given: the clients are built without contacting the (absent) broker.
    producer = make_producer(settings, api_version=(2, 5))
    consumer = make_consumer(settings, "group", api_version=(2, 5))
    try:
        for client in (producer, consumer):
            assert {name: client.config[name] for name in wanted} == wanted
    finally:
        producer.close(timeout=1)
        consumer.close(autocommit=False)
    admins: list[dict] = []
    monkeypatch.setattr(kafka_module, "KafkaAdminClient", lambda **options: admins.append(options))
    make_admin(settings)
    assert admins == [wanted]


def _kafka_clients_built(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {"KafkaProducer", "KafkaConsumer", "KafkaAdminClient"}
    return [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in names
    ]


def test_kafka_clients_are_built_only_where_the_settings_are_applied():
    """Every producer, consumer and admin client goes through online_training.kafka (the
    embedded broker's readiness probe, on loopback without security, is the one exception)."""
    built = [
        site
        for folder in ("embtab", "online_training", "serving", "feature_store", "models")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for site in _kafka_clients_built(path)
    ]
    allowed = ("online_training/kafka.py", "embtab/services.py")
    assert [site for site in built if not site.startswith(allowed)] == []
    assert any(site.startswith("online_training/kafka.py") for site in built)
