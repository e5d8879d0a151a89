"""`embtab data prepare NAME | --spec FILE`, `embtab data info NAME` and `embtab data load-online
NAME`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from embtab.commands.redis_options import redis_urls
from embtab.output import emit
from embtab.progress import rows_bar
from feature_store import datasets
from feature_store.artifact import RawValueError
from feature_store.offline import SPLITS, Dataset, open_prepared
from feature_store.online import OnlineFeatureStore
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

    online = actions.add_parser(
        "load-online",
        help="fill the online feature store in Redis from a prepared data set",
        description="Write the users' profiles and behaviour sequences and the items' attributes "
        "(the spec's `online:` section), as of the end of the given splits, into the online "
        "feature store that `embtab serve` reads (docs/your-data.md, section 7).",
    )
    online.add_argument("name", help="a built-in data set, or the name in your spec file")
    online.add_argument(
        "--redis",
        help="Redis URL of the online store: the one `embtab serve` reads (its --features-redis, "
        "else its first --redis URL); default: the first URL of $EMBTAB_REDIS",
    )
    online.add_argument(
        "--splits",
        default="train,valid,test",
        help="comma-separated splits, written in this order (a time split's train,valid,test is "
        "time order; the last write of a user or item wins)",
    )
    online.add_argument(
        "--max-rows", type=int, help="stop after about this many rows (whole batches)"
    )
    online.add_argument("--json", action="store_true", help="print a JSON result")
    online.set_defaults(run=run_load_online)


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


def run_load_online(arguments: argparse.Namespace) -> int:
    url = redis_urls(arguments).split(",")[0]
    dataset = load_with_progress(arguments.name, show_progress=not arguments.json)
    splits = [split for split in arguments.splits.split(",") if split]
    unknown = [split for split in splits if split not in SPLITS]
    if not splits or unknown:
        raise UsageError(f"unknown split(s) {unknown or splits}; accepted: {', '.join(SPLITS)}")
    store = OnlineFeatureStore.from_url(
        url, dataset.schema, timeout_s=30.0, preprocessing=dataset.preprocessor()
    )
    started = time.perf_counter()
    batches = (batch for split in splits for batch in dataset.iter_batches(split, 50_000))
    try:
        written = store.write_prepared(batches, arguments.max_rows)
    except RawValueError as error:
        raise UsageError(
            f"{error}; the online store is keyed by raw ids, so fill it from your own producer "
            "(docs/your-data.md, section 7), or prepare the feature with `ids: vocabulary`"
        ) from None
    seconds = time.perf_counter() - started
    layout = store.layout
    result = {
        "dataset": dataset.name,
        "splits": splits,
        "rows": written.rows,
        "skipped_rows": written.skipped,
        "user_features": list(layout.user_features),
        "item_features": list(layout.item_features),
        "sequence": layout.sequence_feature,
        "seconds": round(seconds, 3),
    }
    skipped = f", {written.skipped:,} skipped (no raw user or item id)" if written.skipped else ""
    emit(
        result,
        f"online store of {dataset.name}: {written.rows:,} events of {', '.join(splits)} written"
        f"{skipped} (users: {', '.join(layout.user_features) or 'none'}; items: "
        f"{', '.join(layout.item_features) or 'none'}; "
        f"sequence: {layout.sequence_feature or 'none'}) in {seconds:.1f} s",
        arguments.json,
    )
    return 0
