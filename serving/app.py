"""The HTTP service: FastAPI routes over a `ScoringService`, served by uvicorn on loopback.

    POST /score                  score candidates (body: see serving.request)
    POST /models/{model}/score   the same, the model named in the path
    GET  /healthz                200; "ok", or "degraded" while Redis is unreachable or the
                                 served version's data is missing from it (and why)
    GET  /readyz                 200 once a version is loaded and its data is in Redis, else 503
    GET  /version                the version being served, its delta and dense revision
    GET  /metrics                Prometheus
    GET  /openapi.json           the OpenAPI schema of all of these

Limits (ServeConfig): body size and candidate count (413), request time (503); bodies over
`offload_body_bytes` are parsed in a worker process (serving.parsing), off the event loop; a
connection must send its request's headers within `header_timeout_s` (else it is closed), and at
most `max_connections` are open at once (past it, the connection waiting longest for its headers
is closed, or the new one is answered 503 when none waits).

Errors are JSON `{"error": message, "field": path}` with the status the error carries (400, 404,
413, 422, 503); nothing a client sends leads to a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import time
from collections.abc import AsyncIterator

import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from uvicorn.protocols.http.h11_impl import H11Protocol

from serving.errors import BodyTooLargeError, RequestError, UnknownModelError
from serving.parsing import ParserGoneError
from serving.request import ScoreRequest
from serving.scorer import NotReadyError
from serving.service import ScoringService, ServeConfig

log = logging.getLogger("embtab.serving")

# The listen backlog, which is also how many connections asyncio accepts in one go, before
# the cap below can close any: bursts stay within the descriptors reserved past the cap.
ACCEPT_BURST = 64
# Descriptors kept free of client connections: one accept burst, Redis connections, files.
RESERVED_DESCRIPTORS = 2 * ACCEPT_BURST
# At most one log line this often about connections closed for slow headers or refused.
CONNECTION_LOG_INTERVAL_S = 10.0
FULL_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: 66\r\n\r\n"
    b'{"error": "too many open connections; retry later", "field": ""}\n\n'
)


def _error(status: int, message: str, field: str = "") -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status)


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "field"],
    "properties": {
        "error": {"type": "string", "minLength": 1, "description": "what was wrong"},
        "field": {"type": "string", "description": "the path of the field at fault, or empty"},
    },
}
SCORE_RESPONSE_SCHEMA = {
    "type": "object",
    "required": ["model", "version", "delta", "degraded", "scores"],
    "properties": {
        "model": {"type": "string"},
        "version": {"type": "integer"},
        "delta": {"type": "integer"},
        "degraded": {"type": "boolean"},
        "scores": {"type": "array", "items": {"type": "number"}},
    },
}
SCORE_ERRORS = {
    400: "malformed JSON, an unknown feature, or an id the model does not accept",
    404: "a model this service does not serve",
    413: "a body or a candidate list over the service's limits",
    422: "a field missing or of the wrong type",
    503: "no version loaded yet, or not answered within the request timeout",
}


def _json(schema: str, description: str) -> dict:
    ref = {"$ref": f"#/components/schemas/{schema}"}
    return {"description": description, "content": {"application/json": {"schema": ref}}}


# The score routes read their body raw (to bound its size before parsing it), so FastAPI cannot
# infer it: this states it for clients and for schema-driven fuzzing (tests/fuzz).
SCORE_OPENAPI = {
    "requestBody": {"required": True, **_json("ScoreRequest", "the candidates to score")},
    "responses": {
        "200": _json("ScoreResponse", "one score per candidate, in candidate order"),
        **{str(code): _json("Error", why) for code, why in SCORE_ERRORS.items()},
    },
}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema plus the components SCORE_OPENAPI refers to."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        request = ScoreRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(request.pop("$defs", {}))
        components.update(
            ScoreRequest=request, ScoreResponse=SCORE_RESPONSE_SCHEMA, Error=ERROR_SCHEMA
        )
        app.openapi_schema = schema
    return app.openapi_schema


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed `limit` bytes: from its
    Content-Length, or while it streams in, so that a chunked upload is never held whole."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BodyTooLargeError("body", f"{length} bytes; a request may carry at most {limit}")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLargeError(
                "body", f"more than {limit} bytes; a request may carry at most {limit}"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(service: ScoringService) -> FastAPI:
    config = service.config

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="embtab scoring", lifespan=lifespan, docs_url=None, redoc_url=None)
    metrics = service.metrics

    async def score(request: Request, model: str | None) -> Response:
        started = time.perf_counter()
        # A body over the offload size (or of a size not declared: chunked) takes longer to come
        # in and be parsed in the worker than the batcher waits: it is not awaited at all.
        declared = request.headers.get("content-length", "")
        awaited = declared.isdigit() and int(declared) <= config.offload_body_bytes
        arrival = service.batcher.arrived() if awaited else None
        status = 200
        try:
            if model is not None and model != config.model:
                raise UnknownModelError(
                    "path", f"unknown model {model!r}; this service serves {config.model!r}"
                )
            async with asyncio.timeout(config.request_timeout_s):
                body = await _read_body(request, config.max_body_bytes)
                columns = await service.prepare(body)
                result = await service.batcher.submit(columns, arrival)
            payload = {
                "model": config.model,
                "version": result.version,
                "delta": result.delta,
                "degraded": result.degraded,
                "scores": result.scores.tolist(),
            }
            return Response(json.dumps(payload), media_type="application/json")
        except RequestError as error:
            status = error.status
            return _error(status, str(error), error.field)
        except NotReadyError as error:
            status = 503
            return _error(status, str(error))
        except ParserGoneError as error:
            status = 503
            return _error(status, str(error))
        except TimeoutError:
            status = 503
            return _error(
                status,
                f"the request was not answered within {config.request_timeout_s} s (the "
                "service's request timeout); the service is overloaded or Redis is slow, retry",
            )
        except Exception:  # a bug of ours: FastAPI answers 500; count it as one
            status = 500
            raise
        finally:
            if arrival is not None:
                arrival.done()
            metrics.latency.observe(time.perf_counter() - started)
            metrics.requests.labels(str(status)).inc()

    @app.post("/score", openapi_extra=SCORE_OPENAPI)
    async def score_default(request: Request) -> Response:
        return await score(request, None)

    @app.post("/models/{model}/score", openapi_extra=SCORE_OPENAPI)
    async def score_named(model: str, request: Request) -> Response:
        return await score(request, model)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        scorer = service.scorer
        snapshot = scorer.snapshot
        return JSONResponse(
            {
                "status": "degraded" if scorer.degraded else "ok",
                "model": config.model,
                "ready": snapshot is not None,
                "version": snapshot.version if snapshot else None,
                **scorer.health.describe(),
                **scorer.data_state(),
            }
        )

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        snapshot = service.scorer.snapshot
        if snapshot is None:
            return _error(503, f"model {config.model!r} has no version loaded yet")
        data = service.scorer.data_state()
        if data["data"] == "missing":
            return _error(
                503,
                f"model {config.model!r} v{snapshot.version}: its data is missing from Redis "
                f"({data['data_error']}); answers are degraded until a version is published again",
            )
        return JSONResponse({"ready": True, "model": config.model, "version": snapshot.version})

    @app.get("/version")
    async def version() -> JSONResponse:
        snapshot = service.scorer.snapshot
        if snapshot is None:
            return _error(503, f"model {config.model!r} has no version loaded yet")
        manifest = snapshot.manifest
        return JSONResponse(
            {
                "model": config.model,
                "version": snapshot.version,
                "delta": snapshot.delta,
                "dense_revision": snapshot.dense_revision,
                "encoding": manifest.encoding,
                "num_shards": manifest.num_shards,
                "published_at": manifest.created_at,
                "tables": {table.name: table.rows for table in manifest.tables},
            }
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


class _ConnectionLog:
    """Counts connections closed for slow headers or refused, logged at most once an interval:
    a flood of them must not become a flood of log lines."""

    def __init__(self) -> None:
        self.counts = {"slow headers": 0, "refused": 0}
        self.last = -CONNECTION_LOG_INTERVAL_S

    def count(self, reason: str, now: float, limits: str) -> None:
        self.counts[reason] += 1
        if now - self.last >= CONNECTION_LOG_INTERVAL_S:
            self.last = now
            seen = ", ".join(f"{count} {why}" for why, count in self.counts.items() if count)
            log.warning("connections closed since the last report: %s (%s)", seen, limits)
            self.counts = dict.fromkeys(self.counts, 0)


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for each request's headers and a cap on open
    connections, which uvicorn lacks: a client that opens connections and never finishes their
    headers otherwise holds them forever and, at the descriptor limit, locks everyone out."""
    events = _ConnectionLog()
    limits = f"headers within {header_timeout_s} s, at most {max_connections} connections"

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        awaiting_headers_since: float | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections and not self._evict_one():
                events.count("refused", self.loop.time(), limits)
                transport.write(FULL_RESPONSE)
                transport.close()
                return
            self._await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._headers_arrived()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:
                self._headers_arrived()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._await_headers()

        def _await_headers(self) -> None:
            if self._header_timer is None:
                self.awaiting_headers_since = self.loop.time()
                self._header_timer = self.loop.call_later(header_timeout_s, self._too_slow)

        def _headers_arrived(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            self.awaiting_headers_since = None

        def _too_slow(self) -> None:
            self._header_timer = None
            events.count("slow headers", self.loop.time(), limits)
            self._close()

        def _close(self) -> None:
            self._headers_arrived()
            if not self.transport.is_closing():
                self.transport.close()

        def _evict_one(self) -> bool:
            """Close the connection that has waited longest for its headers, if any does."""
            waiting = [
                other
                for other in self.connections
                if other is not self and getattr(other, "awaiting_headers_since", None) is not None
            ]
            if not waiting:
                return False
            oldest = min(waiting, key=lambda other: other.awaiting_headers_since)
            events.count("slow headers", self.loop.time(), limits)
            oldest._close()
            return True

    return GuardedH11Protocol


def connection_limit(configured: int) -> int:
    """The connection cap, kept below the process's descriptor limit: past it, accept() fails
    with EMFILE, and no client (nor Redis) gets a descriptor."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, soft - RESERVED_DESCRIPTORS))


def uvicorn_server(service: ScoringService) -> uvicorn.Server:
    """uvicorn for the app on loopback: one process, no access log, the connection guards."""
    config = service.config
    return uvicorn.Server(
        uvicorn.Config(
            create_app(service),
            host=config.host,
            port=config.port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            backlog=ACCEPT_BURST,
            http=guarded_protocol(
                config.header_timeout_s, connection_limit(config.max_connections)
            ),
        )
    )


def serve(config: ServeConfig) -> None:
    """Run the service until interrupted."""
    uvicorn_server(ScoringService(config)).run()
