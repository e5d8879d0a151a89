"""The preprocessing artifact: how raw values become model input, fitted once, applied everywhere.

`embtab data prepare` fits it (vocabularies, dense statistics) on the spec's files; the
checkpoint carries it, `embtab publish` publishes it with the version, and the batch trainer, the
stream and `/score` all apply `Preprocessor.encode`, so training and serving cannot disagree.

On disk (and as published blobs): `artifact.json` (format version, the spec, dense statistics,
cardinalities, the content hash) and one `vocab-<feature>.parquet` per vocabulary, the sorted
raw values, whose position is the id. Never pickle.

Raw-id hashing: a string id becomes the int64 `string_hash64(value, seed)` (FNV-1a over its
UTF-8 bytes, then a splitmix64 finaliser, seeded per feature); an int id stays itself. The
table's own method (hash, unified, collisionless) maps that int64 to a row. Vocabulary lookups of
strings go through the same hash (a sorted array of the vocabulary's hashes, checked collision
free when it is fitted), so a lookup is a binary search, not a Python dict.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from feature_store.schema import FeatureSpec, Schema
from feature_store.spec import DatasetSpec, FeatureDef
from feature_store.wheels import DataError

ARTIFACT_VERSION = 1
ARTIFACT_FILE = "artifact.json"
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
# A vocabulary remembers the hashes of the strings of its small lookups (a `/score` request's
# ids, which recur request after request): hashing 100 ids costs ~0.2 ms, the dictionary a few
# microseconds. Bounded: the memo starts afresh when it would pass _MEMO_SIZE strings. A few
# strings it does not know are hashed in Python: numpy's fixed cost per call is ~50 us.
_MEMO_BATCH = 1024
_MEMO_SIZE = 1 << 16
_FEW = 16
_MASK = (1 << 64) - 1


class ArtifactError(DataError):
    """An artifact that is missing, of another format version, or does not match its hash."""


class RawValueError(ValueError):
    """A raw value of a type the feature does not take; `feature` names it."""

    def __init__(self, feature: str, message: str) -> None:
        super().__init__(message)
        self.feature = feature


def splitmix64(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _string_hash64_one(value: bytes, seed: int) -> int:
    """`string_hash64` of one string's UTF-8 bytes, in Python ints (same FNV-1a and splitmix64)."""
    prime = int(_FNV_PRIME)
    h = int(_FNV_OFFSET) ^ (seed & _MASK)
    for byte in value:
        h = ((h ^ byte) * prime) & _MASK
    z = ((h ^ len(value)) + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    z ^= z >> 31
    return z - (1 << 64) if z >> 63 else z


def feature_seed(name: str) -> int:
    """The per-feature hash seed: a stable function of the feature's name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def string_hash64(strings: pa.Array, seed: int) -> np.ndarray:
    """A 64-bit hash of each (non-null) string, vectorised over the bytes; returns int64."""
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    if pa.types.is_string(strings.type):
        offset_type = np.int32
    else:
        strings = pc.cast(strings, pa.large_string())
        offset_type = np.int64
    count = len(strings)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.frombuffer(strings.buffers()[1], dtype=offset_type)[
        strings.offset : strings.offset + count + 1
    ].astype(np.int64)
    data_buffer = strings.buffers()[2]
    data = (
        np.frombuffer(data_buffer, dtype=np.uint8)
        if data_buffer is not None
        else np.zeros(1, np.uint8)
    )
    lengths = np.diff(offsets)
    # Longest strings first: at byte k the strings still being read are a prefix, so each step
    # works on views (no gather or scatter of the hashes); `reading[k]` is that prefix's length.
    order = np.argsort(-lengths, kind="stable")
    cursor = offsets[:-1][order]
    reading = count - np.searchsorted(
        np.sort(lengths), np.arange(int(lengths[order[0]])), side="right"
    )
    hashes = np.full(count, _FNV_OFFSET ^ np.uint64(seed), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for n in reading.tolist():
            head = hashes[:n]
            head ^= data[cursor[:n]]
            head *= _FNV_PRIME
            cursor[:n] += 1
        unsorted = np.empty_like(hashes)
        unsorted[order] = hashes
        hashes = splitmix64(unsorted ^ lengths.astype(np.uint64))
    return hashes.view(np.int64)


def dense_steps(
    feature: FeatureDef, raw: pa.Array, stats: tuple[float, float] | None
) -> np.ndarray:
    """A dense or count feature's raw numbers (float64, NaN where missing) through its
    transforms in the spec's order. With `stats` None, only the steps before `standardise`:
    what fitting its mean and standard deviation sees."""
    try:
        # A copy: the transforms below write into it, and Arrow's buffers are read-only.
        numbers = np.array(
            _filled(pc.cast(raw, pa.float64()), np.nan).to_numpy(zero_copy_only=False),
            dtype=np.float64,
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise RawValueError(feature.name, f"feature {feature.name!r} takes numbers") from error
    for step in feature.transform:
        if step == "clip":
            numbers = np.clip(numbers, *feature.clip)
        elif step == "log1p":
            numbers = np.log1p(np.maximum(numbers, 0.0))
        elif stats is None:
            break
        else:
            mean, std = stats
            numbers = (numbers - mean) / std
    return numbers


@dataclass(frozen=True)
class Vocabulary:
    """Sorted distinct raw values; a value's id is its position, the OOV id is `len(values)`."""

    values: pa.Array
    oov: bool
    seed: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "_memo", {})
        keys = self._keys(self.values)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        if len(sorted_keys) > 1 and (np.diff(sorted_keys) == 0).any():
            raise ArtifactError("two vocabulary values share a 64-bit hash; change the seed")
        object.__setattr__(self, "_sorted_keys", sorted_keys)
        object.__setattr__(self, "_ids_of_sorted", order.astype(np.int64))

    @property
    def size(self) -> int:
        """Ids the table needs: every value, plus the OOV id when there is one."""
        return len(self.values) + int(self.oov)

    @property
    def is_string(self) -> bool:
        return pa.types.is_string(self.values.type) or pa.types.is_large_string(self.values.type)

    def _keys(self, values: pa.Array) -> np.ndarray:
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            if len(values) <= _MEMO_BATCH:
                return self._remembered_keys(values)
            return string_hash64(values, self.seed)
        return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.int64)

    def _remembered_keys(self, values: pa.Array) -> np.ndarray:
        """`string_hash64(values, seed)`, hashing only the strings not remembered (keyed by
        their UTF-8 bytes, so no decoding is involved)."""
        memo: dict[bytes, int] = self._memo
        raw = values.cast(pa.large_binary()).to_pylist()
        keys = [memo.get(value) for value in raw]
        missing = [index for index, key in enumerate(keys) if key is None]
        if missing:
            if len(missing) <= _FEW:
                hashed = [_string_hash64_one(raw[index], self.seed) for index in missing]
            else:
                taken = values.take(pa.array(missing, pa.int64()))
                hashed = string_hash64(taken, self.seed).tolist()
            if len(memo) + len(missing) > _MEMO_SIZE:
                memo.clear()
            for index, key in zip(missing, hashed, strict=True):
                keys[index] = memo[raw[index]] = key
        return np.array(keys, dtype=np.int64)

    def lookup(self, values: pa.Array, *, distinct: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(ids, known): each value's id, and whether it is in the vocabulary (nulls are not).
        `distinct`: the values are known to be distinct (a dictionary's), so they are not
        deduplicated again."""
        if values.null_count:
            valid = ~np.asarray(values.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            values = values.fill_null("" if self.is_string else 0)
        else:
            valid = np.ones(len(values), dtype=bool)
        # A request's few values go through the memo; a batch's many once per distinct value.
        index = None
        if len(values) > _MEMO_BATCH and not distinct:
            values, index = _distinct(values)
        keys = self._keys(values)
        ids = np.full(len(keys), len(self.values), dtype=np.int64)
        if len(self._sorted_keys):
            position = np.searchsorted(self._sorted_keys, keys)
            position = np.minimum(position, len(self._sorted_keys) - 1)
            known = self._sorted_keys[position] == keys
            ids[known] = self._ids_of_sorted[position[known]]
        else:
            known = np.zeros(len(keys), dtype=bool)
        if index is not None:
            ids, known = ids[index], known[index]
        known &= valid
        ids[~valid] = len(self.values)  # a missing value is out of the vocabulary
        return ids, known


@dataclass(frozen=True)
class Preprocessor:
    """The fitted transform of one data set: spec + vocabularies + dense statistics."""

    spec: DatasetSpec
    vocabularies: dict[str, Vocabulary]
    dense_stats: dict[str, tuple[float, float]]
    cardinalities: dict[str, int]
    max_lengths: dict[str, int]

    @functools.cached_property
    def content_hash(self) -> str:
        """The hash of everything the transform depends on; computed once (the fields never
        change), though checkpoints, publishing and serving all ask for it."""
        digest = hashlib.sha256(self._manifest_body().encode())
        for name in sorted(self.vocabularies):
            digest.update(name.encode())
            digest.update(_ipc_bytes(self.vocabularies[name].values))
        return digest.hexdigest()[:16]

    def schema(self) -> Schema:
        """The model-facing schema: what `models` builds tables from."""
        features = []
        for feature in self.spec.features:
            if feature.kind in ("dense", "count"):
                features.append(FeatureSpec(feature.name, "dense"))
                continue
            source = feature.of if feature.kind == "sequence" else feature.name
            features.append(
                FeatureSpec(
                    feature.name,
                    "sequence" if feature.kind == "sequence" else "categorical",
                    self.cardinalities[source],
                    max_length=self.max_lengths.get(feature.name, 1),
                    shares_ids_with=feature.of if feature.kind == "sequence" else None,
                    hashed=self.spec.feature(source).hashed,
                )
            )
        roles = {role: column for role, column in self.spec.roles.items() if role != "request"}
        return Schema(
            dataset=self.spec.name,
            features=tuple(features),
            label="label",
            time_column="timestamp",
            id_columns=roles,
        )

    # -- the transform -------------------------------------------------------------------

    def encode(self, name: str, raw: pa.Array) -> pa.Array:
        """One feature's raw column (as in the files, or as a request sends it) -> model input.

        categorical: int64 ids (an unseen value of a vocabulary without an OOV id, or a null
        hashed id, becomes an empty bag: the result is then a list column); multi_valued and
        sequence: list<int64>; dense and count: float32 after the feature's transforms.
        """
        feature = self.spec.feature(name)
        if isinstance(raw, pa.ChunkedArray):
            raw = raw.combine_chunks()
        if feature.kind in ("dense", "count"):
            return pa.array(self.dense_values(feature, raw), pa.float32())
        if feature.kind == "categorical":
            ids, keep = self.encode_ids(feature, raw)
            if keep.all():
                return pa.array(ids, pa.int64())
            offsets = np.r_[0, np.cumsum(keep)].astype(np.int32)
            return pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids[keep], pa.int64()))
        lists = raw if pa.types.is_list(raw.type) or pa.types.is_large_list(raw.type) else None
        if lists is None:
            raise RawValueError(name, f"feature {name!r} takes a list of ids per row")
        flat = pc.list_flatten(lists)
        lengths = np.asarray(pc.fill_null(pc.list_value_length(lists), 0), dtype=np.int64)
        source = self.spec.feature(feature.of) if feature.kind == "sequence" else feature
        ids, keep = self.encode_ids(source, flat)
        row_of = np.repeat(np.arange(len(lengths)), lengths)
        kept_lengths = np.bincount(row_of[keep], minlength=len(lengths))
        limit = self.max_lengths.get(name, 1)
        values = ids[keep]
        offsets = np.r_[0, np.cumsum(kept_lengths)]
        if kept_lengths.max(initial=0) > limit:
            # Bags keep their first values, sequences their newest (last) ones.
            starts = offsets[:-1]
            lengths_cut = np.minimum(kept_lengths, limit)
            if feature.kind == "sequence":
                starts = offsets[1:] - lengths_cut
            within = np.arange(lengths_cut.sum()) - np.repeat(
                np.r_[0, np.cumsum(lengths_cut)][:-1], lengths_cut
            )
            values = values[np.repeat(starts, lengths_cut) + within]
            offsets = np.r_[0, np.cumsum(lengths_cut)]
        return pa.ListArray.from_arrays(
            pa.array(offsets.astype(np.int32)), pa.array(values, pa.int64())
        )

    def decode(self, name: str, encoded: pa.Array) -> pa.Array:
        """Model input of one feature -> raw values that `encode` maps back to it: what a
        replay of a prepared copy sends as raw events. Vocabulary ids become their values (the
        OOV id a null), index ids and integer hashed ids stay themselves, numbers go through
        the inverse transforms in reverse order (a clipped number stays as it is). Hashed
        string ids cannot be inverted: a RawValueError."""
        feature = self.spec.feature(name)
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        if feature.kind in ("dense", "count"):
            numbers = np.asarray(encoded.to_numpy(zero_copy_only=False), dtype=np.float64)
            for step in reversed(feature.transform):
                if step == "log1p":
                    numbers = np.expm1(numbers)
                elif step == "standardise":
                    mean, std = self.dense_stats[feature.name]
                    numbers = numbers * std + mean
            return pa.array(numbers, pa.float64())
        source = self.spec.feature(feature.of) if feature.kind == "sequence" else feature
        if feature.kind == "categorical":
            return self._raw_ids(source, encoded)
        offsets = np.asarray(encoded.offsets.to_numpy(), dtype=np.int64)
        return pa.ListArray.from_arrays(
            pa.array(offsets - offsets[0], pa.int32()), self._raw_ids(source, encoded.flatten())
        )

    def _raw_ids(self, feature: FeatureDef, ids: pa.Array) -> pa.Array:
        values = np.asarray(ids.to_numpy(zero_copy_only=False), dtype=np.int64)
        if feature.ids == "hash" and feature.type == "string":
            raise RawValueError(
                feature.name,
                f"feature {feature.name!r} hashes raw string ids: the prepared copy holds only "
                "their hashes, so its raw values cannot be recovered",
            )
        if feature.ids != "vocabulary":
            return pa.array(values, pa.int64())
        vocabulary = self.vocabularies[feature.name].values
        known = values < len(vocabulary)
        taken = vocabulary.take(pa.array(np.where(known, values, 0)))
        return pc.if_else(pa.array(known), taken, pa.nulls(len(values), taken.type))

    def dense_values(self, feature: FeatureDef, raw: pa.Array) -> np.ndarray:
        """Numbers through clip, log1p and standardise (in the spec's order); null -> 0."""
        stats = self.dense_stats[feature.name] if "standardise" in feature.transform else None
        numbers = dense_steps(feature, raw, stats)
        numbers[np.isnan(numbers)] = 0.0
        return numbers.astype(np.float32)

    def encode_ids(
        self, feature: FeatureDef, raw: pa.Array, *, distinct: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, keep) of raw scalar ids of an id feature: keep is False where the id becomes
        no lookup (unseen in a vocabulary without an OOV id, or a null hashed id). `distinct`:
        the values are known to be distinct (a dictionary's), so they are not deduplicated."""
        ids, keep, _ = self.encode_ids_counted(feature, raw, distinct=distinct)
        return ids, keep

    def encode_ids_counted(
        self, feature: FeatureDef, raw: pa.Array, *, distinct: bool = False
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """`encode_ids` plus how many of the ids the vocabulary does not hold (0 for hashed
        ids; nulls count as not held), from the same lookup: `/score` counts them."""
        is_text = pa.types.is_string(raw.type) or pa.types.is_large_string(raw.type)
        is_int = pa.types.is_integer(raw.type)
        if pa.types.is_null(raw.type):
            raw = pa.nulls(len(raw), pa.string() if feature.type == "string" else pa.int64())
        elif feature.type == "string" and not is_text:
            raise RawValueError(
                feature.name, f"feature {feature.name!r} takes string ids, got {raw.type}"
            )
        elif feature.type == "int" and not is_int:
            raise RawValueError(
                feature.name, f"feature {feature.name!r} takes integer ids, got {raw.type}"
            )
        if feature.ids == "hash":
            valid = ~np.asarray(raw.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            if feature.type == "string" and distinct:
                ids = string_hash64(_filled(raw, ""), feature_seed(feature.name))
            elif feature.type == "string":
                values, index = _distinct(_filled(raw, ""))
                ids = string_hash64(values, feature_seed(feature.name))[index]
            else:
                ids = np.asarray(_filled(raw, 0).to_numpy(zero_copy_only=False), np.int64)
            return ids, valid, 0
        if feature.ids == "index":
            valid = ~np.asarray(raw.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            size = feature.cardinality
            values = np.asarray(_filled(raw, 0).to_numpy(zero_copy_only=False), np.int64)
            ids = np.where(valid, values % size, size)
            return ids, (np.ones(len(ids), dtype=bool) if feature.oov else valid), 0
        vocabulary = self.vocabularies[feature.name]
        ids, known = vocabulary.lookup(raw, distinct=distinct)
        unknown = int((~known).sum())
        return ids, (np.ones(len(ids), dtype=bool) if vocabulary.oov else known), unknown

    # -- files ---------------------------------------------------------------------------

    def _manifest_body(self) -> str:
        return json.dumps(
            {
                "format_version": ARTIFACT_VERSION,
                "spec": json.loads(self.spec.to_json()),
                "dense_stats": {k: list(v) for k, v in sorted(self.dense_stats.items())},
                "cardinalities": dict(sorted(self.cardinalities.items())),
                "max_lengths": dict(sorted(self.max_lengths.items())),
                "vocabularies": {
                    name: {"oov": v.oov, "seed": v.seed, "size": len(v.values)}
                    for name, v in sorted(self.vocabularies.items())
                },
            },
            sort_keys=True,
        )

    def to_files(self) -> dict[str, bytes]:
        """The artifact as named blobs: what is saved with a checkpoint and published."""
        manifest = json.loads(self._manifest_body())
        manifest["content_hash"] = self.content_hash
        files = {ARTIFACT_FILE: json.dumps(manifest, indent=2, sort_keys=True).encode()}
        for name, vocabulary in self.vocabularies.items():
            buffer = io.BytesIO()
            pq.write_table(pa.table({"value": vocabulary.values}), buffer)
            files[f"vocab-{name}.parquet"] = buffer.getvalue()
        return files

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> Preprocessor:
        try:
            manifest = json.loads(files[ARTIFACT_FILE])
        except KeyError as error:
            raise ArtifactError(f"the preprocessing artifact has no {ARTIFACT_FILE}") from error
        if manifest.get("format_version") != ARTIFACT_VERSION:
            raise ArtifactError(
                f"preprocessing artifact format {manifest.get('format_version')}; this embtab "
                f"reads format {ARTIFACT_VERSION}: prepare the data set again"
            )
        spec = DatasetSpec.from_json(json.dumps(manifest["spec"]))
        vocabularies = {}
        for name, meta in manifest["vocabularies"].items():
            try:
                table = pq.read_table(io.BytesIO(files[f"vocab-{name}.parquet"]))
            except KeyError as error:
                raise ArtifactError(f"the artifact lacks the vocabulary of {name!r}") from error
            vocabularies[name] = Vocabulary(
                table.column("value").combine_chunks(), bool(meta["oov"]), int(meta["seed"])
            )
        preprocessor = cls(
            spec=spec,
            vocabularies=vocabularies,
            dense_stats={k: (float(v[0]), float(v[1])) for k, v in manifest["dense_stats"].items()},
            cardinalities={k: int(v) for k, v in manifest["cardinalities"].items()},
            max_lengths={k: int(v) for k, v in manifest["max_lengths"].items()},
        )
        if preprocessor.content_hash != manifest.get("content_hash"):
            raise ArtifactError(
                f"preprocessing artifact content hash {preprocessor.content_hash} does not match "
                f"the recorded {manifest.get('content_hash')}: its files were altered"
            )
        return preprocessor

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for name, blob in self.to_files().items():
            (directory / name).write_bytes(blob)

    @classmethod
    def load(cls, directory: Path) -> Preprocessor:
        if not (directory / ARTIFACT_FILE).exists():
            raise ArtifactError(f"no preprocessing artifact in {directory}")
        return cls.from_files({path.name: path.read_bytes() for path in directory.iterdir()})


def _filled(values: pa.Array, fill: object) -> pa.Array:
    """`values` with nulls replaced by `fill`; without nulls `values` itself (not a copy)."""
    return values.fill_null(fill) if values.null_count else values


def _distinct(values: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(distinct values, each value's index among them): a batch of Zipf ids holds few distinct
    values, so hashing and searching them once each is most of the per-row work saved."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    encoded = pc.dictionary_encode(values)
    return encoded.dictionary, np.asarray(encoded.indices, dtype=np.int64)


def _ipc_bytes(values: pa.Array) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, pa.schema([("value", values.type)])) as writer:
        writer.write_batch(pa.record_batch([values], names=["value"]))
    return sink.getvalue().to_pybytes()
