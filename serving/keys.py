"""The Redis key layout of published models, and which shard a row id belongs to.

Metadata keys carry the hash tag `{<model>}`, so in a Redis Cluster they sit in one slot and a
MULTI over them (the version flip, a delta's commit) is allowed:

    embtab:{m}:version            live version (an int, as text)
    embtab:{m}:next               counter that hands out version numbers
    embtab:{m}:namespaces         hash: version -> JSON {"state": writing|live|retired, "at": t}
    embtab:{m}:events             pub/sub channel: JSON {"kind": "version"|"delta", ...}
    embtab:{m}:<v>:manifest       JSON: publish id, physical tables, encoding, shards, model
                                  manifest
    embtab:{m}:<v>:head           hash: id (publish id), dense (revision), delta (last committed
                                  delta number), delta_seq (last reserved)
    embtab:{m}:<v>:dense:<rev>    safetensors blob: dense parameters and mapping state
    embtab:{m}:<v>:delta:<n>      safetensors blob: row ids a delta changed (cache invalidation)
    embtab:{m}:<v>:preprocessing  hash: file name -> bytes of the version's preprocessing
                                  artifact (raw values -> model input); absent for a model
                                  trained without one

Identity. The counter `next` lives in the same Redis as the versions, so a Redis that loses its
data (FLUSHALL, a restart without persistence) hands out the same numbers again. A publish is
therefore identified by (version, publish id): a random id that the full publish writes into its
manifest and head. Readers switch versions when either differs from what they hold, and treat a
live pointer whose head is gone as lost data. A delta writer names the publish it extends: the
delta is reserved and committed only if that version's head still carries its id (one script
each), so deltas never land in a namespace that was lost, or lost and re-created by another
publish under the same number. Versions published before publish ids existed have none (the
id reads as ""): they stay readable, and are told apart by number only.

Row shards carry the hash tag `{<m>:<shard>}`, so shard s of every table and version of a model
sits on one cluster node and one lookup costs one round trip per shard:

    embtab:<m>:<v>:rows:<table>:{<m>:<shard>}   hash: 8-byte LE row id -> encoded row
"""

from __future__ import annotations

import re

import numpy as np

from serving.errors import KeyNameError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
PREFIX = "embtab"
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def check_name(kind: str, name: str) -> str:
    """A model or table name usable in keys: letters, digits, `_`, `.`, `-` (up to 128)."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise KeyNameError(
            f"{kind} name {name!r} cannot be part of a Redis key; accepted: 1-128 characters of "
            "letters, digits, '_', '.', '-', starting with a letter or digit"
        )
    return name


class ModelKeys:
    """Every key of one model (see the module docstring)."""

    def __init__(self, model: str) -> None:
        self.model = check_name("model", model)
        self._meta = f"{PREFIX}:{{{model}}}"

    @property
    def version(self) -> str:
        return f"{self._meta}:version"

    @property
    def next_version(self) -> str:
        return f"{self._meta}:next"

    @property
    def namespaces(self) -> str:
        return f"{self._meta}:namespaces"

    @property
    def events(self) -> str:
        return f"{self._meta}:events"

    def manifest(self, version: int) -> str:
        return f"{self._meta}:{version}:manifest"

    def head(self, version: int) -> str:
        return f"{self._meta}:{version}:head"

    def dense(self, version: int, revision: int) -> str:
        return f"{self._meta}:{version}:dense:{revision}"

    def preprocessing(self, version: int) -> str:
        return f"{self._meta}:{version}:preprocessing"

    def delta_log(self, version: int, delta: int) -> str:
        return f"{self._meta}:{version}:delta:{delta}"

    def rows(self, version: int, table: str, shard: int) -> str:
        return f"{PREFIX}:{self.model}:{version}:rows:{table}:{{{self.model}:{shard}}}"


def shard_of(ids: np.ndarray, num_shards: int) -> np.ndarray:
    """Shard of each row id: splitmix64's finaliser of the id, mod num_shards.

    Mixing first spreads ids with a common stride (raw ids of a collisionless table, or every
    k-th row) evenly; the function is part of the layout, so it never changes.
    """
    if num_shards == 1:
        return np.zeros(len(ids), dtype=np.int64)
    z = np.asarray(ids, dtype=np.int64).view(np.uint64).copy()
    z ^= z >> np.uint64(30)
    z *= _MIX_1
    z ^= z >> np.uint64(27)
    z *= _MIX_2
    z ^= z >> np.uint64(31)
    return (z % np.uint64(num_shards)).astype(np.int64)
