"""The one way embtab opens a Redis connection: explicit timeouts and a short, bounded retry.

redis-py's default retry turns one socket timeout into tens of seconds of waiting; the online
store, serving's parameter shards and the health checks of embedded servers must fail fast and
degrade instead, so every client is made here with the same policy.
"""

from __future__ import annotations

from urllib.parse import quote

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry


def fail_fast_retry(retries: int) -> Retry:
    """At most `retries` retries after the first attempt, 10 ms apart and never over 100 ms."""
    return Retry(ExponentialBackoff(cap=0.1, base=0.01), retries)


def redis_client(
    url: str,
    *,
    timeout_s: float = 1.0,
    connect_timeout_s: float | None = None,
    retries: int = 1,
    max_connections: int | None = None,
    cluster: bool = False,
) -> redis.Redis | RedisCluster:
    """A client of the Redis at `url` (or of the Redis Cluster that node belongs to)."""
    options = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s if connect_timeout_s is None else connect_timeout_s,
        "retry": fail_fast_retry(retries),
    }
    if max_connections is not None:
        options["max_connections"] = max_connections
    if cluster:
        return RedisCluster.from_url(url, require_full_coverage=True, **options)
    return redis.Redis.from_url(url, **options)


def loopback_url(port: int, password: str | None = None) -> str:
    """The URL of a Redis on this machine's loopback interface."""
    credentials = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{credentials}127.0.0.1:{port}/0"
