"""The HTTP service: FastAPI routes over a `ScoringService`, served by uvicorn on loopback.

    POST /score                  score candidates (body: see serving.request)
    POST /models/{model}/score   the same, the model named in the path
    GET  /healthz                200; "ok", or "degraded" while Redis is unreachable
    GET  /readyz                 200 once a version is loaded, else 503
    GET  /version                the version being served, its delta and dense revision
    GET  /metrics                Prometheus

Errors are JSON `{"error": message, "field": path}` with the status the error carries (400, 404,
413, 422, 503); nothing a client sends leads to a 500.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from serving.errors import BodyTooLargeError, RequestError, UnknownModelError
from serving.request import ScoreRequest, parse_request
from serving.scorer import NotReadyError
from serving.service import ScoringService, ServeConfig


def _error(status: int, message: str, field: str = "") -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status)


def create_app(service: ScoringService) -> FastAPI:
    config = service.config

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="embtab scoring", lifespan=lifespan, docs_url=None, redoc_url=None)
    metrics = service.metrics

    async def score(request: Request, model: str | None) -> Response:
        started = time.perf_counter()
        service.batcher.arrived()
        submitted = False
        status = 200
        try:
            if model is not None and model != config.model:
                raise UnknownModelError(
                    "path", f"unknown model {model!r}; this service serves {config.model!r}"
                )
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
                raise BodyTooLargeError(
                    "body", f"{length} bytes; a request may carry at most {config.max_body_bytes}"
                )
            body = await request.body()
            if len(body) > config.max_body_bytes:
                raise BodyTooLargeError(
                    "body",
                    f"{len(body)} bytes; a request may carry at most {config.max_body_bytes}",
                )
            parsed: ScoreRequest = parse_request(body, config.max_candidates)
            columns = service.scorer.prepare(parsed)
            submitted = True
            result = await service.batcher.submit(columns)
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
        except Exception:  # a bug of ours: FastAPI answers 500; count it as one
            status = 500
            raise
        finally:
            if not submitted:
                service.batcher.abandoned()
            metrics.latency.observe(time.perf_counter() - started)
            metrics.requests.labels(str(status)).inc()

    @app.post("/score")
    async def score_default(request: Request) -> Response:
        return await score(request, None)

    @app.post("/models/{model}/score")
    async def score_named(model: str, request: Request) -> Response:
        return await score(request, model)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        snapshot = service.scorer.snapshot
        health = service.scorer.health.describe()
        return JSONResponse(
            {
                "status": "ok" if health["redis"] == "up" else "degraded",
                "model": config.model,
                "ready": snapshot is not None,
                "version": snapshot.version if snapshot else None,
                **health,
            }
        )

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        snapshot = service.scorer.snapshot
        if snapshot is None:
            return _error(503, f"model {config.model!r} has no version loaded yet")
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

    return app


def serve(config: ServeConfig) -> None:
    """Run the service until interrupted (uvicorn on loopback, one process, no access log)."""
    service = ScoringService(config)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(service),
            host=config.host,
            port=config.port,
            log_level="warning",
            access_log=False,
            lifespan="on",
        )
    )
    server.run()
