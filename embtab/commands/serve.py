"""`embtab publish CHECKPOINT` and `embtab serve --model NAME`: Redis parameter shards and the
HTTP scoring service."""

from __future__ import annotations

import argparse
from pathlib import Path

from embtab.commands.redis_options import redis_arguments, redis_urls
from embtab.output import emit
from serving.publisher import ParamPublisher, StoreOptions
from serving.redis_nodes import RedisConfig, RedisNodes
from serving.row_encoding import ENCODINGS

DEFAULT_PORT = 8000


def register(commands: argparse._SubParsersAction) -> None:
    publish = commands.add_parser(
        "publish", help="publish a checkpoint's tables and dense parameters to Redis"
    )
    publish.add_argument("checkpoint", type=Path, help="a checkpoint file (embtab train)")
    publish.add_argument("--model", help="name to publish under (default: the file's stem)")
    redis_arguments(publish)
    publish.add_argument(
        "--encoding", choices=ENCODINGS, default="fp32", help="row encoding in Redis"
    )
    publish.add_argument(
        "--shards",
        type=int,
        help="row shards per table (default: one per Redis URL, 16 on a cluster)",
    )
    publish.add_argument(
        "--grace-s",
        type=float,
        default=60.0,
        help="seconds the previous version stays readable after the flip",
    )
    publish.add_argument("--json", action="store_true", help="print a JSON result")
    publish.set_defaults(run=run_publish)

    serve = commands.add_parser("serve", help="the HTTP scoring service (POST /score)")
    serve.add_argument("--model", required=True, help="published model name to serve")
    redis_arguments(serve)
    serve.add_argument(
        "--features-redis",
        help="Redis URL of the online feature store (default: the first --redis URL; 'none' "
        "scores without online features)",
    )
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="port on 127.0.0.1")
    serve.add_argument("--cache-mb", type=float, default=256.0, help="row cache budget, MiB")
    serve.add_argument(
        "--max-wait-ms", type=float, default=2.0, help="longest a micro-batch waits for more"
    )
    serve.add_argument(
        "--max-candidates", type=int, default=1000, help="candidates one request may carry"
    )
    serve.add_argument(
        "--max-body-mb", type=float, default=8.0, help="largest request body, MiB (else 413)"
    )
    serve.add_argument(
        "--offload-body-kb",
        type=float,
        default=256.0,
        help="bodies larger than this are parsed in a worker process, so that parsing them does "
        "not hold up other clients (0: every body)",
    )
    serve.add_argument(
        "--request-timeout-s",
        type=float,
        default=5.0,
        help="longest a request may take before it is answered 503",
    )
    serve.add_argument(
        "--header-timeout-s",
        type=float,
        default=10.0,
        help="longest a connection may take to send a request's headers before it is closed",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=1000,
        help="open connections at most (fewer if the descriptor limit is lower); past it the "
        "one waiting longest for its headers is closed, or the new one answered 503",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="scoring processes behind the one port (uvicorn workers sharing only Redis)",
    )
    serve.add_argument("--json", action="store_true", help="print a JSON result")
    serve.set_defaults(run=run_serve)


def run_publish(arguments: argparse.Namespace) -> int:
    from serving.published_model import publish_checkpoint

    if not arguments.checkpoint.is_file():
        raise ValueError(f"no checkpoint at {arguments.checkpoint}")
    model = arguments.model or arguments.checkpoint.stem
    config = RedisConfig.parse(
        redis_urls(arguments), cluster=arguments.redis_cluster, socket_timeout_s=10.0
    )
    nodes = RedisNodes(config)
    shards = arguments.shards or (16 if arguments.redis_cluster else nodes.num_nodes)
    try:
        publisher = ParamPublisher(nodes, model, StoreOptions(grace_s=arguments.grace_s))
        result = publish_checkpoint(
            publisher, str(arguments.checkpoint), encoding=arguments.encoding, num_shards=shards
        )
    finally:
        nodes.close()
    rows = sum(result.rows_written.values())
    emitted = {
        "model": result.model,
        "version": result.version,
        "previous_version": result.previous_version,
        "rows_written": result.rows_written,
        "dense_bytes": result.dense_bytes,
        "encoding": arguments.encoding,
        "shards": shards,
        "redis": config.redacted(),
        "seconds": round(result.seconds, 3),
    }
    previous = "" if result.previous_version is None else f"; v{result.previous_version} retired"
    emit(
        emitted,
        f"published {result.model} v{result.version}: {len(result.rows_written)} tables, "
        f"{rows:,} rows ({arguments.encoding}, {shards} shards), dense {result.dense_bytes:,} "
        f"bytes in {result.seconds:.1f} s{previous}",
        arguments.json,
    )
    return 0


def run_serve(arguments: argparse.Namespace) -> int:
    from serving.app import serve
    from serving.service import ServeConfig, serving_redis

    features = arguments.features_redis
    config = ServeConfig(
        model=arguments.model,
        redis=serving_redis(redis_urls(arguments), cluster=arguments.redis_cluster),
        features_redis="" if features == "none" else features,
        port=arguments.port,
        max_candidates=arguments.max_candidates,
        max_body_bytes=int(arguments.max_body_mb * 2**20),
        offload_body_bytes=int(arguments.offload_body_kb * 2**10),
        request_timeout_s=arguments.request_timeout_s,
        header_timeout_s=arguments.header_timeout_s,
        max_connections=arguments.max_connections,
        max_wait_ms=arguments.max_wait_ms,
        cache_bytes=int(arguments.cache_mb * 2**20),
    )
    emit(
        {
            "model": config.model,
            "url": f"http://{config.host}:{config.port}",
            "redis": config.redis.redacted(),
            "workers": arguments.workers,
        },
        f"serving {config.model} on http://{config.host}:{config.port} "
        f"(redis {', '.join(config.redis.redacted())}; Ctrl-C stops)",
        arguments.json,
    )
    if arguments.workers == 1:
        serve(config)
    else:
        from serving.workers import serve_workers

        serve_workers(config, arguments.workers)
    return 0
