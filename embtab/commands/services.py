"""`embtab services up`: start the embedded Redis and Kafka and keep them until Ctrl-C, SIGTERM
or `--seconds`; they are stopped on the way out in every case."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from embtab.output import emit
from embtab.services import embedded_services, stop_on_signals
from serving.redis_nodes import redact_url


def register(commands: argparse._SubParsersAction) -> None:
    services = commands.add_parser("services", help="the embedded Redis and Kafka")
    actions = services.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = actions.add_parser("up", help="start them, print their URLs, run until Ctrl-C or SIGTERM")
    up.add_argument("--json", action="store_true", help="print a JSON result")
    up.add_argument(
        "--seconds", type=float, help="stop after this many seconds instead of waiting for Ctrl-C"
    )
    up.add_argument(
        "--redis-dir",
        type=Path,
        help="directory for the embedded Redis's AOF, kept after stop, so that a Redis started "
        "again on it has its data back; without it the AOF lives in a temporary directory "
        "removed at stop",
    )
    up.set_defaults(run=run_up)


def run_up(arguments: argparse.Namespace) -> int:
    if arguments.redis_dir is not None and os.environ.get("EMBTAB_REDIS"):
        raise ValueError(
            "--redis-dir is for the embedded Redis, which is not started while EMBTAB_REDIS is "
            "set: unset EMBTAB_REDIS, or drop --redis-dir"
        )
    redis_dir = arguments.redis_dir
    with stop_on_signals() as stop, embedded_services(redis_dir=redis_dir) as services:
        redis_url = redact_url(services.redis_url)  # EMBTAB_REDIS may carry a password
        result = {
            "redis": redis_url,
            "kafka": services.kafka_bootstrap,
            "redis_dir": None if redis_dir is None else str(redis_dir),
        }
        emit(
            result,
            f"redis {redis_url}  kafka {services.kafka_bootstrap}  (Ctrl-C stops them)",
            arguments.json,
        )
        stop.wait(arguments.seconds)
    return 0
