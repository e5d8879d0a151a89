"""`embtab graphhash build`: cluster a data set's user-item graph into GraphHash mappings."""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import save_file

from embedding_tables.graphhash import build_graphhash, mappings_to_tensors
from embtab.commands.data import load_with_progress
from embtab.output import emit
from feature_store.wheels import cache_dir


def register(commands: argparse._SubParsersAction) -> None:
    graphhash = commands.add_parser("graphhash", help="GraphHash mappings from interactions")
    actions = graphhash.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="cluster the training user-item graph")
    build.add_argument("--dataset", default="movielens-1m", help="data set (its train split)")
    build.add_argument(
        "--budget",
        type=float,
        required=True,
        help="rows per side: a fraction in (0, 1] of each side's cardinality, or a row count",
    )
    build.add_argument("--variant", choices=("single", "double"), default="single")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--out", type=Path, help="where to save the mappings (safetensors)")
    build.add_argument("--json", action="store_true", help="print a JSON result")
    build.set_defaults(run=run_build)


def budget_rows(budget: float, cardinality: int) -> int:
    if budget <= 0:
        raise ValueError(f"--budget must be > 0 (a fraction in (0, 1] or rows), got {budget}")
    return max(1, int(cardinality * budget)) if budget <= 1 else int(budget)


def run_build(arguments: argparse.Namespace) -> int:
    dataset = load_with_progress(arguments.dataset, show_progress=not arguments.json)
    user_column = dataset.schema.id_columns.get("user")
    item_column = dataset.schema.id_columns.get("item")
    if not user_column or not item_column:
        raise ValueError(
            f"data set {arguments.dataset!r} has no user and item id columns to build a graph "
            "from; GraphHash needs a data set with users and items (e.g. movielens-1m)"
        )
    train = dataset.read("train", [user_column, item_column])
    user_cardinality = dataset.schema.feature(user_column).cardinality
    item_cardinality = dataset.schema.feature(item_column).cardinality
    build = build_graphhash(
        train.column(user_column).to_numpy(),
        train.column(item_column).to_numpy(),
        (
            budget_rows(arguments.budget, user_cardinality),
            budget_rows(arguments.budget, item_cardinality),
        ),
        arguments.seed,
        variant=arguments.variant,
        user_feature=user_column,
        item_feature=item_column,
        user_cardinality=user_cardinality,
        item_cardinality=item_cardinality,
    )
    out = arguments.out or (
        cache_dir()
        / "graphhash"
        / f"{arguments.dataset}-{arguments.variant}-{arguments.budget:g}.safetensors"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors, metadata = mappings_to_tensors({user_column: build.user, item_column: build.item})
    partial = out.with_name(out.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    partial.replace(out)
    report = build.report
    result = {"dataset": arguments.dataset, "path": str(out), **report.to_dict()}
    summary = (
        f"graphhash {arguments.dataset} budget {arguments.budget:g}: {report.num_clusters:,} "
        f"clusters ({report.num_user_clusters:,} user, {report.num_item_clusters:,} item), "
        f"modularity {report.modularity:.4f}, ids covered: users {report.user_coverage:.1%}, "
        f"items {report.item_coverage:.1%} -> {out}"
    )
    emit(result, summary, arguments.json)
    return 0
