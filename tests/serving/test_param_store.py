"""Publishing to and reading from real Redis: every table method and encoding, versions, deltas,
garbage collection, a publisher killed mid-write, several nodes, a Redis Cluster, credentials."""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import redis
import torch

from embtab.services import start_redis
from serving.errors import (
    KeyNameError,
    PublishError,
    RedisAuthError,
    StoreError,
    VersionNotFoundError,
)
from serving.keys import ModelKeys
from serving.manifest import TableLayout
from serving.publisher import ParamPublisher, StoreOptions
from serving.reader import ParamReader
from serving.redis_nodes import RedisConfig, RedisNodes, redact_url
from serving.row_encoding import ENCODINGS, QUANTISED_LEVELS, quantised_error_bound
from tests.serving.serving_helpers import METHODS, publish, tiny_model, unique_name


@pytest.fixture(scope="module")
def redis_url(redis_service) -> str:
    return redis_service.redis_url


@pytest.fixture
def nodes(redis_url):
    connected = RedisNodes(RedisConfig.parse(redis_url))
    yield connected
    connected.close()


@functools.cache
def model_for(method: str):
    return tiny_model(method)


def small_table(rows: int = 50, dim: int = 4) -> tuple[TableLayout, np.ndarray]:
    values = np.random.default_rng(rows).normal(size=(rows, dim)).astype(np.float32)
    return TableLayout("t", rows, dim), values


@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_encoding_round_trips(method, nodes, redis_url, record_property):
    model = model_for(method)
    embeddings = model.embeddings
    worst = dict.fromkeys(QUANTISED_LEVELS, 0.0)
    for encoding in ENCODINGS:
        name = unique_name(method)
        result = publish(model, name, redis_url, encoding)
        reader = ParamReader(nodes, name)
        manifest = reader.manifest(reader.live_version())
        assert manifest.encoding == encoding
        for layout in manifest.tables:
            exported = list(embeddings.export_rows(layout.name))
            want_ids = torch.cat([ids for ids, _ in exported]).numpy()
            want = torch.cat([rows for _, rows in exported]).float().numpy()
            order = np.argsort(want_ids)
            want_ids, want = want_ids[order], want[order]
            ids, got = reader.scan_table(manifest, layout.name)
            assert np.array_equal(ids, want_ids), f"{layout.name}: ids differ"
            assert result.rows_written[layout.name] == len(want_ids)
            if encoding == "fp32":
                assert np.array_equal(got, want)
            elif encoding == "fp16":
                assert np.array_equal(got, want.astype(np.float16).astype(np.float32))
            else:
                error = np.abs(got - want).max(axis=1)
                bound = quantised_error_bound(want, encoding)
                assert (error <= bound).all(), f"{layout.name}: {encoding} error"
                worst[encoding] = max(worst[encoding], float(error.max(initial=0.0)))
            if method == "collisionless" and layout.name in embeddings.self_managed:
                assert layout.keyed_by == "id"
    for encoding, error in worst.items():
        record_property(f"{encoding}_max_abs_error", error)
        print(f"{method}: {encoding} max abs error {error:.2e}")


def test_collisionless_default_rows_ride_with_the_dense_blob(nodes, redis_url):
    model = model_for("collisionless")
    name = unique_name()
    publish(model, name, redis_url)
    reader = ParamReader(nodes, name)
    version = reader.live_version()
    dense = reader.dense(version, reader.head(version).dense_revision)
    table = model.embeddings.self_managed["item_id"]
    assert np.array_equal(dense.default_rows["item_id"], table.default_row_values().numpy())
    assert not any(key.startswith("embeddings.self_managed.") for key in dense.tensors)
    assert any(key.startswith("cross.") for key in dense.tensors)


def test_a_version_goes_live_only_after_its_commit(nodes):
    name = unique_name()
    keys = ModelKeys(name)
    layout, values = small_table()
    publisher = ParamPublisher(nodes, name, StoreOptions(grace_s=30))
    reader = ParamReader(nodes, name)
    first = publisher.publish({layout: [(np.arange(50), values)]}, {"w": torch.ones(2)})
    listener = nodes.meta.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(keys.events)
    listener.get_message(timeout=1)

    second = publisher.begin([layout])
    second.write_rows("t", np.arange(50), values * 2)
    assert reader.live_version() == first.version, "a half-written version went live"
    result = second.commit({"w": torch.zeros(2)})
    assert reader.live_version() == second.version == result.version
    assert result.previous_version == first.version
    message = listener.get_message(timeout=2)
    assert json.loads(message["data"]) == {
        "model": name,
        "kind": "version",
        "version": second.version,
    }
    listener.close()
    old_rows = nodes.meta.keys(f"embtab:{name}:{first.version}:rows:*")
    assert old_rows and all(0 < nodes.meta.ttl(key) <= 30 for key in old_rows)
    assert nodes.meta.ttl(keys.manifest(second.version)) == -1
    rows = reader.fetch_rows(reader.manifest(second.version), {"t": np.array([4])})["t"]
    assert np.array_equal(rows.values[0], values[4] * 2)


def test_deltas_write_in_place_log_changes_and_replace_dense_whole(nodes):
    name = unique_name()
    layout, values = small_table()
    ids_layout = TableLayout("ids", 0, 4, keyed_by="id")
    raw_ids = np.array([10**12, 5, 77])
    publisher = ParamPublisher(nodes, name, StoreOptions(grace_s=30))
    reader = ParamReader(nodes, name)
    version = publisher.publish(
        {layout: [(np.arange(50), values)], ids_layout: [(raw_ids, values[:3])]},
        {"w": torch.ones(2)},
    ).version
    head = reader.head(version)
    assert (head.delta, head.dense_revision) == (0, 0)

    delta = publisher.publish_delta(
        rows={"t": (np.array([1, 2]), np.zeros((2, 4))), "ids": (np.array([9]), np.ones((1, 4)))},
        deleted={"ids": np.array([5])},
        dense={"w": torch.full((2,), 7.0)},
    )
    assert (delta.version, delta.delta, delta.dense_revision) == (version, 1, 1)
    head = reader.head(version)
    assert (head.delta, head.dense_revision) == (1, 1)
    log = reader.delta_log(version, 1)
    assert log["t"].tolist() == [1, 2] and log["ids"].tolist() == [5, 9]
    manifest = reader.manifest(version)
    fetched = reader.fetch_rows(manifest, {"t": np.array([1, 3]), "ids": raw_ids[:2]})
    assert not fetched["t"].values[0].any() and np.array_equal(fetched["t"].values[1], values[3])
    assert fetched["ids"].found.tolist() == [True, False]
    assert torch.equal(reader.dense(version, 1).tensors["w"], torch.full((2,), 7.0))
    assert 0 < nodes.meta.pttl(ModelKeys(name).dense(version, 0)) <= 30_000

    second = publisher.publish_delta(rows={"t": (np.array([4]), np.ones((1, 4)))})
    assert second.delta == 2 and second.dense_revision is None
    assert reader.head(version).dense_revision == 1


def test_bad_publishes_are_refused_before_anything_is_written(nodes):
    name = unique_name()
    layout, values = small_table()
    publisher = ParamPublisher(nodes, name)
    with pytest.raises(VersionNotFoundError, match="no live version"):
        publisher.publish_delta(rows={"t": (np.arange(2), values[:2])})
    publish_run = publisher.begin([layout])
    with pytest.raises(PublishError, match=r"row ids must be in \[0, 50\)"):
        publish_run.write_rows("t", np.array([50]), values[:1])
    with pytest.raises(PublishError, match=r"rows must be \[2, 4\]"):
        publish_run.write_rows("t", np.arange(2), values[:2, :3])
    with pytest.raises(KeyNameError, match="cannot be part of a Redis key"):
        ParamPublisher(nodes, "bad:name")


def test_garbage_collection_takes_abandoned_and_retired_namespaces_never_the_live(nodes):
    name = unique_name()
    layout, values = small_table()
    publisher = ParamPublisher(nodes, name, StoreOptions(grace_s=1000, stale_after_s=1000))
    first = publisher.publish({layout: [(np.arange(50), values)]}, {"w": torch.ones(1)})
    abandoned = publisher.begin([layout])
    abandoned.write_rows("t", np.arange(50), values)
    second = publisher.publish({layout: [(np.arange(50), values)]}, {"w": torch.ones(1)})
    assert publisher.collect_garbage() == []
    later = time.time() + 2000
    assert publisher.collect_garbage(now=later) == sorted([first.version, abandoned.version])
    assert nodes.meta.keys(f"embtab:{name}:{abandoned.version}:*") == []
    assert nodes.meta.keys(f"embtab:{{{name}}}:{abandoned.version}:*") == []
    assert ParamReader(nodes, name).live_version() == second.version
    assert nodes.meta.keys(f"embtab:{name}:{second.version}:rows:*")


KILLED_PUBLISHER = textwrap.dedent(
    """
    import sys, time
    import numpy as np, torch
    from serving.manifest import TableLayout
    from serving.publisher import ParamPublisher, StoreOptions
    from serving.redis_nodes import RedisConfig, RedisNodes

    url, name = sys.argv[1], sys.argv[2]
    nodes = RedisNodes(RedisConfig.parse(url))
    publisher = ParamPublisher(nodes, name, StoreOptions(batch_rows=500))
    run = publisher.begin([TableLayout("t", 1_000_000, 4)])
    print(run.version, flush=True)
    for start in range(0, 1_000_000, 500):
        ids = np.arange(start, start + 500)
        run.write_rows("t", ids, np.ones((500, 4)))
        time.sleep(0.01)
    run.commit({"w": torch.ones(1)})
    """
)


def test_a_publisher_killed_mid_write_leaves_the_live_version_serving(nodes, redis_url):
    name = unique_name()
    layout, values = small_table()
    publisher = ParamPublisher(nodes, name, StoreOptions(stale_after_s=60))
    live = publisher.publish({layout: [(np.arange(50), values)]}, {"w": torch.ones(1)}).version
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_PUBLISHER, redis_url, name],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        half = int(child.stdout.readline())
        deadline = time.time() + 20
        while not nodes.meta.keys(f"embtab:{name}:{half}:rows:*") and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    reader = ParamReader(nodes, name)
    assert reader.live_version() == live
    rows = reader.fetch_rows(reader.manifest(live), {"t": np.array([7])})["t"]
    assert np.array_equal(rows.values[0], values[7])
    assert nodes.meta.keys(f"embtab:{name}:{half}:rows:*"), "the child wrote nothing"
    assert publisher.collect_garbage() == [], "a fresh half namespace must not be collected"
    assert publisher.collect_garbage(now=time.time() + 61) == [half]
    assert nodes.meta.keys(f"embtab:{name}:{half}:*") == []
    assert reader.live_version() == live


def test_rows_spread_over_several_nodes_one_round_trip_each():
    servers = [start_redis(), start_redis()]
    try:
        urls = [f"redis://127.0.0.1:{server.port}/0" for server in servers]
        multi = RedisNodes(RedisConfig.parse(",".join(urls)))
        name = unique_name()
        layout, values = small_table(400)
        publisher = ParamPublisher(multi, name)
        version = publisher.publish(
            {layout: [(np.arange(400), values)]}, {"w": torch.ones(1)}, num_shards=4
        ).version
        for node, server in enumerate(servers):
            client = redis.Redis(port=server.port)
            shards = sorted(key.decode()[-2] for key in client.keys("embtab:*:rows:*"))
            assert shards == [str(s) for s in range(4) if s % 2 == node]
            client.close()
        reader = ParamReader(multi, name)
        executed = []
        original = multi.execute
        multi.execute = lambda pipes: executed.append(sorted(pipes)) or original(pipes)
        fetched = reader.fetch_rows(reader.manifest(version), {"t": np.arange(0, 400, 3)})
        assert executed == [[0, 1]], "one pipeline per node, executed once"
        assert np.array_equal(fetched["t"].values, values[::3])
        multi.close()
        first_only = RedisNodes(RedisConfig.parse(urls[0]))
        with pytest.raises(StoreError, match="published over 2 URL"):
            ParamReader(first_only, name).manifest(version)
        first_only.close()
    finally:
        for server in servers:
            server.stop()


def start_cluster(count: int = 2):
    """`count` embedded redis-servers joined into a Redis Cluster, slots split evenly."""
    servers = [
        start_redis(extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
        for _ in range(count)
    ]
    clients = [redis.Redis(port=server.port) for server in servers]
    step = 16384 // count
    for index, client in enumerate(clients):
        end = 16384 if index == count - 1 else (index + 1) * step
        client.execute_command("CLUSTER ADDSLOTS", *range(index * step, end))
    for client in clients[1:]:
        client.execute_command("CLUSTER MEET", "127.0.0.1", servers[0].port)
    deadline = time.time() + 20
    while time.time() < deadline:
        states = [client.cluster("INFO") for client in clients]
        if all(
            s.get("cluster_state") == "ok" and int(s.get("cluster_known_nodes", 0)) == count
            for s in states
        ):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the cluster did not form: {states}")
    for client in clients:
        client.close()
    return servers


def test_a_redis_cluster_holds_each_shard_on_one_node_by_hash_tag():
    servers = start_cluster()
    try:
        cluster = RedisNodes(
            RedisConfig.parse(f"redis://127.0.0.1:{servers[0].port}/0", cluster=True)
        )
        name = unique_name()
        layout, values = small_table(300)
        publisher = ParamPublisher(cluster, name)
        version = publisher.publish(
            {layout: [(np.arange(300), values)]}, {"w": torch.ones(1)}, num_shards=8
        ).version
        placed = [
            len(redis.Redis(port=server.port).keys(f"embtab:{name}:*:rows:*")) for server in servers
        ]
        assert sum(placed) == 8 and all(placed), f"shards not spread over the nodes: {placed}"
        publisher.publish_delta(rows={"t": (np.array([0]), np.zeros((1, 4)))})
        reader = ParamReader(cluster, name)
        manifest = reader.manifest(version)
        fetched = reader.fetch_rows(manifest, {"t": np.arange(300)})["t"]
        assert not fetched.values[0].any() and np.array_equal(fetched.values[1:], values[1:])
        assert reader.head(version).delta == 1
        cluster.close()
    finally:
        for server in servers:
            server.stop()


def test_urls_with_credentials_work_and_are_never_shown():
    server = start_redis(password="s3cret")
    try:
        url = f"redis://default:s3cret@127.0.0.1:{server.port}/0"
        assert "s3cret" not in redact_url(url) and "***" in redact_url(url)
        config = RedisConfig.parse(url)
        assert "s3cret" not in str(config.redacted()) and "s3cret" not in repr(config)
        authed = RedisNodes(config)
        name = unique_name()
        layout, values = small_table()
        ParamPublisher(authed, name).publish({layout: [(np.arange(50), values)]}, {})
        assert ParamReader(authed, name).live_version() == 1
        authed.close()
        anonymous = RedisNodes(RedisConfig.parse(f"redis://127.0.0.1:{server.port}/0"))
        with pytest.raises(RedisAuthError, match="refused the credentials"):
            ParamReader(anonymous, name).live_version()
        anonymous.close()
    finally:
        server.stop()
