"""Distributed training throughput: 1 rank against 2 ranks on this machine (gloo, CPU).

DCN-v2 on MovieLens-1M (9 sparse features incl. a genre bag and a 20-item history, 2 dense),
tables sharded by torchrec's planner (its own choice among table-, row-, column- and
table-column-wise), dense part data-parallel, the same global batch of 4096 and the same steps
on 1 and on 2 ranks, 1 torch thread per rank. Examples/s counts the global batch over the time
of the training steps (forward, all-to-alls, backward with the fused row-wise Adagrad, DDP
all-reduce, Adam), measured on rank 0; process start, planning and data loading are not in it.
The runs alternate (1, 2, 1, 2, ...) so that load from other processes hits both alike; the
summary takes the median per world size. The loss gap is the largest difference of the global
batch loss at the same step between the 1-rank and the 2-rank run of the first round.

The script also runs torchrec's planner (nothing allocated: tables on the meta device) for the
Criteo-1TB tables of MLPerf DLRM (26 tables, ids capped at 40M, dim 128: 204M rows, 104.5 GB of
fp32) on the topologies docs/scale.md discusses, and records each plan; and it measures what one
embedded Redis node serves: pipelined HMGETs of 100 rows of 64 bytes over 16 shard hashes, from
2 client processes, for --redis-seconds, and the memory one stored row takes.

    .venv/bin/python bench/scale.py
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis
from torch import nn
from torchrec.distributed.planner import Topology

from embedding_tables.config import TableConfig
from embedding_tables.optimizer import SparseOptimizerConfig
from embedding_tables.sharding import ShardableEmbeddingCollection
from embtab.machine import machine_info, write_results
from embtab.services import start_redis
from feature_store.datasets import load
from models.config import DCNConfig, RunConfig, TablesConfig, TrainConfig
from models.distributed import DistributedConfig, train_distributed
from models.sharding_plan import plan_sharding

RESULTS = Path(__file__).parent / "results" / "scale.json"
# MLPerf DLRM on Criteo 1TB: per-feature cardinalities with ids hashed into at most 40M rows
# (torchrec's DLRM example, --num_embeddings_per_feature), embedding dim 128.
CRITEO_1TB_CARDINALITIES = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
)  # fmt: skip
CRITEO_1TB_DIM = 128
GiB = 2**30
# (name, world size, ranks per host, device, memory per rank in GiB)
TOPOLOGIES = (
    ("1 host x 8 GPUs of 80 GB (H100)", 8, 8, "cuda", 80),
    ("2 hosts x 8 GPUs of 80 GB (H100)", 16, 8, "cuda", 80),
    ("1 host x 8 GPUs of 16 GB (V100)", 8, 8, "cuda", 16),
    ("1 host x 4 GPUs of 24 GB (L4)", 4, 4, "cuda", 24),
    ("4 CPU hosts, 1 rank of 256 GB DRAM each", 4, 1, "cpu", 256),
)
ROW_BYTES = 64
ROWS_PER_REQUEST = 100
SHARDS = 16


class _Tables(nn.Module):
    """What plan_sharding reads of a model: its `embeddings`."""

    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.embeddings = embeddings


class _Spec:
    sparse_optimizer = SparseOptimizerConfig()


def criteo_1tb_plans() -> list[dict[str, Any]]:
    """torchrec's plan of the Criteo-1TB tables on each of TOPOLOGIES."""
    tables = [
        TableConfig(name=f"cat_{i}", num_embeddings=rows, dim=CRITEO_1TB_DIM)
        for i, rows in enumerate(CRITEO_1TB_CARDINALITIES)
    ]
    shell = _Tables(
        ShardableEmbeddingCollection(tables, {t.name: t.name for t in tables}, device="meta")
    )
    plans = []
    for name, world, local, device, memory_gib in TOPOLOGIES:
        memory = (
            {"hbm_cap": memory_gib * GiB} if device == "cuda" else {"ddr_cap": memory_gib * GiB}
        )
        topology = Topology(
            world_size=world, local_world_size=local, compute_device=device, **memory
        )
        try:
            plan = plan_sharding(
                shell, world, {}, _Spec(), compute_device=device, topology=topology
            )
        except ValueError as error:
            plans.append({"topology": name, "error": str(error)})
            continue
        per_table = {
            table: {
                "sharding_type": parameter.sharding_type,
                "compute_kernel": parameter.compute_kernel,
                "ranks": parameter.ranks,
            }
            for table, parameter in plan.plan["embeddings.pooled"].items()
        }
        plans.append({"topology": name, "tables": per_table})
    return plans


def _hmget_client(port: int, seconds: float, seed: int, out: Any) -> None:
    client = redis.Redis(port=port, socket_timeout=5)
    rng = np.random.default_rng(seed)
    rows = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pipe = client.pipeline(transaction=False)
        ids = rng.integers(0, 100_000, ROWS_PER_REQUEST)
        for shard in range(SHARDS):
            fields = [int(i).to_bytes(8, "little") for i in ids[ids % SHARDS == shard]]
            if fields:
                pipe.hmget(f"bench:rows:{{m:{shard}}}", fields)
        pipe.execute()
        rows += ROWS_PER_REQUEST
    out.put(rows)


def redis_node_rows_per_s(seconds: float, clients: int = 2) -> dict[str, float]:
    """Rows/s one embedded redis-server returns to `clients` processes of pipelined HMGETs."""
    server = start_redis()
    try:
        loader = redis.Redis(port=server.port)
        empty = loader.info("memory")["used_memory"]
        row = bytes(ROW_BYTES)
        for shard in range(SHARDS):
            ids = range(shard, 100_000, SHARDS)
            loader.hset(
                f"bench:rows:{{m:{shard}}}", mapping={i.to_bytes(8, "little"): row for i in ids}
            )
        loaded = loader.info("memory")["used_memory"]
        loader.close()
        context = multiprocessing.get_context("spawn")
        out = context.Queue()
        processes = [
            context.Process(target=_hmget_client, args=(server.port, seconds, seed, out))
            for seed in range(clients)
        ]
        for process in processes:
            process.start()
        rows = sum(out.get(timeout=seconds + 60) for _ in processes)
        for process in processes:
            process.join(10)
    finally:
        server.stop()
    return {
        "rows_per_s": rows / seconds,
        "requests_per_s": rows / seconds / ROWS_PER_REQUEST,
        "clients": clients,
        "rows_per_request": ROWS_PER_REQUEST,
        "row_bytes": ROW_BYTES,
        "memory_bytes_per_row": (loaded - empty) / 100_000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="movielens-1m")
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per world size")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--redis-seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    arguments = parser.parse_args()

    dataset = load(arguments.dataset)
    run = RunConfig(
        dataset=arguments.dataset,
        model=DCNConfig(),
        tables=TablesConfig(method="full"),
        train=TrainConfig(
            batch_size=arguments.batch_size,
            epochs=1,
            max_steps=arguments.steps,
            eval_rows=arguments.batch_size,
            threads=1,
        ),
    )
    machine = machine_info()
    results = []
    for round_ in range(arguments.rounds):
        for world in (1, 2):
            result = train_distributed(run, dataset, DistributedConfig(world_size=world))
            results.append(
                {
                    "round": round_,
                    "world_size": world,
                    "steps": len(result.losses),
                    "examples": result.examples,
                    "train_seconds": round(result.train_seconds, 3),
                    "examples_per_s": round(result.examples_per_second, 1),
                    "losses": result.losses,
                    "valid": result.valid,
                    "plan": {t: p["sharding_type"] for t, p in result.plan.items()},
                }
            )
            print(
                f"round {round_} {world} rank(s): {result.examples_per_second:,.0f} examples/s, "
                f"final loss {result.losses[-1]:.5f}",
                flush=True,
            )
    speed = {
        world: statistics.median(r["examples_per_s"] for r in results if r["world_size"] == world)
        for world in (1, 2)
    }
    plans = criteo_1tb_plans()
    node = redis_node_rows_per_s(arguments.redis_seconds)
    print(f"one redis node: {node['rows_per_s']:,.0f} rows/s", flush=True)
    first = {r["world_size"]: r["losses"] for r in results if r["round"] == 0}
    gap = max(abs(a - b) for a, b in zip(first[1], first[2], strict=True))
    write_results(
        arguments.out,
        machine,
        results,
        {
            "examples_per_s_1rank": speed[1],
            "examples_per_s_2rank": speed[2],
            "speedup_2rank_vs_1rank": speed[2] / speed[1],
            "loss_gap_2rank_vs_1rank": gap,
            "redis_node_rows_per_s": node["rows_per_s"],
        },
        setup={
            "dataset": arguments.dataset,
            "model": "dcn",
            "tables": "full, mean pooling, dim 16",
            "global_batch": arguments.batch_size,
            "threads_per_rank": 1,
            "backend": "gloo on loopback",
        },
        criteo_1tb_plans=plans,
        redis_node=node,
    )


if __name__ == "__main__":
    main()
