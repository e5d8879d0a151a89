"""DCN-v2 training throughput: our EmbeddingCollection against torchrec's EmbeddingBagCollection.

The same DCN-v2 body (models.dcn.DCN), the same batches of 4096, the same Adam on the dense
part; only the embedding module differs:

- `ours-full` / `ours-qr`: embedding_tables.EmbeddingCollection, row-wise Adagrad fused into
  backward (fbgemm TBE on CPU);
- `torchrec-ebc`: torchrec.modules.EmbeddingBagCollection (one nn.EmbeddingBag per table) with
  sparse gradients and torch.optim.Adagrad on the tables (torch has no row-wise Adagrad; this
  is the standard sparse-gradient setup for an unsharded EBC).

Data: MovieLens-1M (9 sparse features incl. a genre bag and a 20-item history, 2 dense) and the
26-feature synthetic Criteo at Criteo-Kaggle cardinalities (33.8M ids; the full tables hold
2.2 GB of fp32), generated in memory. Cases are timed in interleaved rounds (every case runs
`--steps` steps per round) so that load from other processes hits them alike; the reported
time per batch is the median over all timed steps, ratios are ratios of medians. A separate
end-to-end run through the Parquet loader gives examples/s for DCN on MovieLens-1M.

    .venv/bin/python bench/train_throughput.py
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embtab.machine import machine_info, write_results
from feature_store.datasets import load
from feature_store.schema import Schema
from feature_store.synthetic import SyntheticCriteo, SyntheticCriteoConfig
from models.batches import Batch, BatchLoader, batch_from_columns
from models.build import build_model, plan_model
from models.config import DCNConfig, RunConfig, TablesConfig, TrainConfig
from models.dcn import DCN
from models.train import dense_optimizer, train_step

BATCH = 4096
RESULTS = Path(__file__).parent / "results" / "train_throughput.json"


class TorchrecEmbeddings(nn.Module):
    """torchrec's EmbeddingBagCollection behind the two calls a model makes of its tables."""

    def __init__(self, schema: Schema, dim: int, pooling: PoolingType) -> None:
        super().__init__()
        readers: dict[str, list[str]] = {spec.name: [spec.name] for spec in schema.categorical}
        for spec in schema.sequence:
            readers[spec.shares_ids_with].append(spec.name)
        self.ebc = EmbeddingBagCollection(
            [
                EmbeddingBagConfig(
                    num_embeddings=spec.cardinality,
                    embedding_dim=dim,
                    name=spec.name,
                    feature_names=readers[spec.name],
                    pooling=pooling,
                )
                for spec in schema.categorical
            ]
        )
        for bag in self.ebc.embedding_bags.values():
            bag.sparse = True
        self.dim = dim

    def output_dim(self, feature: str) -> int:
        return self.dim

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.ebc(features)


class TorchrecDCN:
    """The DCN body on torchrec's EBC; Adam for the body, sparse Adagrad for the tables."""

    def __init__(self, schema: Schema, train: TrainConfig) -> None:
        embeddings = TorchrecEmbeddings(schema, 16, PoolingType.MEAN)
        self.model = DCN(DCNConfig(), schema, embeddings)
        tables = list(embeddings.parameters())
        table_ids = {id(p) for p in tables}
        dense = [p for p in self.model.parameters() if id(p) not in table_ids]
        self.dense = torch.optim.Adam(dense, lr=train.dense_lr)
        self.sparse = torch.optim.Adagrad(tables, lr=train.sparse_lr)
        self.table_bytes = sum(p.numel() * p.element_size() for p in tables)

    def step(self, batch: Batch) -> float:
        self.model.train()
        self.dense.zero_grad(set_to_none=True)
        self.sparse.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(
            self.model(batch.sparse, batch.dense), batch.labels
        )
        loss.backward()
        self.dense.step()
        self.sparse.step()
        return float(loss.detach())


class OursDCN:
    def __init__(self, schema: Schema, train: TrainConfig, tables: TablesConfig) -> None:
        run = RunConfig(dataset=schema.dataset, model=DCNConfig(), tables=tables, train=train)
        self.model = build_model(plan_model(run, schema))
        self.optimizer = dense_optimizer(self.model, train)
        self.table_bytes = self.model.embeddings.memory_bytes()["total"]

    def step(self, batch: Batch) -> float:
        return train_step(self.model, batch, self.optimizer)


def movielens_batches(count: int) -> tuple[Schema, list[Batch]]:
    dataset = load("movielens-1m")
    loader = BatchLoader(dataset, "train", dataset.schema, BATCH, shuffle=True, seed=0)
    batches = []
    with contextlib.closing(iter(loader)) as stream:
        for batch in stream:
            batches.append(batch)
            if len(batches) == count:
                break
    return dataset.schema, batches


def criteo_batches(count: int) -> tuple[Schema, list[Batch]]:
    generator = SyntheticCriteo(SyntheticCriteoConfig(rows=count * BATCH, chunk_rows=BATCH))
    schema = generator.schema()
    return schema, [batch_from_columns(generator.chunk(i), schema) for i in range(count)]


def time_cases(cases: dict, batches: list[Batch], steps: int, rounds: int, warmup: int) -> dict:
    """Per case: seconds of every timed step, cases interleaved round by round."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for case in cases.values():
        for batch in batches[:warmup]:
            case.step(batch)
    position = warmup
    for _ in range(rounds):
        for name, case in cases.items():
            for offset in range(steps):
                batch = batches[(position + offset) % len(batches)]
                started = time.perf_counter()
                case.step(batch)
                times[name].append(time.perf_counter() - started)
        position += steps
    return times


def end_to_end_examples_per_second(steps: int, train: TrainConfig) -> dict:
    """DCN (full tables) on MovieLens-1M through the prefetching Parquet loader."""
    dataset = load("movielens-1m")
    run = RunConfig(model=DCNConfig(), train=train)
    model = build_model(plan_model(run, dataset.schema))
    optimizer = dense_optimizer(model, train)
    loader = BatchLoader(dataset, "train", model.schema, BATCH, shuffle=True, seed=1)
    examples, seconds = 0, 0.0
    with contextlib.closing(iter(loader)) as stream:
        started = time.perf_counter()
        for index, batch in enumerate(stream):
            train_step(model, batch, optimizer, index)
            if index == 4:  # after warm-up (and after the loader's first read of the split)
                started, examples = time.perf_counter(), 0
            elif index > 4:
                examples += batch.size
            if index == steps + 4:
                break
        seconds = time.perf_counter() - started
    return {
        "steps": steps,
        "examples": examples,
        "seconds": seconds,
        "examples_per_s": examples / seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per case per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--qr-budget", type=float, default=0.1)
    parser.add_argument("--end-to-end-steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    train = TrainConfig()
    needed = arguments.warmup + arguments.steps * arguments.rounds
    results, ratios = [], {}
    for dataset, make in (
        ("movielens-1m", movielens_batches),
        ("synthetic-criteo", criteo_batches),
    ):
        schema, batches = make(min(needed, 40))
        cases = {
            "ours-full": OursDCN(schema, train, TablesConfig(method="full")),
            "torchrec-ebc": TorchrecDCN(schema, train),
            "ours-qr": OursDCN(
                schema, train, TablesConfig(method="qr", budget=arguments.qr_budget)
            ),
        }
        times = time_cases(cases, batches, arguments.steps, arguments.rounds, arguments.warmup)
        medians = {name: statistics.median(seconds) for name, seconds in times.items()}
        for name, seconds in times.items():
            results.append(
                {
                    "dataset": dataset,
                    "case": name,
                    "batch_size": BATCH,
                    "table_bytes": cases[name].table_bytes,
                    "median_s_per_batch": medians[name],
                    "examples_per_s": BATCH / medians[name],
                    "timed_steps": len(seconds),
                    "min_s": min(seconds),
                    "max_s": max(seconds),
                    "vs_torchrec": medians[name] / medians["torchrec-ebc"],
                }
            )
            ratio = medians[name] / medians["torchrec-ebc"]
            print(
                f"{dataset:17s} {name:13s} {medians[name] * 1e3:8.1f} ms/batch "
                f"({BATCH / medians[name]:9,.0f} ex/s), x{ratio:.2f} of torchrec",
                file=sys.stderr,
            )
        ratios[dataset] = medians["ours-full"] / medians["torchrec-ebc"]
        del cases, batches
    end_to_end = end_to_end_examples_per_second(arguments.end_to_end_steps, train)
    results.append({"dataset": "movielens-1m", "case": "ours-full end-to-end", **end_to_end})
    print(f"end to end: {end_to_end['examples_per_s']:,.0f} examples/s", file=sys.stderr)
    write_results(
        arguments.out,
        machine_info(),
        results,
        {
            "full_vs_torchrec": max(ratios.values()),
            "full_vs_torchrec_ml1m": ratios["movielens-1m"],
            "full_vs_torchrec_criteo": ratios["synthetic-criteo"],
            "examples_per_s_dcn_ml1m": end_to_end["examples_per_s"],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
