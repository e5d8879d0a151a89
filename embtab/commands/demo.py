"""`embtab demo`: the main job end to end on the embedded services, with a report in runs/.

Offline training (compressed and full tables), publish to Redis, `embtab serve`, and the last
20% of events replayed through Kafka into the online trainer while a client scores against the
live service; see embtab.demo.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import signal
import sys
import time
from pathlib import Path

from embtab.commands.data import load_with_progress
from embtab.demo.config import DemoConfig, DemoError
from embtab.output import emit
from embtab.services import embedded_services
from serving.redis_nodes import redact_url

THREADS = "1"  # torch threads per process: the demo's processes share 2 loaded cores


def register(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="run the main job end to end on embedded services")
    demo.add_argument(
        "--dataset",
        default="movielens-1m",
        help="data set to run on (movielens-1m, synthetic-criteo)",
    )
    demo.add_argument(
        "--quick", action="store_true", help="a small slice of every stage (about 2 minutes)"
    )
    demo.add_argument(
        "--runs-dir", type=Path, default=Path("runs"), help="where runs/<timestamp>/ is written"
    )
    demo.add_argument("--json", action="store_true", help="print a JSON result")
    demo.set_defaults(run=run_demo)


def _interrupt_on_sigterm() -> None:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run_demo(arguments: argparse.Namespace) -> int:
    try:
        config = DemoConfig.for_run(arguments.dataset, arguments.quick)
    except DemoError as error:
        print(f"embtab demo: {error}", file=sys.stderr)
        return 2
    try:
        import torch

        from embtab.demo.pipeline import DemoRun, StageError, check_roles, run_demo_stages
        from embtab.demo.report import headline, write_report
    except ImportError as error:
        print(
            f"embtab demo: a dependency is missing ({error}); run `make install`",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", THREADS)

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    _interrupt_on_sigterm()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    directory = arguments.runs_dir / stamp
    run = DemoRun(config)
    started = time.monotonic()
    code = 0
    try:
        with contextlib.ExitStack() as stack:
            with run.stage("services"):
                services = stack.enter_context(embedded_services())
            redis_url = redact_url(services.redis_url)
            print(f"services: redis {redis_url}, kafka {services.kafka_bootstrap}")
            with run.stage("prepare data"):
                dataset = load_with_progress(config.dataset, show_progress=not arguments.json)
                check_roles(dataset)
            run_demo_stages(run, services, dataset, progress=not arguments.json)
    except StageError as error:
        print(f"embtab demo: {error}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("\nembtab demo: interrupted; every process it started is stopped", file=sys.stderr)
        code = 130
    seconds = time.monotonic() - started
    path = write_report(run, directory, seconds)
    numbers = headline(run)
    summary = "; ".join(f"{key} {value}" for key, value in numbers.items())
    emit(
        {
            "report": str(path),
            "seconds": round(seconds, 1),
            "headline": numbers,
            "failed": run.failed,
        },
        f"{summary}\nreport: {path} ({seconds:.0f} s)",
        arguments.json,
    )
    if code == 0 and run.failed:
        code = 1
    return code
