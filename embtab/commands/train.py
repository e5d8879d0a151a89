"""`embtab train` (batch training to a checkpoint) and `embtab eval CHECKPOINT`."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from embtab.commands.data import load_with_progress
from embtab.config import load_run_config, parse_override
from embtab.output import emit
from feature_store.offline import SPLITS
from models.build import plan_model
from models.checkpoint import load_checkpoint
from models.config import MODEL_CONFIGS, RunConfig, TrainConfig, to_dict
from models.distributed import DistributedConfig, train_distributed
from models.errors import ModelConfigError
from models.rank_launch import launched_by_torchrun
from models.sharded_checkpoint import export_checkpoint
from models.train import split_evaluator, train

CHECKPOINT_DIR = Path("runs")

# CLI flag -> dotted config key; flags override the config file, --set overrides both.
FLAG_KEYS = {
    "dataset": "dataset",
    "model": "model.name",
    "method": "tables.method",
    "budget": "tables.budget",
    "dim": "tables.dim",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "max_steps": "train.max_steps",
    "train_rows": "train.train_rows",
    "eval_rows": "train.eval_rows",
    "seed": "train.seed",
    "threads": "train.threads",
}


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="train a model on a data set into a checkpoint")
    parser.add_argument("--config", type=Path, help="YAML or TOML run config")
    parser.add_argument("--dataset", help="data set name (default movielens-1m)")
    parser.add_argument("--model", help=f"one of: {', '.join(sorted(MODEL_CONFIGS))}")
    parser.add_argument("--method", help="table method: full, hash, unified, qr, ...")
    parser.add_argument("--budget", type=_number, help="table budget: fraction, or int rows")
    parser.add_argument("--dim", type=int, help="embedding dim of every table")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-steps", type=int, help="stop after this many steps")
    parser.add_argument("--train-rows", type=int, help="train on the first N training rows")
    parser.add_argument("--eval-rows", type=int, help="evaluate on the first N rows of a split")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: per core)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set model.cross_layers=2 (repeatable)",
    )
    parser.add_argument(
        "--out", type=Path, help="checkpoint path (default runs/<name>.safetensors)"
    )
    parser.add_argument(
        "--nproc",
        type=int,
        help="train on N ranks (gloo) with torchrec's sharded tables: N local processes, or, "
        "under torchrun, torchrun's N ranks; --out is then a directory of per-rank shards",
    )
    parser.add_argument(
        "--sharding",
        action="append",
        default=[],
        metavar="TABLE=TYPE",
        help="with --nproc: pin a physical table to table_wise, row_wise, column_wise, "
        "table_column_wise or data_parallel (repeatable; default: the planner's choice)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="with --nproc: continue from the --out checkpoint"
    )
    parser.add_argument(
        "--export", type=Path, help="with --nproc: also write a one-file checkpoint here"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON result")
    parser.set_defaults(run=run_train)

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on a split of its data set")
    evaluate.add_argument("checkpoint", type=Path)
    evaluate.add_argument("--split", default="test", choices=SPLITS)
    evaluate.add_argument("--dataset", help="data set (default: the one it was trained on)")
    evaluate.add_argument("--rows", type=int, help="evaluate on the first N rows")
    evaluate.add_argument("--json", action="store_true", help="print a JSON result")
    evaluate.set_defaults(run=run_eval)


def _number(text: str) -> float | int:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number; a budget is a fraction in (0, 1] or an int of rows"
            ) from None


def run_config_from_arguments(arguments: argparse.Namespace) -> RunConfig:
    overrides = [
        (key, getattr(arguments, flag))
        for flag, key in FLAG_KEYS.items()
        if getattr(arguments, flag) is not None
    ]
    overrides += [parse_override(text) for text in arguments.set]
    return load_run_config(arguments.config, overrides)


def run_train(arguments: argparse.Namespace) -> int:
    run = run_config_from_arguments(arguments)
    started = time.monotonic()
    dataset = load_with_progress(run.dataset, show_progress=not arguments.json)
    plan_model(run, dataset.schema)  # every feature and table error before any training
    if arguments.nproc is not None or launched_by_torchrun():
        return run_distributed_train(arguments, run, dataset)
    out = arguments.out or CHECKPOINT_DIR / (
        f"{run.dataset}-{run.model.name}-{run.tables.method}.safetensors"
    )
    result = train(run, dataset, out, progress=not arguments.json)
    memory = result.model.embeddings.memory_bytes()["total"]
    full = sum(table.full_bytes for table in result.model.spec.tables)
    output: dict[str, Any] = {
        "dataset": run.dataset,
        "model": run.model.name,
        "method": run.tables.method,
        "budget": run.tables.budget,
        "config": to_dict(run),
        "steps": result.fit.steps,
        "stopped_early": result.fit.stopped_early,
        "examples_per_s": round(result.fit.examples_per_second, 1),
        "valid": result.valid,
        "test": result.test,
        "table_bytes": memory,
        "full_table_bytes": full,
        "checkpoint": str(result.checkpoint),
        "seconds": round(time.monotonic() - started, 1),
    }
    summary = (
        f"{run.model.name} on {run.dataset} ({_tables(run)}): "
        f"{_metrics(result.test, 'test')}; {_metrics(result.valid, 'valid')}; "
        f"{result.fit.steps} steps, {result.fit.examples_per_second:,.0f} examples/s; "
        f"tables {memory / 2**20:.2f} MiB ({memory / max(full, 1):.1%} of full); "
        f"checkpoint {result.checkpoint}"
    )
    emit(output, summary, arguments.json)
    return 0


def run_distributed_train(arguments: argparse.Namespace, run: RunConfig, dataset: Any) -> int:
    """`embtab train --nproc N`: N local ranks, tables sharded by torchrec's planner; under
    torchrun (where `--nproc` would clash with torchrun's own `--nproc-per-node`), torchrun's
    ranks."""
    sharding = dict(_pair(text) for text in arguments.sharding)
    world = arguments.nproc or int(os.environ["WORLD_SIZE"])
    config = DistributedConfig(world_size=world, threads=run.train.threads or 1, sharding=sharding)
    out = arguments.out or CHECKPOINT_DIR / (
        f"{run.dataset}-{run.model.name}-{run.tables.method}-{world}ranks"
    )
    result = train_distributed(run, dataset, config, out, resume=arguments.resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 exports and reports for all
    exported = export_checkpoint(out, arguments.export) if arguments.export else None
    output: dict[str, Any] = {
        "dataset": run.dataset,
        "model": run.model.name,
        "method": run.tables.method,
        "world_size": result.world_size,
        "config": to_dict(run),
        "steps": result.start_step + len(result.losses),
        "resumed_at_step": result.start_step,
        "final_loss": result.losses[-1] if result.losses else None,
        "examples_per_s": round(result.examples_per_second, 1),
        "valid": result.valid,
        "plan": result.plan,
        "checkpoint": str(out),
        "exported": None if exported is None else str(exported),
    }
    kinds = ", ".join(f"{table} {plan['sharding_type']}" for table, plan in result.plan.items())
    summary = (
        f"{run.model.name} on {run.dataset} over {result.world_size} ranks ({kinds}): "
        f"{_metrics(result.valid, 'valid')}; {output['steps']} steps, "
        f"{result.examples_per_second:,.0f} examples/s; checkpoint {out}"
    )
    emit(output, summary, arguments.json)
    return 0


def _pair(text: str) -> tuple[str, str]:
    table, sep, kind = text.partition("=")
    if not sep or not table or not kind:
        raise ModelConfigError(f"--sharding takes TABLE=TYPE, got {text!r}")
    return table, kind


def run_eval(arguments: argparse.Namespace) -> int:
    checkpoint = load_checkpoint(arguments.checkpoint)
    manifest = checkpoint.manifest
    name = arguments.dataset or manifest.get("dataset")
    if name is None:
        raise ModelConfigError(
            f"{arguments.checkpoint} does not name its data set; pass --dataset NAME"
        )
    dataset = load_with_progress(name, show_progress=not arguments.json)
    _check_schema(checkpoint.schema, dataset.schema)
    config = TrainConfig(eval_rows=arguments.rows)
    metrics = split_evaluator(checkpoint.model, dataset, arguments.split, config)(checkpoint.model)
    model = manifest["model"]["name"]
    output = {
        "checkpoint": str(arguments.checkpoint),
        "dataset": name,
        "split": arguments.split,
        "model": model,
        "tables": [table["method"] for table in manifest["tables"]],
        "metrics": metrics,
        "trained_metrics": manifest.get("metrics", {}),
        "versions": manifest.get("versions", {}),
    }
    summary = f"{model} from {arguments.checkpoint} on {name}: {_metrics(metrics, arguments.split)}"
    emit(output, summary, arguments.json)
    return 0


def _check_schema(trained: Any, current: Any) -> None:
    """The data set must carry the checkpoint's features with the same id spaces."""
    for spec in trained.features:
        try:
            present = current.feature(spec.name)
        except ValueError as error:
            raise ModelConfigError(f"the data set does not fit the checkpoint: {error}") from error
        if present.kind != spec.kind or present.cardinality != spec.cardinality:
            raise ModelConfigError(
                f"feature {spec.name!r} is {present.kind} with {present.cardinality} ids in the "
                f"data set but {spec.kind} with {spec.cardinality} ids in the checkpoint"
            )


def _tables(run: RunConfig) -> str:
    budget = "" if run.tables.budget is None else f", budget {run.tables.budget}"
    return f"{run.tables.method}{budget}"


def _metrics(metrics: dict, split: str) -> str:
    parts = [f"{split} AUC {metrics['auc']:.4f}"]
    if "logloss" in metrics:
        parts.append(f"logloss {metrics['logloss']:.4f}")
    parts += [f"{key} {value:.4f}" for key, value in metrics.items() if "@" in key]
    return ", ".join(parts)
