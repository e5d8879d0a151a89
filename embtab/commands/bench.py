"""`embtab bench compression` and `embtab bench retrieval`: the compression studies.

Each runs a grid of cells (method x budget x seed), appends every finished cell to
`<out>/<study>.json` (atomic rewrite, so an interrupted run resumes where it stopped) and
writes the Markdown table and PNG plot beside it. See `embtab.compression` and
docs/compression.md for what the cells mean.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path
from typing import Any

import torch

from embtab.commands.data import load_with_progress
from embtab.compression.grid import (
    CTR_MODELS,
    StudyConfig,
    compression_study,
    retrieval_study,
)
from embtab.compression.report import compression_summary, retrieval_summary, write_reports
from embtab.compression.results import DONE, ResultsFile
from embtab.compression.runner import run_study
from embtab.compression.tables import METHOD_ALIASES, METHODS
from embtab.output import emit

RESULTS_DIR = Path("bench/results")
MODEL_TITLES = {"dcn": "DCN-v2", "deepfm": "DeepFM", "dlrm": "DLRM", "two_tower": "two-tower"}


def register(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="compression studies: quality against memory")
    studies = bench.add_subparsers(dest="study", required=True, metavar="STUDY")

    compression = studies.add_parser(
        "compression", help="CTR model test AUC / logloss for every method at every budget"
    )
    compression.add_argument("--model", default="dcn", help=f"one of: {', '.join(CTR_MODELS)}")
    _common(
        compression,
        "full, hash, unified, qr_mult, qr_add, qr_concat, collisionless, "
        "graphhash, double_graphhash",
        "1,0.5,0.25,0.1,0.01",
    )
    compression.set_defaults(run=run_compression)

    retrieval = studies.add_parser(
        "retrieval", help="two-tower recall@20 / NDCG@20 with compressed user and item tables"
    )
    _common(retrieval, "full, hash, double_hash, graphhash, double_graphhash", "1,0.25,0.1")
    retrieval.set_defaults(run=run_retrieval)


def _common(parser: argparse.ArgumentParser, methods: str, budgets: str) -> None:
    accepted = ", ".join([*METHODS, *METHOD_ALIASES])
    parser.add_argument("--dataset", default="movielens-1m", help="data set (default %(default)s)")
    parser.add_argument(
        "--methods", type=_names, help=f"comma-separated (default: {methods}); accepted: {accepted}"
    )
    parser.add_argument(
        "--budgets",
        type=_numbers(float),
        help=f"comma-separated fractions in (0, 1] of the full tables' memory (default {budgets})",
    )
    parser.add_argument("--seeds", type=_numbers(int), help="comma-separated (default 0,1,2)")
    parser.add_argument(
        "--quick", action="store_true", help="reduced grid: budgets 1 and 0.1, one seed, 100k rows"
    )
    parser.add_argument("--epochs", type=int, help="training epochs per cell")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--train-rows", type=int, help="train on the first N training rows")
    parser.add_argument("--eval-rows", type=int, help="evaluate on the first N rows of a split")
    parser.add_argument("--dim", type=int, help="embedding dim (default 16)")
    parser.add_argument(
        "--compress-min-rows",
        type=int,
        help="compress tables with at least this many ids (default 1000; 10000 for Criteo)",
    )
    parser.add_argument(
        "--max-table-bytes",
        type=int,
        help="skip (and record) cells whose tables would take more (default 4 GiB)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a busy 2-core machine 2 threads ran 9x slower)",
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="results directory (default %(default)s)"
    )
    parser.add_argument(
        "--restart", action="store_true", help="discard an existing results file of the study"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON result")


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _numbers(kind: type) -> Any:
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of {kind.__name__}s"
            ) from None

    return parse


def _options(arguments: argparse.Namespace) -> dict[str, Any]:
    return {
        "methods": arguments.methods,
        "budgets": arguments.budgets,
        "seeds": arguments.seeds,
        "quick": arguments.quick,
        "epochs": arguments.epochs,
        "batch_size": arguments.batch_size,
        "train_rows": arguments.train_rows,
        "eval_rows": arguments.eval_rows,
        "dim": arguments.dim,
        "compress_min_rows": arguments.compress_min_rows,
        "max_table_bytes": arguments.max_table_bytes,
    }


def run_compression(arguments: argparse.Namespace) -> int:
    study = compression_study(arguments.dataset, arguments.model, **_options(arguments))
    return _run(study, arguments)


def run_retrieval(arguments: argparse.Namespace) -> int:
    study = retrieval_study(arguments.dataset, **_options(arguments))
    return _run(study, arguments)


def _run(study: StudyConfig, arguments: argparse.Namespace) -> int:
    """Every setting is checked (the StudyConfig) before the data set is loaded or a cell runs."""
    if arguments.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {arguments.threads}")
    threads = torch.get_num_threads()
    torch.set_num_threads(arguments.threads)
    try:
        return _run_study(study, arguments)
    finally:
        torch.set_num_threads(threads)


def _run_study(study: StudyConfig, arguments: argparse.Namespace) -> int:
    started = time.monotonic()
    dataset = load_with_progress(study.dataset, show_progress=not arguments.json)
    summarize = compression_summary if study.kind == "compression" else retrieval_summary
    results = ResultsFile.open(
        arguments.out / f"{study.name}.json",
        study.settings(dataset.info),
        _command(arguments),
        summarize,
        restart=arguments.restart,
    )
    title = _title(study)
    records: list[dict[str, Any]] = []
    try:
        run_study(study, dataset, results, progress=not arguments.json, finished=records)
    finally:
        ran = sum(record["status"] == DONE for record in records)
        seconds = round(time.monotonic() - started, 3)
        results.note_invocation(seconds=seconds, cells_run=ran)
        table, image = write_reports(results.document, results.path, title)
    summary = results.document["summary"]
    output = {
        "study": study.name,
        "results": str(results.path),
        "table": str(table),
        "plot": str(image),
        "ran": ran,
        "seconds": seconds,
        "summary": summary,
    }
    line = (
        f"{title}: {summary['cells']} runs done ({ran} this time), {summary['skipped']} cells "
        f"skipped, {output['seconds']:.0f} s -> {results.path}, {table}, {image}"
    )
    emit(output, line, arguments.json)
    return 0


def _title(study: StudyConfig) -> str:
    model = MODEL_TITLES.get(study.model.name, study.model.name)
    quick = " (quick grid)" if study.quick else ""
    return f"{model} on {study.dataset}{quick}: test quality vs embedding-table memory"


def _command(arguments: argparse.Namespace) -> str:
    """The command line that reproduces this run (its parsed options, defaults left out)."""
    parts = ["embtab", "bench", arguments.study, "--dataset", arguments.dataset]
    if arguments.study == "compression":
        parts += ["--model", arguments.model]
    for flag, value in vars(arguments).items():
        if flag in ("study", "dataset", "model", "run", "json", "command", "threads", "restart"):
            continue
        if value is True:
            parts.append(f"--{flag.replace('_', '-')}")
        elif value not in (None, False):
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            parts += [f"--{flag.replace('_', '-')}", text]
    return shlex.join(parts)
