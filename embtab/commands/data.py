"""`embtab data prepare NAME | --spec FILE` and `embtab data info NAME`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from embtab.output import emit
from embtab.progress import rows_bar
from feature_store import datasets
from feature_store.offline import Dataset, open_prepared
from feature_store.wheels import DataError


class UsageError(ValueError):
    """Arguments that do not fit together; the message says which to give."""


def register(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="prepare and describe data sets")
    actions = data.add_subparsers(dest="action", required=True, metavar="ACTION")

    prepare = actions.add_parser(
        "prepare",
        help="build a data set into Parquet splits, schema and preprocessing artifact",
        description="Prepare a built-in data set by name, or your own files described by a "
        "spec file (docs/your-data.md).",
    )
    prepare.add_argument(
        "name", nargs="?", help=f"a built-in data set: {', '.join(sorted(datasets.DATASETS))}"
    )
    prepare.add_argument(
        "--spec", type=Path, help="a data-set spec file (YAML or TOML) over your own files"
    )
    prepare.add_argument("--rows", type=int, help="synthetic-criteo: number of rows")
    prepare.add_argument("--seed", type=int, default=0, help="synthetic-criteo: seed")
    prepare.add_argument(
        "--path", type=Path, action="append", help="criteo: a TSV file (repeat for days)"
    )
    prepare.add_argument("--json", action="store_true", help="print a JSON result")
    prepare.set_defaults(run=run_prepare)

    info = actions.add_parser("info", help="rows, positive rate and features of a data set")
    info.add_argument("name", help="a built-in data set, or the name in your spec file")
    info.add_argument("--json", action="store_true", help="print a JSON result")
    info.set_defaults(run=run_info)


def describe(dataset: Dataset) -> tuple[dict, str]:
    info = dataset.info
    features = {
        name: {key: value for key, value in spec.items() if value or key == "kind"}
        for name, spec in info["features"].items()
    }
    result = {
        "dataset": dataset.name,
        "path": str(dataset.root),
        "rows": info["rows"],
        "positive_rate": info["positive_rate"],
        "splits": info["splits"],
        "features": features,
    }
    for key in ("users", "items"):
        if key in info:
            result[key] = info[key]
    counts = ", ".join(f"{key} {info[key]:,}" for key in ("users", "items") if key in info)
    categorical = ", ".join(
        f"{name}={spec['cardinality']:,}"
        for name, spec in info["features"].items()
        if spec["kind"] != "dense"
    )
    summary = (
        f"{dataset.name}: {info['rows']:,} rows"
        + (f", {counts}" if counts else "")
        + f", positive rate {info['positive_rate']:.2%}; features: {categorical}"
    )
    return result, summary


def run_prepare(arguments: argparse.Namespace) -> int:
    if (arguments.name is None) == (arguments.spec is None):
        raise UsageError("give a built-in data set name or --spec FILE (one of the two)")
    title = f"prepare {arguments.name or arguments.spec}"
    started = time.perf_counter()
    with rows_bar(title, enabled=not arguments.json) as advance:
        if arguments.spec is not None:
            dataset = datasets.prepare_from_spec(arguments.spec, advance)
        else:
            dataset = datasets.prepare(
                arguments.name,
                advance,
                rows=arguments.rows,
                seed=arguments.seed,
                paths=arguments.path,
            )
    seconds = time.perf_counter() - started
    result, summary = describe(dataset)
    result["seconds"] = round(seconds, 3)
    result["rows_per_s"] = round(dataset.info["rows"] / max(seconds, 1e-9))
    emit(result, f"prepared {summary} in {seconds:.1f} s", arguments.json)
    return 0


def load_with_progress(name: str, show_progress: bool) -> Dataset:
    """The prepared data set; a progress bar appears only if it must be prepared first."""
    datasets.check_name(name)
    try:
        return open_prepared(name)
    except DataError:
        with rows_bar(f"prepare {name}", enabled=show_progress) as advance:
            return datasets.load(name, advance)


def run_info(arguments: argparse.Namespace) -> int:
    dataset = load_with_progress(arguments.name, show_progress=not arguments.json)
    result, summary = describe(dataset)
    emit(result, summary, arguments.json)
    return 0
