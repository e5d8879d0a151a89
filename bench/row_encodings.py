"""What serving's row encodings cost in quality: test AUC of a model read back from Redis.

Each model trains once on MovieLens-1M (time split, the defaults of `embtab train`), is
published into an embedded Redis with every row encoding (fp32, fp16, int8, int4), and is read
back the way `embtab serve` reads it: the version's manifest and dense blob from Redis, every
table's rows scanned from Redis and decoded. That served model scores the whole test split; the
figures are its AUC next to the trained model's own, and the bytes a row takes in Redis.

    .venv/bin/python bench/row_encodings.py [--models dcn deepfm] [--methods full qr]
"""

# ruff: noqa: E402 (the path fix below must run before the imports)
from __future__ import annotations

import sys
from pathlib import Path

# bench/serving.py is named like the `serving` package: keep this directory off the import path.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse
import time

import torch

from embtab.machine import machine_info, write_results
from embtab.services import start_redis
from feature_store.datasets import load
from models.base import Model
from models.batches import BatchLoader
from models.checkpoint import manifest_of
from models.config import run_config_from_dict
from models.train import EVAL_BATCH_SIZE, evaluate, train
from serving.published_model import publish_model, servable_model
from serving.publisher import ParamPublisher
from serving.reader import ParamReader
from serving.redis_nodes import RedisConfig, RedisNodes
from serving.row_encoding import ENCODINGS, row_bytes

RESULTS = Path(__file__).parent / "results" / "row_encodings.json"
# The tables each method gets (budgets as `embtab train --method M --budget B`).
METHODS = {"full": {"method": "full"}, "qr": {"method": "qr", "budget": 0.1}}


def served_auc(
    model: Model, nodes: RedisNodes, name: str, encoding: str, loader: BatchLoader
) -> float:
    """Publish `model` with `encoding`, rebuild it from Redis alone, and score the test split."""
    publish_model(ParamPublisher(nodes, name), model, manifest_of(model), encoding=encoding)
    reader = ParamReader(nodes, name)
    version = reader.live_version()
    manifest = reader.manifest(version)
    dense = reader.dense(version, reader.head(version).dense_revision)
    served = servable_model(manifest.model_manifest, dense.tensors)
    for layout in manifest.tables:
        ids, rows = reader.scan_table(manifest, layout.name)
        served.embeddings.load_rows(layout.name, torch.from_numpy(ids), torch.from_numpy(rows))
    return evaluate(served, loader)["auc"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["dcn", "deepfm"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    dataset = load("movielens-1m")
    server = start_redis()
    nodes = RedisNodes(RedisConfig.parse(f"redis://127.0.0.1:{server.port}/0"))
    results, summary = [], {}
    try:
        for model_name in arguments.models:
            for method in arguments.methods:
                run = run_config_from_dict(
                    {
                        "dataset": dataset.name,
                        "model": {"name": model_name},
                        "tables": METHODS[method],
                        "train": {"epochs": arguments.epochs, "seed": arguments.seed},
                    }
                )
                started = time.perf_counter()
                trained = train(run, dataset, progress=False)
                loader = BatchLoader(dataset, "test", trained.model.schema, EVAL_BATCH_SIZE)
                row = {
                    "model": model_name,
                    "method": method,
                    "trained_auc": trained.test["auc"],
                    "encodings": {},
                }
                dim = trained.model.spec.tables[0].dim
                for encoding in ENCODINGS:
                    name = f"bench-{model_name}-{method}-{encoding}"
                    auc = served_auc(trained.model, nodes, name, encoding, loader)
                    width = row_bytes(encoding, dim)
                    row["encodings"][encoding] = {"served_auc": auc, "row_bytes": width}
                    key = f"{model_name}_{method}_{encoding}"
                    summary[f"{key}_auc_minus_fp32"] = auc - row["encodings"]["fp32"]["served_auc"]
                    print(
                        f"{model_name} {method} {encoding}: served AUC {auc:.5f} "
                        f"(trained {trained.test['auc']:.5f}), {width} bytes/row",
                        flush=True,
                    )
                row["seconds"] = time.perf_counter() - started
                results.append(row)
    finally:
        nodes.close()
        server.stop()
    write_results(arguments.out, machine_info(), results, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
