"""Session-wide real services: the embedded Redis and Kafka (or EMBTAB_REDIS / EMBTAB_KAFKA)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from embtab.services import Services, start_kafka, start_redis


@pytest.fixture(scope="session")
def redis_service() -> Iterator[Services]:
    """A Redis for the session; `services.redis` is None when it is not ours (never flush it)."""
    external = os.environ.get("EMBTAB_REDIS")
    if external:
        yield Services(redis_url=external, kafka_bootstrap="")
        return
    server = start_redis()
    try:
        yield Services(
            redis_url=f"redis://127.0.0.1:{server.port}/0", kafka_bootstrap="", redis=server
        )
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kafka_service() -> Iterator[Services]:
    """A Kafka-protocol broker for the session (embedded Tansu unless EMBTAB_KAFKA is set)."""
    external = os.environ.get("EMBTAB_KAFKA")
    if external:
        yield Services(redis_url="", kafka_bootstrap=external)
        return
    broker = start_kafka()
    try:
        yield Services(redis_url="", kafka_bootstrap=f"127.0.0.1:{broker.port}", kafka=broker)
    finally:
        broker.stop()
