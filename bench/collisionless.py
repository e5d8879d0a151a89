"""Collisionless table vs torchrec's managed-collision hashing (MCH) on one Zipf id stream.

Measures, on one CPU thread, for batches of 100k ids drawn from a Zipf(1.05) stream over 5M
distinct ids (scrambled to 63-bit raw ids):

- the id -> slot map alone (`embedding_tables.idmap.IdSlotMap`): lookups/s of a whole batch
  (duplicates included) against the ids seen so far, and inserts/s of the ids new to each
  batch; also inserts/s of batches of fresh distinct ids while the map grows to 4M ids;
- the collisionless table's id -> row step (`CollisionlessTable.map_ids`, training mode:
  counting, admission, LRU/LFU eviction at capacity) and its eval lookup (`rows_of`);
- torchrec's `ManagedCollisionCollection` with `MCHManagedCollisionModule` (LRU and LFU
  eviction policies, eviction every batch) at the same capacity: training forward (profile +
  remap) and eval remap, on the same batches.

Both at two capacities: 524,288 rows (more than one batch's distinct ids) and 32,768 (fewer).

Collisions: ids of a measured batch that do not get a row of their own and so share one
(our default row; MCH's last slot). Memory: bytes the structure holds, with and without a
16-dim fp32 row per slot; `map_bytes_per_id` divides the bytes of every tensor the id map and
the table's bookkeeping have allocated (`memory_breakdown()["map"]`: buckets, slot keys, counts,
last-seen times, entry <-> row maps, touched flags, free lists, sketch) by the ids tracked at the
end of the run. Timings are medians over the measured batches; ratios are of medians.

    .venv/bin/python bench/collisionless.py            # writes bench/results/collisionless.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import sknetwork
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.mc_modules import (
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embedding_tables.collisionless import DEFAULT_ROW, CollisionlessTable
from embedding_tables.config import TableConfig
from embedding_tables.hashing import hash64
from embedding_tables.idmap import IdSlotMap
from embedding_tables.methods import Collisionless
from embtab.machine import machine_info, write_results

BATCH = 100_000
VOCABULARY = 5_000_000
ZIPF_EXPONENT = 1.05
DIM = 16
CAPACITY = 1 << 19  # rows each side may give out: 524,288 (above one batch's distinct ids)
SMALL_CAPACITY = 1 << 15  # 32,768: below one batch's distinct ids, so both must share rows
RESULT = Path(__file__).parent / "results" / "collisionless.json"
Result = TypeVar("Result")


def zipf_stream(batches: int, seed: int) -> list[torch.Tensor]:
    """`batches` x BATCH raw ids: Zipf ranks over VOCABULARY, scrambled, non-negative int64."""
    ranks = np.arange(1, VOCABULARY + 1, dtype=np.float64)
    cdf = np.cumsum(ranks**-ZIPF_EXPONENT)
    cdf /= cdf[-1]
    rng = np.random.default_rng(seed)
    stream = []
    for _ in range(batches):
        rank = np.searchsorted(cdf, rng.random(BATCH))
        raw = hash64(torch.from_numpy(rank.astype(np.int64)), 1234) & ((1 << 63) - 1)
        stream.append(raw)
    return stream


def timed(function: Callable[..., Result], *args: object) -> tuple[Result, float]:
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def bench_map(warm: list[torch.Tensor], measured: list[torch.Tensor]) -> list[dict]:
    """The id map alone: Zipf stream get-or-insert, then lookups; fresh-id inserts while growing."""
    id_map = IdSlotMap()
    insert_seconds, inserted, insert_rates, lookup_ids_per_s = 0.0, 0, [], []
    for batch in warm + measured:
        unique_ids = torch.unique(batch)
        slots = id_map.lookup(unique_ids)
        new_ids = unique_ids[slots < 0]
        _, seconds = timed(id_map.insert_new, new_ids)
        insert_seconds += seconds
        inserted += new_ids.numel()
        insert_rates.append(new_ids.numel() / seconds)
    for batch in measured:
        _, seconds = timed(id_map.lookup, batch)
        lookup_ids_per_s.append(batch.numel() / seconds)
    zipf_map_ids = len(id_map)

    fresh_map = IdSlotMap()
    fresh_rates = []
    permutation = torch.randperm(40 * BATCH, generator=torch.Generator().manual_seed(0))
    fresh_ids = hash64(permutation, 77) & ((1 << 63) - 1)
    for start in range(0, fresh_ids.numel(), BATCH):
        batch = fresh_ids[start : start + BATCH]
        _, seconds = timed(fresh_map.insert_new, batch)
        fresh_rates.append(batch.numel() / seconds)
    return [
        {
            "case": "idmap_zipf_lookup",
            "ids_per_batch": BATCH,
            "map_ids": zipf_map_ids,
            "ids_per_s_median": statistics.median(lookup_ids_per_s),
            "ids_per_s_min": min(lookup_ids_per_s),
            "map_bytes": id_map.memory_bytes(),
            "map_bytes_per_id": id_map.memory_bytes() / zipf_map_ids,
        },
        {
            "case": "idmap_zipf_insert_new_ids",
            "batches": len(warm) + len(measured),
            "ids_inserted": inserted,
            "inserts_per_s": inserted / insert_seconds,
            "inserts_per_s_median_batch": statistics.median(insert_rates),
            "inserts_per_s_min_batch": min(insert_rates),
        },
        {
            "case": "idmap_fresh_insert_growing_to_4M",
            "ids_per_batch": BATCH,
            "inserts_per_s_median": statistics.median(fresh_rates),
            "inserts_per_s_overall": fresh_ids.numel() / sum(BATCH / r for r in fresh_rates),
            "inserts_per_s_min": min(fresh_rates),
            "map_ids": len(fresh_map),
            "map_bytes": fresh_map.memory_bytes(),
        },
    ]


def bench_table(eviction: str, capacity: int, warm: list, measured: list) -> dict:
    config = TableConfig(
        name="item_id",
        num_embeddings=VOCABULARY,
        dim=DIM,
        method=Collisionless(capacity=capacity, eviction=eviction),
    )
    table = CollisionlessTable(config, clock=lambda: 0.0)
    table.train()
    clock = [0.0]
    table.set_clock(lambda: clock[0])
    for batch in warm:
        clock[0] += 1.0
        table.map_ids(batch)
    train_rates, shared = [], 0
    for batch in measured:
        clock[0] += 1.0
        rows, seconds = timed(table.map_ids, batch)
        train_rates.append(batch.numel() / seconds)
        shared += int((rows == DEFAULT_ROW).sum())
    table.eval()
    lookup_rates = [batch.numel() / timed(table.rows_of, batch)[1] for batch in measured]
    memory = table.memory_breakdown()
    stats = table.stats()
    return {
        "case": f"collisionless_{eviction}_{capacity}",
        "capacity": capacity,
        "admitted": table.num_admitted,
        "tracked": table.num_tracked,
        "train_ids_per_s_median": statistics.median(train_rates),
        "eval_lookups_per_s_median": statistics.median(lookup_rates),
        "collision_rate": shared / sum(b.numel() for b in measured),
        "evicted_capacity": stats["evicted_capacity"],
        "rejected": stats["rejected"],
        "memory_bytes_with_rows": memory["map"] + memory["rows"],
        "memory_bytes_with_rows_and_optimizer": memory["map"]
        + memory["rows"]
        + memory["optimizer"],
        "memory_bytes_map_only": memory["map"],
        "memory_bytes_evicted_ids_not_drained": memory["evicted_ids"],
        "map_bytes_per_id": memory["map"] / table.num_tracked,
    }


def bench_mch(eviction: str, capacity: int, warm: list, measured: list) -> dict:
    zch_size = capacity + 1  # capacity rows of their own + the slot misses share
    policy = LRU_EvictionPolicy() if eviction == "lru" else LFU_EvictionPolicy()
    module = MCHManagedCollisionModule(
        zch_size=zch_size, device=torch.device("cpu"), eviction_policy=policy, eviction_interval=1
    )
    config = EmbeddingBagConfig(
        name="item_id", embedding_dim=DIM, num_embeddings=zch_size, feature_names=["item_id"]
    )
    collection = ManagedCollisionCollection({"item_id": module}, [config])
    lengths = torch.ones(BATCH, dtype=torch.int64)

    def remap(batch: torch.Tensor) -> torch.Tensor:
        features = KeyedJaggedTensor.from_lengths_sync(["item_id"], batch, lengths)
        return collection(features).values()

    collection.train()
    for batch in warm:
        remap(batch)
    train_rates, shared = [], 0
    for batch in measured:
        rows, seconds = timed(remap, batch)
        train_rates.append(batch.numel() / seconds)
        shared += int((rows == zch_size - 1).sum())
    collection.eval()
    lookup_rates = [batch.numel() / timed(remap, batch)[1] for batch in measured]
    map_bytes = sum(b.numel() * b.element_size() for b in collection.buffers())
    history = module._history_accumulator  # torchrec keeps this one outside its buffers
    map_bytes += history.numel() * history.element_size()
    row_bytes = zch_size * DIM * 4
    return {
        "case": f"torchrec_mch_{eviction}_{capacity}",
        "capacity": capacity,
        "eviction_interval": 1,
        "train_ids_per_s_median": statistics.median(train_rates),
        "eval_lookups_per_s_median": statistics.median(lookup_rates),
        "collision_rate": shared / sum(b.numel() for b in measured),
        "memory_bytes_with_rows": map_bytes + row_bytes,
        "memory_bytes_map_only": map_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warm-batches", type=int, default=20)
    parser.add_argument("--measured-batches", type=int, default=20)
    parser.add_argument("--output", type=Path, default=RESULT)
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    host = machine_info(**{"scikit-network": sknetwork.__version__})
    stream = zipf_stream(arguments.warm_batches + arguments.measured_batches, seed=0)
    warm, measured = stream[: arguments.warm_batches], stream[arguments.warm_batches :]
    print(f"stream: {len(stream)} batches of {BATCH} ids", flush=True)

    results = bench_map(warm, measured)
    print(json.dumps(results, indent=1), flush=True)
    for capacity in (CAPACITY, SMALL_CAPACITY):
        for eviction in ("lru", "lfu"):
            for bench in (bench_table, bench_mch):
                results.append(bench(eviction, capacity, warm, measured))
                print(json.dumps(results[-1], indent=1), flush=True)

    by_case = {result["case"]: result for result in results}
    ours_lru, mch_lru = (
        by_case[f"collisionless_lru_{CAPACITY}"],
        by_case[f"torchrec_mch_lru_{CAPACITY}"],
    )
    ours_small = by_case[f"collisionless_lru_{SMALL_CAPACITY}"]
    mch_small = by_case[f"torchrec_mch_lru_{SMALL_CAPACITY}"]
    summary = {
        "lookups_per_s": by_case["idmap_zipf_lookup"]["ids_per_s_median"],
        "map_bytes_per_id": ours_lru["map_bytes_per_id"],
        "map_bytes_per_id_small_capacity": ours_small["map_bytes_per_id"],
        "idmap_bytes_per_id": by_case["idmap_zipf_lookup"]["map_bytes_per_id"],
        "inserts_per_s": by_case["idmap_zipf_insert_new_ids"]["inserts_per_s"],
        "mch_lookups_per_s": mch_lru["eval_lookups_per_s_median"],
        "fresh_inserts_per_s": by_case["idmap_fresh_insert_growing_to_4M"]["inserts_per_s_overall"],
        "table_lookups_per_s": ours_lru["eval_lookups_per_s_median"],
        "table_train_ids_per_s_lru": ours_lru["train_ids_per_s_median"],
        "mch_train_ids_per_s_lru": mch_lru["train_ids_per_s_median"],
        "collision_rate_lru_small_capacity": ours_small["collision_rate"],
        "mch_collision_rate_lru_small_capacity": mch_small["collision_rate"],
        "lookup_speedup_vs_mch": ours_lru["eval_lookups_per_s_median"]
        / mch_lru["eval_lookups_per_s_median"],
        "train_speedup_vs_mch_lru": ours_lru["train_ids_per_s_median"]
        / mch_lru["train_ids_per_s_median"],
    }
    write_results(
        arguments.output,
        host,
        results,
        summary,
        config={
            "batch": BATCH,
            "vocabulary": VOCABULARY,
            "zipf_exponent": ZIPF_EXPONENT,
            "capacities": [CAPACITY, SMALL_CAPACITY],
            "dim": DIM,
            "warm_batches": arguments.warm_batches,
            "measured_batches": arguments.measured_batches,
        },
    )


if __name__ == "__main__":
    main()
