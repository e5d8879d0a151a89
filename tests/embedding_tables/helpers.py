"""Shared builders for the embedding_tables tests: configs per method and random KJTs."""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embedding_tables.config import TableConfig
from embedding_tables.methods import QR, ROBE, TTRec, Unified


def method_case(method: str, pooling: str = "sum", dtype: str = "fp32"):
    """(tables, feature_to_table) exercising `method`: shared tables, several dims."""
    common = {"pooling": pooling, "dtype": dtype}
    if method == "full":
        tables = [
            TableConfig("t0", 50, 8, "full", **common),
            TableConfig("t1", 30, 4, "full", **common),
        ]
        return tables, {"f0": "t0", "f1": "t1", "f2": "t0"}
    if method == "hash":
        tables = [
            TableConfig("t0", 10_000, 8, "hash", budget=64, seed=3, **common),
            TableConfig("t1", 500, 12, "hash", budget=0.1, **common),
        ]
        return tables, {"f0": "t0", "f1": "t1", "f2": "t0"}
    if method == "unified":
        chunks = {"f0": 3, "f2": 2}
        tables = [
            TableConfig("u", 1000, 4, Unified(feature_chunks=chunks), budget=40, **common),
            TableConfig("v", 100, 8, "unified", budget=16, seed=9, **common),
        ]
        return tables, {"f0": "u", "f1": "u", "f2": "u", "f3": "v"}
    if method.startswith("qr_"):
        combine = method.removeprefix("qr_")
        wide = 12 if combine == "concat" else 4
        tables = [
            TableConfig("t0", 200, 8, QR(combine=combine), **common),
            TableConfig(
                "t1", 300, wide, QR(combine=combine, num_partitions=3), budget=0.2, **common
            ),
        ]
        return tables, {"f0": "t0", "f1": "t1", "f2": "t0"}
    if method == "robe":
        tables = [
            TableConfig("t0", 10_000, 16, ROBE(block_size=4), budget=0.01, seed=3, **common),
            TableConfig("t1", 500, 8, ROBE(block_size=8), budget=0.1, **common),
        ]
        return tables, {"f0": "t0", "f1": "t1", "f2": "t0"}
    if method == "ttrec":
        tables = [
            TableConfig("t0", 3000, 16, TTRec(rank=4), budget=0.05, seed=3, **common),
            TableConfig("t1", 500, 8, TTRec(rank=2, num_cores=2, dim_factors=(2, 4)), **common),
            TableConfig("t2", 4000, 8, TTRec(rank=2, num_cores=4), budget=0.2, **common),
        ]
        return tables, {"f0": "t0", "f1": "t1", "f2": "t0", "f3": "t2"}
    if method == "mixed":
        tables = [
            TableConfig("full", 40, 4, "full", **common),
            TableConfig("hashed", 5000, 8, "hash", budget=32, **common),
            TableConfig("group", 800, 4, Unified(feature_chunks={"g0": 2}), budget=20, **common),
            TableConfig("qm", 150, 8, QR(combine="mult"), **common),
            TableConfig("qa", 150, 4, QR(combine="add"), **common),
        ]
        return tables, {
            "hashed": "hashed",
            "g0": "group",
            "full": "full",
            "qm": "qm",
            "g1": "group",
            "qa": "qa",
        }
    raise ValueError(method)


def id_limit(tables: list[TableConfig], feature_to_table: dict[str, str], feature: str) -> int:
    config = next(t for t in tables if t.name == feature_to_table[feature])
    return config.num_embeddings


def random_kjt(
    tables: list[TableConfig],
    feature_to_table: dict[str, str],
    batch: int = 5,
    max_len: int = 4,
    weighted: bool = False,
    seed: int = 0,
    any_int64: bool = False,
) -> KeyedJaggedTensor:
    """A KJT over every feature, with empty bags; ids in range for full/qr tables (any int64
    for hash/unified when `any_int64`)."""
    generator = torch.Generator().manual_seed(seed)
    keys = list(feature_to_table)
    lengths = torch.randint(0, max_len + 1, (len(keys), batch), generator=generator)
    lengths[:, 0] = 0  # an empty bag in every feature
    values = []
    for i, key in enumerate(keys):
        count = int(lengths[i].sum())
        config = next(t for t in tables if t.name == feature_to_table[key])
        if any_int64 and config.method.name in ("hash", "unified", "robe"):
            ids = torch.randint(-(2**62), 2**62, (count,), generator=generator) * 2
        else:
            ids = torch.randint(0, config.num_embeddings, (count,), generator=generator)
        values.append(ids)
    weights = torch.rand(int(lengths.sum()), generator=generator) + 0.5 if weighted else None
    return KeyedJaggedTensor(
        keys=keys, values=torch.cat(values), lengths=lengths.flatten(), weights=weights
    )


def slots_of(transforms: list) -> list[tuple]:
    """A BatchedTransform's slots: (transform, physical table index) for every table of each."""
    return [(t, j) for t in transforms for j in range(len(t.tables))]
