"""The Redis options of the commands that talk to Redis (publish, serve, load-online): one
spelling of the URL list, one fallback to EMBTAB_REDIS."""

from __future__ import annotations

import argparse
import os


def redis_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis",
        help="Redis URL(s), comma-separated, with credentials if needed "
        "(redis://user:pass@host:port/db, rediss:// for TLS); default: $EMBTAB_REDIS",
    )
    parser.add_argument(
        "--redis-cluster", action="store_true", help="the URL is one node of a Redis Cluster"
    )


def redis_urls(arguments: argparse.Namespace) -> str:
    urls = arguments.redis or os.environ.get("EMBTAB_REDIS")
    if not urls:
        raise ValueError(
            "no Redis given: pass --redis redis://host:port/0 (several, comma-separated, for "
            "client-side shards) or set EMBTAB_REDIS"
        )
    return urls
