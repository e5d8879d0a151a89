"""The CPU kernels against the torch specification: ids bit for bit, pooled rows within 1e-6."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import embedding_tables.collection as collection_module
import embedding_tables.transforms as transforms_module
from embedding_tables import EmbeddingCollection, SparseOptimizerConfig
from embedding_tables.config import TableConfig
from embedding_tables.cpu_kernels import KernelTransform, PooledTerms, built_library, library
from embedding_tables.errors import IdError
from embedding_tables.hashing import bucket_keyed, seed_key
from embedding_tables.methods import QR, Full, Unified
from embedding_tables.transforms import BatchedTransform, transform_for
from tests.embedding_tables.helpers import method_case, random_kjt, slots_of

INT64 = st.integers(-(2**63), 2**63 - 1)
KERNELS = library()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="no C compiler to build the kernels")


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(INT64, max_size=300),
    seed=st.integers(0, 2**64 - 1),
    num_rows=st.one_of(st.integers(1, 10**6), st.integers(1, 2**63 - 1)),
)
def test_bucket_equals_torch_bucket(ids: list[int], seed: int, num_rows: int) -> None:
    tensor = torch.tensor(ids, dtype=torch.int64)
    out = torch.empty_like(tensor)
    KERNELS.bucket_into(tensor, seed_key(seed), num_rows, out)
    assert torch.equal(out, bucket_keyed(tensor, seed_key(seed), num_rows))


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.one_of(INT64, st.integers(-5, 5000)), max_size=200),
    num_embeddings=st.one_of(st.integers(1, 5000), st.integers(1, 2**63 - 1)),
    partitions=st.integers(2, 4),
    seed=st.integers(0, 2**32),
)
def test_qr_digits_equal_torch_digits(
    ids: list[int], num_embeddings: int, partitions: int, seed: int
) -> None:
    config = TableConfig(
        "q", num_embeddings, 4, QR(num_partitions=partitions, out_of_range="hash"), seed=seed
    )
    transform = transform_for(config, "f")
    rules = BatchedTransform([(transform, j) for j in range(len(transform.tables))]).rules
    kernel = transforms_module.kernel_transform_of(rules)
    tensor = torch.tensor(ids, dtype=torch.int64)
    rows = KERNELS.transform(kernel, tensor)
    assert torch.equal(rows, torch.stack(transform(tensor)).reshape(len(rules), len(ids)))


@needs_kernels
@pytest.mark.parametrize(
    "divisor", [2, 3, 49, 107, 99_991, 28_872_680, 2**51 + 3, 2**52 - 1, 2**52]
)
@pytest.mark.parametrize("limit", [2**52, 2**52 + 1])
def test_digits_at_the_edges_of_exact_doubles(divisor: int, limit: int) -> None:
    """The digits below 2**52 (in doubles) and above (the multiply-high path) at multiples of
    the divisor (where 1 / d rounded makes the truncated quotient one short for 49, 107 and
    28872680), one off them and at the top of the range, as torch's integer division."""
    modulus = max(2, min(divisor - 1, 2**40))
    transform = KernelTransform(
        "arith", (divisor, modulus), divisors=(1, divisor), limit=limit, out_of_range="hash"
    )
    generator = torch.Generator().manual_seed(divisor)
    top = (limit - 1) // divisor
    k = torch.cat(
        [torch.tensor([0, 1, 2, top]), torch.randint(0, top + 1, (3000,), generator=generator)]
    )
    ids = torch.cat([k * divisor - 1, k * divisor, k * divisor + 1, torch.tensor([limit - 1])])
    ids = ids[(ids >= 0) & (ids < limit)]
    rows = KERNELS.transform(transform, ids)
    assert torch.equal(rows[0], ids % divisor)
    assert torch.equal(rows[1], (ids // divisor) % modulus)


@needs_kernels
@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(0, 40), min_size=6, max_size=6),
    seed=st.integers(0, 2**31),
)
def test_batched_transform_kernel_rows_equal_torch_rows(counts: list[int], seed: int) -> None:
    transforms = [
        transform_for(TableConfig("h", 10**6, 4, "hash", budget=999, seed=2), "a"),
        transform_for(TableConfig("f", 50, 4, Full(out_of_range="hash"), seed=4), "b"),
        transform_for(TableConfig("q", 1000, 4, QR(num_partitions=3, out_of_range="hash")), "c"),
        transform_for(TableConfig("u", 10**5, 4, Unified(feature_chunks={"d": 3}), budget=77), "d"),
        transform_for(TableConfig("h2", 10**6, 4, "hash", budget=2**40, seed=5), "e"),
        transform_for(TableConfig("f2", 2**62, 4, Full(out_of_range="error")), "g"),
    ]
    generator = torch.Generator().manual_seed(seed)
    ids = {}
    for t, n in zip(transforms, counts, strict=True):
        if t.feature == "g":  # in range of its 2**62 rows (out of range is an error there)
            ids[t.feature] = torch.randint(0, 2**62, (n,), generator=generator)
        else:
            ids[t.feature] = torch.randint(-(2**62), 2**62, (n,), generator=generator) * 2
    slots = slots_of(transforms)
    batched = BatchedTransform(slots)
    fast = batched([ids[t.feature] for t, _ in slots])
    original = transforms_module.library
    try:
        transforms_module.library = lambda: None
        reference = batched([ids[t.feature] for t, _ in slots])
    finally:
        transforms_module.library = original
    assert torch.equal(fast, reference)
    assert torch.equal(fast, torch.cat([t(ids[t.feature])[j] for t, j in slots]))


def _forward_pair(ec: EmbeddingCollection, kjt: KeyedJaggedTensor):
    """(kernel forward, reference forward) of one collection under no_grad."""
    with torch.no_grad():
        fast = ec(kjt).values()
        original = collection_module.library
        try:
            collection_module.library = lambda: None
            reference = ec(kjt).values()
        finally:
            collection_module.library = original
    return fast, reference


@needs_kernels
@pytest.mark.parametrize("method", ["full", "hash", "unified", "qr_mult", "qr_add", "qr_concat"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
def test_kernel_forward_matches_reference(method: str, pooling: str, weighted: bool) -> None:
    tables, feature_to_table = method_case(method, pooling)
    ec = EmbeddingCollection(
        tables, feature_to_table, optimizer=SparseOptimizerConfig("rowwise_adagrad", lr=0.1)
    )
    assert any(ec._group_kernel_terms(g) is not None for g in range(len(ec._group_kinds)))
    kjt = random_kjt(tables, feature_to_table, batch=9, max_len=5, weighted=weighted, seed=3)
    fast, reference = _forward_pair(ec, kjt)
    torch.testing.assert_close(fast, reference, atol=1e-6, rtol=1e-6)


@needs_kernels
@pytest.mark.parametrize("dim", [16, 64, 24])
@pytest.mark.parametrize("combine", ["mult", None])
def test_kernel_forward_wide_rows_and_wild_ids(dim: int, combine: str | None) -> None:
    """Dims of the vector path (multiples of 16) and of the scalar path, ids anywhere in int64
    for hashed tables and hashed in for qr, bags longer than a kernel block (2048 ids)."""
    if combine is None:
        tables = [TableConfig("t", 10**9, dim, "hash", budget=5000, seed=1)]
    else:
        tables = [TableConfig("t", 10**9, dim, QR(combine=combine, out_of_range="hash"))]
    ec = EmbeddingCollection(tables, {"f": "t"}, optimizer=None)
    with torch.no_grad():
        for table in ec.physical_tables():
            ec.tables.weight(table.name).uniform_(-1, 1)
    lengths = torch.tensor([0, 3000, 1, 0, 7, 2100, 0])
    generator = torch.Generator().manual_seed(dim)
    values = torch.randint(-(2**62), 2**62, (int(lengths.sum()),), generator=generator) * 2
    kjt = KeyedJaggedTensor(keys=["f"], values=values, lengths=lengths)
    fast, reference = _forward_pair(ec, kjt)
    torch.testing.assert_close(fast, reference, atol=1e-6, rtol=1e-6)
    assert fast[0].abs().sum() == 0 and fast[3].abs().sum() == 0


def _mixed_collection() -> tuple[EmbeddingCollection, list[TableConfig], dict[str, str]]:
    """qr mult features around a hashed and a unified table: two pooled outputs and the mult
    features' one, in one kernel call."""
    tables = [
        TableConfig("q1", 900, 16, QR(combine="mult", out_of_range="hash")),
        TableConfig("h", 10**6, 8, "hash", budget=300, seed=7),
        TableConfig("q2", 5000, 16, QR(combine="mult", num_partitions=3)),
        TableConfig("u", 2000, 4, Unified(feature_chunks={"e": 2}), budget=50),
    ]
    feature_to_table = {"a": "q1", "b": "h", "c": "q2", "d": "u", "e": "u", "g": "q1"}
    ec = EmbeddingCollection(tables, feature_to_table, optimizer=None)
    with torch.no_grad():
        for table in ec.physical_tables():
            ec.tables.weight(table.name).uniform_(-1, 1)
    return ec, tables, feature_to_table


def _permuted(kjt: KeyedJaggedTensor, order: list[str]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_jt_dict({key: kjt[key] for key in order})


@needs_kernels
def test_kernel_forward_any_key_order_and_mixed_outputs() -> None:
    """One plan per KJT key order; pooled groups and the mult features' shared output come
    out in the collection's feature order, as the reference gives them."""
    ec, tables, feature_to_table = _mixed_collection()
    kjt = random_kjt(tables, feature_to_table, batch=7, max_len=6, seed=11)
    for order in (list(feature_to_table), ["e", "g", "b", "a", "d", "c"]):
        fast, reference = _forward_pair(ec, _permuted(kjt, order))
        torch.testing.assert_close(fast, reference, atol=1e-6, rtol=1e-6)
    assert len(ec._kernel_plans) == 2


@needs_kernels
def test_kernel_forward_of_only_mult_features_is_the_kernel_output() -> None:
    """A collection of qr mult features only returns the kernels' shared output, no copy."""
    tables = [TableConfig(name, n, 16, QR(combine="mult")) for name, n in (("x", 700), ("y", 90))]
    ec = EmbeddingCollection(tables, {"x": "x", "y": "y", "z": "x"}, optimizer=None)
    kjt = random_kjt(tables, {"x": "x", "y": "y", "z": "x"}, batch=6, max_len=4, seed=2)
    fast, reference = _forward_pair(ec, kjt)
    torch.testing.assert_close(fast, reference, atol=1e-6, rtol=1e-6)
    assert fast.is_contiguous() and fast.untyped_storage().nbytes() == fast.numel() * 4


@needs_kernels
def test_kernel_forward_follows_a_table_that_moved() -> None:
    """A table whose storage is replaced (param.data = ...) is read where it now is."""
    ec, tables, feature_to_table = _mixed_collection()
    kjt = random_kjt(tables, feature_to_table, batch=5, max_len=4, seed=4)
    _forward_pair(ec, kjt)
    for parameter in ec.parameters():
        parameter.data = torch.rand_like(parameter) + 1.0
    fast, reference = _forward_pair(ec, kjt)
    torch.testing.assert_close(fast, reference, atol=1e-6, rtol=1e-6)


@needs_kernels
def test_pooled_refuses_outputs_and_offsets_that_do_not_fit() -> None:
    terms = PooledTerms([KernelTransform("hash", (10,), key=3)])
    table = torch.rand(10, 16)
    terms.set_term(0, 1, [table], 0, 16)
    ids = torch.arange(6)
    lengths = torch.tensor([1, 2, 0, 3])
    with pytest.raises(ValueError, match="at least the terms' \\[32\\] columns"):
        KERNELS.pooled(terms, ids, lengths, None, [torch.empty(2, 16)])
    with pytest.raises(ValueError, match="B lengths per feature"):
        KERNELS.pooled(terms, ids, lengths[:3], None, [torch.empty(2, 32)])
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        KERNELS.pooled(terms, ids, torch.tensor([1, 2, 0, 4]), None, [torch.empty(2, 32)])
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        KERNELS.pooled(terms, ids, torch.tensor([1, 2, -1, 4]), None, [torch.empty(2, 32)])
    with pytest.raises(ValueError, match="fp32 CPU"):
        terms.set_term(0, 0, [table.double()], 0, 0)
    out = torch.full((2, 32), 7.0)
    assert KERNELS.pooled(terms, ids, lengths, None, [out]) is None
    rows = bucket_keyed(ids, 3, 10)
    expected = torch.stack([table[rows[3:3]].sum(0), table[rows[3:6]].sum(0)])
    torch.testing.assert_close(out[:, 16:], expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(out[:, :16], torch.full((2, 16), 7.0))


@needs_kernels
@pytest.mark.parametrize("method", ["full", "qr"])
def test_kernel_forward_range_error_names_feature_and_value(method: str) -> None:
    tables = [TableConfig("ok", 100, 4, "hash"), TableConfig("t", 10, 4, method)]
    ec = EmbeddingCollection(tables, {"fine": "ok", "strict": "t"}, optimizer=None)
    kjt = KeyedJaggedTensor(
        keys=["fine", "strict"],
        values=torch.tensor([5, -1, 3, 12]),
        lengths=torch.tensor([1, 1, 1, 1]),
    )
    with torch.no_grad(), pytest.raises(IdError, match=r"'strict'.*id 12 "):
        ec(kjt)


def test_no_compiler_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("EMBTAB_CPU_KERNELS", raising=False)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert built_library.__wrapped__() is None


@needs_kernels
def test_switch_turns_the_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert library() is KERNELS
    monkeypatch.setenv("EMBTAB_CPU_KERNELS", "0")
    assert library() is None


@needs_kernels
def test_kernel_transform_refuses_unsupported_shapes() -> None:
    with pytest.raises(ValueError, match="1 to 8 partitions"):
        KERNELS.transform(
            KernelTransform("arith", (2,) * 9, divisors=(1,) * 9), torch.ones(1, dtype=torch.int64)
        )
