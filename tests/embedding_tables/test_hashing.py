"""Golden values of the one hash: serving must reproduce these bits forever."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embedding_tables.errors import IdError
from embedding_tables.hashing import bucket, bucket_int, feature_seed, hash64, hash64_int

IDS = [0, 1, -1, 42, 2**31, 2**63 - 1, -(2**63), 10**12]

# splitmix64's published outputs: state 0 -> 0xE220A8397B1DCDAF, state 1 -> 0x910A2DEC89025CC1,
# and the first five outputs from state 1234567 (hash64(1234567, s) is output s + 1).
SPLITMIX64_FROM_1234567 = [
    6457827717110365317,
    3203168211198807973,
    9817491932198370423,
    4593380528125082431,
    16408922859458223821,
]
GOLDEN_SEED_0 = [
    0xE220A8397B1DCDAF,
    0x910A2DEC89025CC1,
    0xE4D971771B652C20,
    0xBDD732262FEB6E95,
    0x25493CC63225736C,
    0x2A67D7552E039EA7,
    0x481EC0A212A9F3DB,
    0xF321EACBEA530978,
]
GOLDEN_SEED_7 = [
    0xC584133AC916AB3C,
    0x85E7BB0F12278575,
    0x405DA438A39E8064,
    0xCCF635EE9E9E2FA4,
    0xE17F557A7FAE40C6,
    0x8C0F2BC06B2765D6,
    0x6250485B3CDEFBBD,
    0x382AB21DF4EBCFD1,
]
GOLDEN_BUCKETS_SEED_3_OF_1000003 = [922781, 291376, 828432, 217601, 95115, 917967, 203050, 507993]


def as_unsigned(values: torch.Tensor) -> list[int]:
    return [v & (2**64 - 1) for v in values.tolist()]


def test_spec_matches_published_splitmix64() -> None:
    assert hash64_int(0, 0) == 0xE220A8397B1DCDAF
    assert [hash64_int(1234567, s) for s in range(5)] == SPLITMIX64_FROM_1234567


def test_torch_hash_golden_values() -> None:
    ids = torch.tensor(IDS, dtype=torch.int64)
    assert as_unsigned(hash64(ids, 0)) == GOLDEN_SEED_0
    assert as_unsigned(hash64(ids, 7)) == GOLDEN_SEED_7
    assert bucket(ids, 3, 1000003).tolist() == GOLDEN_BUCKETS_SEED_3_OF_1000003
    assert as_unsigned(hash64(torch.tensor([1234567] * 5), 0)) == [SPLITMIX64_FROM_1234567[0]] * 5


def test_feature_seed_golden_values() -> None:
    assert feature_seed(0, "item_id", 0) == 1643531744357626999
    assert feature_seed(0, "item_id", 1) == 3817012501513046802
    assert feature_seed(5, "user_id", 0) == 16783656054202114962


def test_int32_ids_hash_like_int64() -> None:
    ids = torch.tensor([-5, 0, 7, 2**31 - 1], dtype=torch.int32)
    assert torch.equal(hash64(ids, 11), hash64(ids.long(), 11))


def test_non_integer_ids_are_refused() -> None:
    with pytest.raises(IdError, match="float32"):
        hash64(torch.tensor([1.0]), 0)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=50),
    st.integers(0, 2**64 - 1),
    st.integers(1, 2**40),
)
def test_torch_matches_spec(ids: list[int], seed: int, rows: int) -> None:
    tensor = torch.tensor(ids, dtype=torch.int64)
    assert as_unsigned(hash64(tensor, seed)) == [hash64_int(i, seed) for i in ids]
    assert bucket(tensor, seed, rows).tolist() == [bucket_int(i, seed, rows) for i in ids]
