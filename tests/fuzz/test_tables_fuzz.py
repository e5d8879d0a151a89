"""Property tests of every table method over arbitrary int64 ids, bag shapes and weights.

Each example is one KeyedJaggedTensor of two features (batch 0..5, bags of 0..5 ids drawn from
a small pool of arbitrary int64 values so that ids repeat, optional per-id weights). Pooled and
sequence lookups must agree with each other, be finite and of the right shape, give one id the
same row wherever it appears, map ids to rows that exist, and raise a typed error naming the
feature and the id for what a method does not accept. Example counts are bounded (see
EXAMPLES) so that the whole file runs in seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embedding_tables import (
    EmbeddingCollection,
    IdError,
    OffsetsError,
    SparseOptimizerConfig,
    TableConfig,
)
from embedding_tables.collisionless import DEFAULT_ROW
from embedding_tables.graphhash import build_graphhash
from embedding_tables.methods import QR, ROBE, Collisionless, Full, TTRec, Unified

EXAMPLES = 40  # per method and test; 11 methods x 3 tests x 40 = 1,320 inputs
INT64 = st.integers(-(2**63), 2**63 - 1)
FEATURES = ("a", "b")
BOUNDED = 50  # cardinality of the tables that take ids in range only


def _graphhash_mapping(rows: int):
    rng = np.random.default_rng(0)
    users = rng.integers(0, 60, 2000)
    items = (users * 7 + rng.integers(0, 20, 2000)) % BOUNDED
    built = build_graphhash(
        users, items, (15, rows), 0, user_cardinality=60, item_cardinality=BOUNDED
    )
    return built.item


def _collection(method: str) -> EmbeddingCollection:
    """Two features over `method`'s tables: one shared table for both where the method allows."""
    adagrad = SparseOptimizerConfig("rowwise_adagrad", lr=0.1)
    mappings = None
    if method == "full":
        tables = [TableConfig("t", BOUNDED, 4, "full", pooling="mean")]
    elif method == "full_hashed":
        tables = [TableConfig("t", BOUNDED, 4, Full(out_of_range="hash"), seed=3)]
    elif method == "hash":
        tables = [TableConfig("t", 10**9, 4, "hash", budget=64, seed=1)]
    elif method == "unified":
        tables = [TableConfig("t", 10**6, 4, Unified(feature_chunks={"a": 3}), budget=40)]
    elif method.startswith("qr_"):
        combine = method.removeprefix("qr_")
        dim = 12 if combine == "concat" else 4  # concat splits dim over the 3 partitions
        tables = [TableConfig("t", BOUNDED, dim, QR(combine=combine, num_partitions=3))]
    elif method == "robe":
        tables = [TableConfig("t", 10**9, 8, ROBE(block_size=4), budget=64, seed=2)]
    elif method == "ttrec":
        tables = [TableConfig("t", BOUNDED, 4, TTRec(rank=4))]
    elif method == "collisionless":
        tables = [TableConfig("t", 10**6, 4, Collisionless(capacity=64, min_count=2))]
    elif method == "graphhash":
        tables = [TableConfig("t", BOUNDED, 4, "graphhash", budget=0.4)]
        mappings = {"t": _graphhash_mapping(20)}
    else:
        raise ValueError(method)
    return EmbeddingCollection(tables, dict.fromkeys(FEATURES, "t"), adagrad, mappings=mappings)


METHODS = (
    "full",
    "full_hashed",
    "hash",
    "unified",
    "qr_mult",
    "qr_add",
    "qr_concat",
    "robe",
    "ttrec",
    "collisionless",
    "graphhash",
)
IN_RANGE_ONLY = {"full", "qr_mult", "qr_add", "qr_concat", "ttrec"}
# The two smallest int64s mark empty and deleted slots of the id maps behind these methods.
ID_MAPPED = {"collisionless", "graphhash"}
RESERVED = -(2**63) + 1


@st.composite
def batches(draw, ids=INT64) -> KeyedJaggedTensor:
    """A KJT over FEATURES: any batch size (0 too), empty bags, repeated ids, maybe weights."""
    batch = draw(st.integers(0, 5))
    pool = draw(st.lists(ids, min_size=1, max_size=6))
    lengths = draw(st.lists(st.integers(0, 5), min_size=2 * batch, max_size=2 * batch))
    values = draw(st.lists(st.sampled_from(pool), min_size=sum(lengths), max_size=sum(lengths)))
    weights = None
    if draw(st.booleans()):
        finite = st.floats(-10, 10, allow_nan=False, width=32)
        weights = torch.tensor(
            draw(st.lists(finite, min_size=len(values), max_size=len(values))),
            dtype=torch.float32,
        )
    return KeyedJaggedTensor(
        keys=list(FEATURES),
        values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int64),
        weights=weights,
    )


Feature = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def per_feature(kjt: KeyedJaggedTensor) -> dict[str, Feature]:
    """(ids, lengths, weights) of each feature; torchrec's own split fails on batch size 0."""
    lengths = kjt.lengths().view(len(FEATURES), kjt.stride())
    counts = lengths.sum(dim=1).tolist()
    ids = kjt.values().split(counts)
    weights = kjt.weights_or_none()
    weights = (torch.ones(kjt.values().numel()) if weights is None else weights).split(counts)
    return {name: (ids[i], lengths[i], weights[i]) for i, name in enumerate(FEATURES)}


def _refusal(method: str, kjt: KeyedJaggedTensor) -> str | None:
    """The IdError message `method` must raise for these ids (a regex), None if it takes them."""
    values = kjt.values()
    if method in IN_RANGE_ONLY and not bool(((values >= 0) & (values < BOUNDED)).all()):
        return r"'[ab]'.*id -?\d+ .*outside \[0, 50\)"
    if method in ID_MAPPED and bool((values <= RESERVED).any()):
        return r"reserved value.*every other int64 is accepted"
    return None


COLLECTIONS: dict[str, EmbeddingCollection] = {}


def collection(method: str) -> EmbeddingCollection:
    """One collection per method for the whole module: building them is the slow part."""
    if method not in COLLECTIONS:
        COLLECTIONS[method] = _collection(method)
    return COLLECTIONS[method]


FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("method", METHODS)
@FUZZ
@given(kjt=batches())
def test_pooled_and_sequence_lookups_agree_are_finite_and_shaped(method: str, kjt) -> None:
    ec = collection(method)
    refusal = _refusal(method, kjt)
    if refusal is not None:
        with pytest.raises(IdError, match=refusal):
            ec(kjt)
        with pytest.raises(IdError, match=refusal):
            ec.sequence(kjt)
        return
    ec.eval()  # collisionless tables admit ids in training: two calls would see two tables
    try:
        pooled = ec(kjt).to_dict()
        rows = ec.sequence(kjt)
    finally:
        ec.train()
    for name, (ids, lengths, weights) in per_feature(kjt).items():
        dim = ec.output_dim(name)
        assert pooled[name].shape == (kjt.stride(), dim)
        assert rows[name].values().shape == (ids.numel(), dim)
        assert torch.isfinite(pooled[name]).all() and torch.isfinite(rows[name].values()).all()
        # Pooling is the (weighted, mean-scaled) sum of the sequence rows of each bag.
        scale = weights
        if ec.configs["t"].pooling == "mean":
            scale = scale / lengths.repeat_interleave(lengths).clamp(min=1)
        bags = torch.repeat_interleave(torch.arange(kjt.stride()), lengths)
        summed = torch.zeros(kjt.stride(), dim).index_add_(
            0, bags, rows[name].values().detach() * scale[:, None]
        )
        torch.testing.assert_close(pooled[name].detach(), summed, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
@FUZZ
@given(kjt=batches())
def test_the_same_id_gets_the_same_row_and_rows_exist(method: str, kjt) -> None:
    ec = collection(method)
    if _refusal(method, kjt) is not None:
        return
    rows = ec.sequence(kjt)  # in training mode: collisionless tables admit ids as they go
    for name, (ids, _, _) in per_feature(kjt).items():
        values = rows[name].values().detach()
        for unique in ids.unique():
            same = values[ids == unique]
            assert (same == same[0]).all(), f"id {int(unique)} got different rows"
        if method == "collisionless":
            mapped = ec.self_managed["t"].map_ids(ids)
            capacity = ec.configs["t"].method.capacity
            assert (((mapped >= 0) & (mapped < capacity)) | (mapped == DEFAULT_ROW)).all()
            continue
        transform = ec.index_transform(name)
        for table, physical in zip(transform.tables, transform(ids), strict=True):
            num_rows = ec.tables.weight(table).shape[0]
            assert physical.shape == ids.shape
            assert ((physical >= 0) & (physical < num_rows)).all(), (table, physical)


@pytest.mark.parametrize("method", METHODS)
@FUZZ
@given(
    kjt=batches(ids=st.integers(0, BOUNDED - 1)),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bool]),
    extra=st.integers(1, 3),
)
def test_bad_dtypes_lengths_and_weights_are_typed_errors(method: str, kjt, dtype, extra) -> None:
    ec = collection(method)
    values, lengths = kjt.values(), kjt.lengths()
    floats = KeyedJaggedTensor(keys=list(FEATURES), values=values.to(dtype), lengths=lengths)
    with pytest.raises(IdError, match=f"ids must be integers.*{str(dtype).removeprefix('torch.')}"):
        ec(floats)
    more_weights = torch.ones(values.numel() + extra)
    mismatched = KeyedJaggedTensor(list(FEATURES), values, lengths=lengths, weights=more_weights)
    with pytest.raises(OffsetsError, match=f"{values.numel() + extra} weights for"):
        ec(mismatched)
    more_ids = torch.cat([values, torch.zeros(extra, dtype=torch.int64)])
    for call in (ec, ec.sequence):
        with pytest.raises(OffsetsError, match=f"add up to {values.numel()} ids but there are"):
            call(KeyedJaggedTensor(list(FEATURES), more_ids, lengths=lengths))
