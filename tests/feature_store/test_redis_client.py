"""The one Redis client factory: a password with URL metacharacters reaches the server intact,
and a dead server fails within the timeout and the bounded retry, not redis-py's default."""

from __future__ import annotations

import time

import pytest
import redis

from embtab.services import free_port, start_redis
from feature_store.redis_client import loopback_url, redis_client


def test_a_password_with_url_metacharacters_authenticates():
    password = "p@ss:w/rd?#%"
    server = start_redis(password=password)
    try:
        assert redis_client(loopback_url(server.port, password)).ping()
        with pytest.raises(redis.AuthenticationError):
            redis_client(loopback_url(server.port, "wrong")).ping()
    finally:
        server.stop()


def test_a_server_that_is_not_there_fails_within_timeout_and_retries():
    client = redis_client(loopback_url(free_port()), timeout_s=0.2, retries=2)
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    assert time.monotonic() - started < 2.0
