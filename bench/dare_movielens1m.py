"""DARE against DIN on MovieLens-1M (time split) with behaviour sequences of 50, 100, 200 items.

DARE (Feng et al. 2024, "Long-Sequence Recommendation Models Need Decoupled Embeddings") is DIN
whose item id and history read a second, narrower table for the attention scores only
(`model: dare`, `attention_dim`). For each length the bundled movielens-1m spec is prepared
again with `hist_item_id`'s `max_length` set to it (a derived spec named
`movielens-1m-hist<N>`, through `feature_store.prepare.prepare_spec`), and both models train on
it with the same seed, epochs and the defaults of `embtab train` (full tables, dim 16, batch
4096, Adam 1e-3, row-wise Adagrad 0.1, validation twice per epoch, early stopping patience 1).
The state of the best validation AUC is scored on the test split (exact AUC over its events,
or the first `--eval-rows` of them). ms per batch: the fit's training seconds (batch loading,
forward, backward, updates; no evaluation) over its steps.

    .venv/bin/python bench/dare_movielens1m.py --epochs 1 --seeds 0
    .venv/bin/python bench/dare_movielens1m.py --train-rows 250000 --eval-rows 50000 \
        --evals-per-epoch 1   # what the shared 2-core machine allowed (see the results file)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

from embtab.machine import machine_info, write_results
from feature_store import movielens
from feature_store.offline import Dataset, open_prepared
from feature_store.prepare import prepare_spec
from feature_store.wheels import DataError
from models.config import run_config_from_dict, to_dict
from models.train import train

RESULTS = Path(__file__).parent / "results" / "dare_movielens1m.json"
SEQUENCE = "hist_item_id"
MODELS = {"din": {"name": "din"}, "dare": {"name": "dare", "attention_dim": 4}}


def with_history(length: int) -> Dataset:
    """MovieLens-1M prepared with the user's last `length` items as the behaviour sequence
    (prepared once; a later run opens the copy)."""
    name = f"movielens-1m-hist{length}"
    try:
        return open_prepared(name)
    except DataError:
        bundled = movielens.spec("movielens-1m")
        features = tuple(
            dataclasses.replace(feature, max_length=length) if feature.name == SEQUENCE else feature
            for feature in bundled.features
        )
        return prepare_spec(dataclasses.replace(bundled, name=name, features=features))


def run_one(dataset: Dataset, name: str, seed: int, train_options: dict) -> dict:
    run = run_config_from_dict(
        {
            "dataset": dataset.name,
            "model": MODELS[name],
            "train": {**train_options, "seed": seed},
        }
    )
    started = time.perf_counter()
    result = train(run, dataset, progress=False)
    return {
        "model": name,
        "dataset": dataset.name,
        "seed": seed,
        "config": to_dict(run),
        "test": result.test,
        "valid": result.valid,
        "steps": result.fit.steps,
        "stopped_early": result.fit.stopped_early,
        "ms_per_batch": 1000 * result.fit.train_seconds / result.fit.steps,
        "seconds": time.perf_counter() - started,
        "table_bytes": result.model.embeddings.memory_bytes()["total"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--train-rows", type=int, default=None, help="train on the oldest N training events"
    )
    parser.add_argument(
        "--eval-rows", type=int, default=None, help="validate and test on the first N events"
    )
    parser.add_argument("--evals-per-epoch", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    train_options = {
        "epochs": arguments.epochs,
        "threads": arguments.threads,
        "train_rows": arguments.train_rows,
        "eval_rows": arguments.eval_rows,
        "evals_per_epoch": arguments.evals_per_epoch,
    }
    results = []
    summary: dict[str, float] = {}
    for length in arguments.lengths:
        dataset = with_history(length)
        for name in MODELS:
            runs = []
            for seed in arguments.seeds:
                record = run_one(dataset, name, seed, train_options)
                record["sequence_length"] = length
                runs.append(record)
                print(
                    f"len {length} {name}: seed {seed} test AUC {record['test']['auc']:.4f}, "
                    f"{record['ms_per_batch']:.0f} ms/batch ({record['steps']} steps, "
                    f"{record['seconds']:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
            results.extend(runs)
            summary[f"{name}_auc_len{length}"] = statistics.median(r["test"]["auc"] for r in runs)
            summary[f"{name}_ms_per_batch_len{length}"] = statistics.median(
                r["ms_per_batch"] for r in runs
            )
        summary[f"dare_minus_din_auc_len{length}"] = (
            summary[f"dare_auc_len{length}"] - summary[f"din_auc_len{length}"]
        )
        summary[f"dare_over_din_ms_per_batch_len{length}"] = (
            summary[f"dare_ms_per_batch_len{length}"] / summary[f"din_ms_per_batch_len{length}"]
        )
    write_results(
        arguments.out,
        machine_info(),
        results,
        summary,
        setup={
            "dataset": "movielens-1m, time split 80/10/10, rating >= 4 is a click; "
            f"{SEQUENCE} max_length set to each length",
            "models": MODELS,
            "tables": "full, dim 16, mean pooling; dare adds a dim-4 attention table for item_id",
            "train": f"batch 4096, <= {arguments.epochs} epoch(s) over the oldest "
            f"{arguments.train_rows or 'all'} training events, seeds {arguments.seeds}, Adam "
            f"1e-3, row-wise Adagrad 0.1, validation {arguments.evals_per_epoch} time(s) per "
            f"epoch on the first {arguments.eval_rows or 'all'} validation events, early "
            f"stopping patience 1, {arguments.threads} torch thread(s)",
            "test": f"AUC over the first {arguments.eval_rows or 'all'} test events",
            "figures": "medians over seeds; test AUC of the best validation state; ms per batch "
            "= training seconds / steps",
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
