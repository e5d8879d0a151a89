"""Several scoring processes behind one port: uvicorn workers that share nothing but Redis.

Each worker is a whole `ScoringService` (its own row cache, Redis connections, version
watcher, micro-batcher), built by `worker_app` from the ServeConfig the parent passes in the
environment (`EMBTAB_SERVE_CONFIG`, JSON; it may carry Redis credentials, and a process's
environment is readable by its user only). uvicorn's parent holds the listening socket and its
workers accept on it, so one port spreads connections over N processes, and N cores score in
parallel. Each response says which worker answered in the `x-embtab-worker` header (its pid). Every
worker has the single process's connection guards (header deadline, connection cap), each for
its own connections: uvicorn imports them by name (`WORKER_PROTOCOL`) in the worker.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Awaitable, Callable

import uvicorn
from fastapi import FastAPI, Request, Response

from serving.app import ACCEPT_BURST, connection_limit, create_app, guarded_protocol
from serving.errors import ServingError
from serving.redis_nodes import RedisConfig
from serving.service import ScoringService, ServeConfig

CONFIG_ENV = "EMBTAB_SERVE_CONFIG"
# uvicorn kills a worker that does not answer its health ping within this; a fresh worker
# answers only once it has imported torch and the models (seconds, more on a loaded machine),
# and uvicorn's default of 5 s would restart it over and over.
WORKER_HEALTHCHECK_S = 120
WORKER_HEADER = "x-embtab-worker"
WORKER_PROTOCOL = "serving.workers:GuardedProtocol"


def __getattr__(name: str) -> type:
    """`GuardedProtocol`: the h11 protocol with the parent's header deadline and connection cap,
    built when uvicorn asks for it in a worker (a module attribute, so it is found by name)."""
    if name != "GuardedProtocol":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if CONFIG_ENV not in os.environ:
        raise ServingError(f"{CONFIG_ENV} is not set; start workers with serve_workers")
    config = config_from_json(os.environ[CONFIG_ENV])
    return guarded_protocol(config.header_timeout_s, connection_limit(config.max_connections))


def config_to_json(config: ServeConfig) -> str:
    return json.dumps(dataclasses.asdict(config))


def config_from_json(text: str) -> ServeConfig:
    fields = json.loads(text)
    redis = fields.pop("redis")
    return ServeConfig(redis=RedisConfig(**{**redis, "urls": tuple(redis["urls"])}), **fields)


def worker_app() -> FastAPI:
    """The app of one worker (uvicorn's factory), from the parent's config."""
    if CONFIG_ENV not in os.environ:
        raise ServingError(f"{CONFIG_ENV} is not set; start workers with serve_workers")
    app = create_app(ScoringService(config_from_json(os.environ[CONFIG_ENV])))
    pid = str(os.getpid())

    @app.middleware("http")
    async def tag_worker(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        response.headers[WORKER_HEADER] = pid
        return response

    return app


def serve_workers(config: ServeConfig, workers: int) -> None:
    """Run `workers` scoring processes on config's port until interrupted."""
    if workers < 1:
        raise ServingError(f"workers must be >= 1, got {workers}")
    os.environ[CONFIG_ENV] = config_to_json(config)
    uvicorn.run(
        "serving.workers:worker_app",
        factory=True,
        host=config.host,
        port=config.port,
        workers=workers,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
        backlog=ACCEPT_BURST,
        http=WORKER_PROTOCOL,
    )
