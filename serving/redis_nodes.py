"""Connections to the Redis nodes that hold parameter shards: one or more URLs, or a Cluster.

With several URLs, shard `s` lives on node `s % len(urls)` (client-side sharding; every process
must list the same URLs in the same order) and the model's metadata on the first. With a
Redis Cluster, keys carry hash tags (see `serving.keys`) and the cluster client routes them.

Every client comes from `feature_store.redis_client`: explicit socket and connect timeouts and
a bounded retry, so that serving degrades fast instead of waiting on redis-py's default retry.
URLs may carry credentials (`redis://user:password@host:port/db`, `rediss://` for TLS); they are
passed to redis-py as they are and only ever shown through `redact_url`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from feature_store.redis_client import redis_client
from serving.errors import StoreError

URL_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class RedisConfig:
    """Where the shards are and how long to wait for them.

    `urls`: one URL per node (client-side sharding) or, with `cluster`, any one node of a Redis
    Cluster. `retries` is how many times a failed command is retried (after the first attempt).
    """

    urls: tuple[str, ...]
    cluster: bool = False
    socket_timeout_s: float = 1.0
    connect_timeout_s: float = 1.0
    retries: int = 1
    max_connections: int = 64

    def __post_init__(self) -> None:
        if not self.urls:
            raise StoreError("RedisConfig needs at least one URL, e.g. redis://127.0.0.1:6379/0")
        for url in self.urls:
            scheme = urlsplit(url).scheme
            if scheme not in URL_SCHEMES:
                raise StoreError(
                    f"Redis URL {redact_url(url)!r} has scheme {scheme!r}; accepted: "
                    f"{', '.join(f'{s}://' for s in URL_SCHEMES)}"
                )
        if self.cluster and len(self.urls) != 1:
            raise StoreError(
                f"a Redis Cluster is given by one node's URL, got {len(self.urls)} URLs"
            )
        if self.socket_timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise StoreError("Redis socket and connect timeouts must be > 0 seconds")
        if self.retries < 0:
            raise StoreError(f"Redis retries must be >= 0, got {self.retries}")

    @classmethod
    def parse(cls, urls: str | Sequence[str], **options: Any) -> RedisConfig:
        """From a comma-separated string of URLs (as `--redis` takes) or a list of them."""
        if isinstance(urls, str):
            urls = [url.strip() for url in urls.split(",") if url.strip()]
        return cls(urls=tuple(urls), **options)

    def redacted(self) -> list[str]:
        return [redact_url(url) for url in self.urls]

    def __repr__(self) -> str:
        """Like the dataclass repr, with passwords in the URLs replaced by `***`."""
        values = {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}
        values["urls"] = tuple(self.redacted())
        return f"RedisConfig({', '.join(f'{name}={value!r}' for name, value in values.items())})"


def redact_url(url: str) -> str:
    """The URL with its password replaced by `***`, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class RedisNodes:
    """The clients of every node, and how to run one pipeline per node in one round trip each."""

    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        self.clients: list[Any] = [
            redis_client(
                url,
                timeout_s=config.socket_timeout_s,
                connect_timeout_s=config.connect_timeout_s,
                retries=config.retries,
                max_connections=config.max_connections,
                cluster=config.cluster,
            )
            for url in config.urls
        ]
        self._pool: ThreadPoolExecutor | None = None

    @property
    def meta(self) -> Any:
        """The client that holds a model's metadata (version pointer, manifests, dense blobs)."""
        return self.clients[0]

    @property
    def num_nodes(self) -> int:
        return len(self.clients)

    def node_of_shard(self, shard: int) -> int:
        return 0 if self.config.cluster else shard % len(self.clients)

    def pipeline(self, node: int, transaction: bool = False) -> Any:
        return self.clients[node].pipeline(transaction=transaction)

    def execute(self, pipelines: dict[int, Any]) -> dict[int, list]:
        """Execute one pipeline per node, concurrently when there are several nodes."""
        if len(pipelines) <= 1:
            return {node: pipe.execute() for node, pipe in pipelines.items()}
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=len(self.clients), thread_name_prefix="embtab-redis"
            )
        futures = {node: self._pool.submit(pipe.execute) for node, pipe in pipelines.items()}
        return {node: future.result() for node, future in futures.items()}

    def for_each_node(self, action: Callable[[Any], Any]) -> list[Any]:
        return [action(client) for client in self.clients]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        for client in self.clients:
            client.close()
