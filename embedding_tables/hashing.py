"""The one 64-bit hash of embtab: splitmix64, vectorised in torch, reproducible everywhere.

Serving recomputes physical rows from raw ids, so this hash is a contract: the same ids and seed
give the same bits on CPU and GPU, in every process and every release (golden-value tests pin it).

Definition (all arithmetic mod 2**64, ids read as two's-complement int64):

    hash64(id, seed) = mix(id + (seed + 1) * 0x9E3779B97F4A7C15)
    mix(z): z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
            z = (z ^ (z >> 27)) * 0x94D049BB133111EB
            return z ^ (z >> 31)                      (logical shifts)

i.e. the first output of Vigna's splitmix64 generator started at state `id + seed * gamma`.
The result is returned as int64 (the same 64 bits). A row in a table of `m` rows is
`bucket(id, seed, m) = (hash64(id, seed) & (2**63 - 1)) % m`: the low 63 bits, so the modulus is
the same in every language (no signed/unsigned remainder ambiguity).

`hash64_int` is the same function on Python ints: the specification the torch version is tested
against, and what a non-torch client can port line by line.
"""

from __future__ import annotations

import hashlib

import torch

from embedding_tables.errors import ConfigError, IdError

GOLDEN_GAMMA = 0x9E3779B97F4A7C15
MIX_MULTIPLIER_1 = 0xBF58476D1CE4E5B9
MIX_MULTIPLIER_2 = 0x94D049BB133111EB
MIX_CHUNK = 1 << 16
_MASK64 = (1 << 64) - 1
_LOW63 = (1 << 63) - 1


def _as_int64(value: int) -> int:
    """The int64 with the same low 64 bits as `value` (torch scalars must fit int64)."""
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


def _xor_logical_shift(z: torch.Tensor, shift: int, scratch: torch.Tensor) -> None:
    """z ^= z >>> shift, in place; torch's >> on int64 is arithmetic, so mask the sign copies."""
    torch.bitwise_right_shift(z, shift, out=scratch)
    scratch &= (1 << (64 - shift)) - 1
    z ^= scratch


def seed_key(seed: int) -> int:
    """What hash64 adds to an id before mixing, as an int64: (seed + 1) * gamma mod 2**64."""
    return _as_int64((seed + 1) * GOLDEN_GAMMA)


def mix64_(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's mix of every int64 of `z` (contiguous), in place (see the module docstring).

    Runs over chunks of `MIX_CHUNK` ids so that its seven passes stay in cache and its scratch
    space stays small."""
    scratch = torch.empty(min(MIX_CHUNK, z.numel()), dtype=z.dtype, device=z.device)
    for part in z.view(-1).split(MIX_CHUNK):
        space = scratch[: part.numel()]
        _xor_logical_shift(part, 30, space)
        part *= _as_int64(MIX_MULTIPLIER_1)
        _xor_logical_shift(part, 27, space)
        part *= _as_int64(MIX_MULTIPLIER_2)
        _xor_logical_shift(part, 31, space)
    return z


def hash64_keyed(ids: torch.Tensor, keys: torch.Tensor | int) -> torch.Tensor:
    """mix(ids + keys): hash64 with the seed given as its key (`seed_key`), one key for all ids
    or one per id, so that ids of many seeds hash in one pass."""
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise IdError(f"hash64 takes integer ids, got dtype {ids.dtype}")
    return mix64_(ids.to(torch.int64) + keys)


def hash64(ids: torch.Tensor, seed: int) -> torch.Tensor:
    """splitmix64 of every id (see the module docstring), as int64, on the ids' device."""
    return hash64_keyed(ids, seed_key(seed))


def low63_(hashes: torch.Tensor) -> torch.Tensor:
    """Keep the low 63 bits, in place: what bucket reduces mod the row count."""
    hashes &= _LOW63
    return hashes


def bucket_keyed(
    ids: torch.Tensor, keys: torch.Tensor | int, num_rows: torch.Tensor | int
) -> torch.Tensor:
    """bucket with seed keys and row counts given per id (or one for all)."""
    return low63_(hash64_keyed(ids, keys)).remainder_(num_rows)


def bucket(ids: torch.Tensor, seed: int, num_rows: int) -> torch.Tensor:
    """Row in [0, num_rows) of every id: the low 63 bits of hash64, mod num_rows."""
    if num_rows < 1:
        raise ConfigError(f"bucket needs num_rows >= 1, got {num_rows}")
    return bucket_keyed(ids, seed_key(seed), num_rows)


def hash64_int(value: int, seed: int) -> int:
    """hash64 on one Python int, as an unsigned 64-bit int: the reference specification."""
    z = (value + (seed + 1) * GOLDEN_GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * MIX_MULTIPLIER_1) & _MASK64
    z = ((z ^ (z >> 27)) * MIX_MULTIPLIER_2) & _MASK64
    return z ^ (z >> 31)


def bucket_int(value: int, seed: int, num_rows: int) -> int:
    """bucket on one Python int: the reference specification."""
    return (hash64_int(value, seed) & _LOW63) % num_rows


def feature_seed(table_seed: int, feature: str, chunk: int) -> int:
    """Seed of lookup `chunk` of `feature` in a unified table: deterministic, process-independent.

    The first 8 bytes (little-endian, unsigned) of BLAKE2b-64 over the UTF-8 text
    f"{table_seed}/{feature}/{chunk}". Python's `hash()` is salted per process, so it is not used.
    """
    digest = hashlib.blake2b(f"{table_seed}/{feature}/{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
